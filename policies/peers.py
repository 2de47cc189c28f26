"""The federation a site's admin trusts: pinned peer identity keys and a minimum secure-sum threshold.

The secure sum protects one site's update only if the other roster entries are real sites: a roster
is the researcher's message, and a researcher who lists two "sites" of its own making, with keys it
holds, receives t shares of a real site's self-mask seed and mask key and unmasks that site's update
alone (Bonawitz et al. 2017, §6.2, assume a PKI that binds keys to parties; this is ours). So every
site's admin pins, out of band, the Ed25519 identity key of each peer it trusts (``fedsite admin
peers add NAME KEY``) and a minimum threshold, and the site refuses a plan whose roster holds any entry
it has not pinned, or whose threshold is below that minimum: at review, and again at every stage of
every round (``policies.site_runtime``), so a pin removed later takes effect at once.

Stored in ``<data-dir>/peers.json`` (0600): ``{"peers": {name: key hex}, "min_threshold": t}``.
The site's own entry is implied by its identity key and never stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from policies.durable import read_json, write_json_atomic
from policies.identity import check_ed25519_public_key, identity_public_hex, key_fingerprint
from policies.secagg import Roster

PEERS_FILE = "peers.json"
# A sum of one input reveals it; two is the least that hides anything, and only if both are honest.
DEFAULT_MIN_THRESHOLD = 2
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class PeerPinError(ValueError):
    """A pin, an unpin or a threshold the admin asked for is invalid; the message names the fix."""


def check_peer_key(key_hex: object) -> str:
    """A peer's key as ``fedsite admin identity`` prints it: 64 hex digits of a raw Ed25519 public key."""
    if not isinstance(key_hex, str) or not re.fullmatch(r"[0-9a-f]{64}", key_hex):
        raise PeerPinError(f"a peer key is 64 lowercase hex digits (its admin's `fedsite admin identity`), got {key_hex!r}")
    try:
        check_ed25519_public_key(bytes.fromhex(key_hex))
    except ValueError as exc:
        raise PeerPinError(f"{key_hex[:16]}... is refused ({exc}): ask the peer's admin for its key again") from None
    return key_hex


@dataclass(frozen=True)
class RosterEntryStatus:
    """One roster entry as this site sees it."""

    site_id: str
    fingerprint: str  # policies.identity.key_fingerprint of the key the roster carries
    status: str  # "this site", "pinned", "NOT PINNED" or "KEY DIFFERS from the pinned ..."

    @property
    def trusted(self) -> bool:
        return self.status in ("this site", "pinned")


@dataclass(frozen=True)
class PinnedFederation:
    """What this site's admin pinned."""

    own_name: str  # this site's name
    own_key: str  # this site's identity public key (hex)
    peers: Mapping[str, str]  # peer name -> pinned key (hex)
    min_threshold: int  # the least secure-sum threshold this site takes part in

    def entry_status(self, site_id: str, key_hex: str) -> RosterEntryStatus:
        fingerprint = key_fingerprint(key_hex)
        if site_id == self.own_name:
            status = "this site" if key_hex == self.own_key else f"KEY DIFFERS from this site's {key_fingerprint(self.own_key)}"
        elif site_id not in self.peers:
            status = "NOT PINNED"
        elif self.peers[site_id] != key_hex:
            status = f"KEY DIFFERS from the pinned {key_fingerprint(self.peers[site_id])}"
        else:
            status = "pinned"
        return RosterEntryStatus(site_id, fingerprint, status)

    def roster_status(self, roster: Roster) -> list[RosterEntryStatus]:
        return [self.entry_status(entry.site_id, entry.identity_key.hex()) for entry in roster.entries]

    def roster_problems(self, roster: Roster, threshold: int) -> list[str]:
        """Why this site must not take part in a secure sum over ``roster`` at ``threshold`` (empty: it may)."""
        problems = []
        if self.own_name not in roster:
            problems.append(f"the roster does not list this site ({self.own_name})")
        for entry in self.roster_status(roster):
            if entry.status == "NOT PINNED":
                problems.append(f"roster entry {entry.site_id} (key {entry.fingerprint}) is not pinned here: check its "
                                f"key with its admin, then `fedsite admin peers add {entry.site_id} KEY`")
            elif not entry.trusted:
                problems.append(f"roster entry {entry.site_id} carries key {entry.fingerprint}: {entry.status} "
                                "(a substituted or outdated key)")
        if threshold < self.min_threshold:
            problems.append(f"the secure-sum threshold {threshold} is below this site's minimum {self.min_threshold} "
                            "(`fedsite admin peers threshold`)")
        return problems


class PeerPins:
    """The pins of the site whose data dir is ``data_dir`` (see the module docstring)."""

    def __init__(self, data_dir: Path, *, own_name: str) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / PEERS_FILE
        self.own_name = own_name

    def load(self) -> PinnedFederation:
        raw = read_json(self.path) if self.path.exists() else {}
        peers = {str(name): check_peer_key(key) for name, key in dict(raw.get("peers", {})).items()}
        threshold = raw.get("min_threshold", DEFAULT_MIN_THRESHOLD)
        return PinnedFederation(own_name=self.own_name, own_key=identity_public_hex(self.data_dir), peers=peers,
                                min_threshold=_checked_threshold(threshold))

    def _save(self, peers: Mapping[str, str], min_threshold: int) -> None:
        write_json_atomic(self.path, {"peers": dict(sorted(peers.items())), "min_threshold": min_threshold}, mode=0o600)

    def add(self, name: str, key_hex: str) -> PinnedFederation:
        """Pin ``name`` to ``key_hex``; refuses this site itself, another key for a pinned name, a reused key."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise PeerPinError(f"peer name {name!r} is invalid: use the peer's site name, e.g. site-b")
        key_hex = check_peer_key(key_hex)
        current = self.load()
        if name == self.own_name or key_hex == current.own_key:
            raise PeerPinError(f"{name} / {key_fingerprint(key_hex)} is this site itself: its own key is always trusted")
        if name in current.peers and current.peers[name] != key_hex:
            raise PeerPinError(f"{name} is already pinned to {key_fingerprint(current.peers[name])}: remove it first "
                               f"(`fedsite admin peers remove {name}`) if its key really changed")
        holder = next((peer for peer, key in current.peers.items() if key == key_hex and peer != name), None)
        if holder is not None:
            raise PeerPinError(f"key {key_fingerprint(key_hex)} is already pinned for {holder}: one key, one site")
        self._save({**current.peers, name: key_hex}, current.min_threshold)
        return self.load()

    def remove(self, name: str) -> PinnedFederation:
        current = self.load()
        if name not in current.peers:
            pinned = ", ".join(sorted(current.peers)) or "none"
            raise PeerPinError(f"{name!r} is not pinned here (pinned: {pinned}): nothing changed")
        self._save({peer: key for peer, key in current.peers.items() if peer != name}, current.min_threshold)
        return self.load()

    def set_min_threshold(self, threshold: int) -> PinnedFederation:
        threshold = _checked_threshold(threshold)
        self._save(self.load().peers, threshold)
        return self.load()


def _checked_threshold(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < DEFAULT_MIN_THRESHOLD:
        raise PeerPinError(f"the minimum secure-sum threshold must be an int >= {DEFAULT_MIN_THRESHOLD} "
                           f"(a sum of one input reveals it), got {value!r}")
    return value
