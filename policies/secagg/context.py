"""What every party of one secure-sum session agrees on: config, roster, session id, and the graph.

The session digest SHA-256(session id, config, roster) salts every key derivation and is part of
every signed transcript. A message signed or encrypted for another session (an earlier round,
another federation, other parameters) therefore fails verification instead of being replayed.

Share holders. In SecAgg (Bonawitz et al. 2017, §4) every site shares its secrets with every
other site. In SecAgg+ (Bell et al. 2020) site v shares its secrets with, and masks pairwise
against, only its k neighbours in a random k-regular Harary graph, so a site's work grows with k
= O(log n) instead of n. We write ``holders(v)`` for v and the sites holding shares of v's
secrets: all sites in SecAgg, v and its k neighbours in SecAgg+. Every threshold check of the
protocol is "at least t of holders(v)". With t above half the holders, two disjoint groups of
honest holders cannot each reach t, which is what stops an aggregator that tells some sites "v
dropped" and others "v survived" from collecting both kinds of share of v.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from policies.durable import canonical_json
from policies.secagg.config import SecureSumConfig
from policies.secagg.encoding import FixedPointEncoding
from policies.secagg.errors import SecAggConfigError, SecAggThresholdError
from policies.secagg.roster import Roster
from policies.secagg.wire import check_session_id


@dataclass(frozen=True)
class RoundContext:
    """The public, agreed parameters of one session of the protocol."""

    config: SecureSumConfig
    roster: Roster
    session_id: str  # unique per round, e.g. "run-7f3a/round-12"; bound into every signature

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind="RoundContext")
        n = len(self.roster)
        self.encoding.check_headroom(n)
        holders = n if self.config.neighbourhood_size is None else self.config.neighbourhood_size + 1
        if self.config.neighbourhood_size is not None and holders >= n:
            raise SecAggConfigError(
                f"neighbourhood_size={self.config.neighbourhood_size} is not below {n - 1} (the other sites): "
                "omit neighbourhood_size for the complete graph"
            )
        if not holders // 2 + 1 <= self.config.threshold <= holders:
            raise SecAggConfigError(
                f"threshold={self.config.threshold} must be in [{holders // 2 + 1}, {holders}] for {holders} holders "
                "per secret: more than half, so an aggregator that lies about dropouts cannot collect both "
                "kinds of share of one site, and at most the holders"
            )

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 over the canonical session id, config and roster (salt of every derivation)."""
        body = {
            "session_id": self.session_id,
            "config": self.config.to_wire(),
            "roster": self.roster.to_wire(),
        }
        return hashlib.sha256(canonical_json(body).encode("utf-8")).digest()

    @cached_property
    def encoding(self) -> FixedPointEncoding:
        config = self.config
        return FixedPointEncoding(config.clip, config.quantisation_bits, config.modulus_bits)

    @property
    def threshold(self) -> int:
        return self.config.threshold

    @cached_property
    def holders(self) -> dict[str, frozenset[str]]:
        """holders[v]: v and the sites that hold shares of v's secrets (all sites without SecAgg+)."""
        everyone = frozenset(self.roster.site_ids)
        if self.config.neighbourhood_size is None:
            return {site: everyone for site in self.roster.site_ids}
        return _harary_holders(self.roster.site_ids, self.config.neighbourhood_size, self.digest)

    def neighbours(self, site_id: str) -> frozenset[str]:
        """The sites ``site_id`` masks against pairwise and shares with (holders minus itself)."""
        return self.holders[site_id] - {site_id}

    def pairwise_sign(self, site_id: str, peer: str) -> int:
        """Delta_{u,v} of §4: +1 when u comes after v in the roster, -1 when before."""
        return 1 if self.roster.position(site_id) > self.roster.position(peer) else -1

    def require_holders(self, owner: str, present: Iterable[str], *, what: str) -> None:
        """Raise ``SecAggThresholdError`` unless >= t of holders(owner) are in ``present``."""
        count = len(self.holders[owner] & frozenset(present))
        if count < self.threshold:
            raise SecAggThresholdError(
                f"only {count} of the sites holding shares of {owner} {what}; at least threshold="
                f"{self.threshold} are needed: abandon this round and start a new session"
            )


def _harary_holders(site_ids: tuple[str, ...], k: int, digest: bytes) -> dict[str, frozenset[str]]:
    """The random Harary graph H(k, n) of SecAgg+ (Bell et al. 2020): each site is linked to the
    k/2 sites on either side of it on a ring whose order is a pseudorandom permutation derived from
    the public session digest. The graph is public; only its unpredictability before the session
    id is fixed matters."""
    ring = sorted(site_ids, key=lambda site: hashlib.sha256(digest + site.encode("utf-8")).digest())
    n, half = len(ring), k // 2
    holders = {}
    for position, site in enumerate(ring):
        around = {ring[(position + step) % n] for step in range(-half, half + 1)}
        holders[site] = frozenset(around)
    return holders
