"""The federation roster: the ordered sites and the Ed25519 identity keys their admins pinned.

Bonawitz et al. 2017 (§3, "Public Key Infrastructure") assume a PKI that binds each user's signing
key to its identity; here the admins exchange and pin those keys out of band, and the roster is
that pinning. The order of
the roster fixes each site's Shamir share position (site i holds x = i + 1) and the sign of each
pairwise mask (§4: +PRG when u > v, -PRG when u < v), so both are independent of the site names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from policies.identity import check_ed25519_public_key
from policies.secagg.crypto import KEY_BYTES
from policies.secagg.errors import SecAggConfigError, SecAggProtocolError
from policies.secagg.wire import b64encode, check_site_id, fields, read_b64, read_list, read_str

_ENTRY_KEYS = ("site_id", "identity_key")


@dataclass(frozen=True)
class RosterEntry:
    """One site and its pinned identity key."""

    site_id: str  # short lower-case id, e.g. "site-a"
    identity_key: bytes  # raw 32-byte Ed25519 public key, pinned by the admins

    def __post_init__(self) -> None:
        check_site_id(self.site_id, kind="RosterEntry", key="site_id")
        if not isinstance(self.identity_key, bytes) or len(self.identity_key) != KEY_BYTES:
            raise SecAggConfigError(
                f"the identity key of {self.site_id} must be {KEY_BYTES} raw Ed25519 bytes"
            )
        try:
            check_ed25519_public_key(self.identity_key)
        except ValueError as exc:
            raise SecAggConfigError(f"the identity key of {self.site_id} is refused: {exc}") from exc


@dataclass(frozen=True)
class Roster:
    """Ordered sites of the federation (at least two, distinct ids and distinct keys)."""

    entries: tuple[RosterEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple) or len(self.entries) < 2:
            raise SecAggConfigError(
                "a roster needs a tuple of at least 2 sites: a sum of one input reveals it"
            )
        ids = [entry.site_id for entry in self.entries]
        keys = [entry.identity_key for entry in self.entries]
        if len(set(ids)) != len(ids) or len(set(keys)) != len(keys):
            raise SecAggConfigError("roster site ids and identity keys must be distinct: fix the roster file")

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, bytes]]) -> Roster:
        return cls(tuple(RosterEntry(site_id, key) for site_id, key in pairs))

    @cached_property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(entry.site_id for entry in self.entries)

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {site_id: position for position, site_id in enumerate(self.site_ids)}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, site_id: object) -> bool:
        return site_id in self._positions

    def position(self, site_id: str) -> int:
        """0-based roster position; raises for a site the admins did not pin."""
        if site_id not in self._positions:
            raise SecAggProtocolError(f"{site_id!r} is not in the roster: only pinned sites may take part")
        return self._positions[site_id]

    def share_x(self, site_id: str) -> int:
        """The Shamir evaluation point of ``site_id``: its roster position + 1 (never 0, the secret)."""
        return self.position(site_id) + 1

    def identity_key(self, site_id: str) -> bytes:
        return self.entries[self.position(site_id)].identity_key

    def ordered(self, site_ids: Iterable[str]) -> tuple[str, ...]:
        """``site_ids`` sorted by roster position."""
        return tuple(sorted(site_ids, key=self.position))

    def to_wire(self) -> list[dict[str, Any]]:
        return [{"site_id": e.site_id, "identity_key": b64encode(e.identity_key)} for e in self.entries]

    @classmethod
    def from_wire(cls, obj: object) -> Roster:
        kind = "Roster"
        items = read_list({"entries": obj}, "entries", kind=kind)
        entries = []
        for item in items:
            raw = fields(item, kind=kind, keys=_ENTRY_KEYS)
            site_id = read_str(raw, "site_id", kind=kind)
            entries.append(RosterEntry(site_id, read_b64(raw, "identity_key", kind=kind, length=KEY_BYTES)))
        return cls(tuple(entries))
