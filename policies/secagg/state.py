"""A site's state for one session, serialisable so each stage can run in a fresh process.

Each stage of the site runs as its own syft execution, possibly in a newly forked worker, and the
site may restart between stages. The state therefore holds everything a later stage needs,
including the round's secret keys (c_u^SK, s_u^SK, b_u), and is persisted in the site's data dir
with ``save_round_state`` (atomic replace, mode 0600) *before* the stage's outgoing message is
released. It also records what the site committed to: the survivor list it signed and the kind of
share it revealed for each peer, so "never reveal both the self-mask share and the mask-key share
of the same site" (Bonawitz et al. 2017, §4) holds across restarts.

The JSON form is strict on load: exact keys, types and lengths; a corrupted file raises.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from policies.durable import canonical_json, read_json, write_json_atomic
from policies.secagg.config import SecureSumConfig
from policies.secagg.context import RoundContext
from policies.secagg.crypto import KEY_BYTES
from policies.secagg.errors import SecAggProtocolError
from policies.secagg.roster import Roster
from policies.secagg.shamir import SHARE_BYTES, share_from_bytes, share_to_bytes
from policies.secagg.wire import b64encode, fields, read_b64, read_list, read_str

STATE_FORMAT = "fedsite-secagg-site-state/1"
_E = TypeVar("_E", bound=StrEnum)
_KIND = "SiteRoundState"
_SECRET_FIELDS = ("cipher_secret_key", "mask_secret_key", "self_mask_seed", "rounding_seed")
_KEYS = (
    ("format", "session_id", "config", "roster", "site_id", "stage")
    + _SECRET_FIELDS
    + ("advertised", "peer_keys", "held_shares", "masked_with", "signed_survivors", "revealed")
)


class SiteStage(StrEnum):
    """Where a site is in Figure 4 of Bonawitz et al. 2017: the last stage it completed."""

    KEYS_ADVERTISED = "keys-advertised"  # Round 0 done: round keys generated and signed
    KEYS_SHARED = "keys-shared"  # Round 1 done: shares of s_u^SK and b_u sent, encrypted
    INPUT_MASKED = "input-masked"  # Round 2 done: y_u sent
    SURVIVORS_SIGNED = "survivors-signed"  # Round 3 done: U3 signed (ConsistencyCheck)
    UNMASKED = "unmasked"  # Round 4 done: shares revealed; terminal


class ShareKind(StrEnum):
    """The two secrets of a site v that its holders can reveal; never both for one v (§4)."""

    SELF_MASK = "self-mask"  # share of b_v: revealed when v survived (v in U3)
    MASK_KEY = "mask-key"  # share of s_v^SK: revealed when v dropped after ShareKeys (U2 \ U3)


@dataclass(frozen=True)
class PeerKeys:
    """A peer's signed round public keys, as verified at ShareKeys."""

    cipher_public_key: bytes  # c_v^PK
    mask_public_key: bytes  # s_v^PK


@dataclass(frozen=True)
class HeldShares:
    """The shares of one owner's two secrets held by this site (field elements of GF(2^521 - 1))."""

    mask_key: int  # share of s_owner^SK
    self_mask: int  # share of b_owner


@dataclass(frozen=True)
class SiteRoundState:
    """Everything one site knows and has committed to in one session. Immutable: stages return a new one."""

    context: RoundContext
    site_id: str
    stage: SiteStage
    cipher_secret_key: bytes  # c_u^SK (X25519): agrees the share-transport keys
    mask_secret_key: bytes  # s_u^SK (X25519): agrees the pairwise mask seeds; Shamir-shared
    self_mask_seed: bytes  # b_u: seeds the self mask PRG(b_u); Shamir-shared
    rounding_seed: bytes  # seeds stochastic rounding, so a re-run of MaskedInput is identical
    advertised: tuple[str, ...] = ()  # U1, from the RoundKeys broadcast
    peer_keys: Mapping[str, PeerKeys] = field(default_factory=dict)  # holders(u) in U1, u included
    held_shares: Mapping[str, HeldShares] = field(default_factory=dict)  # owner -> shares held here
    masked_with: tuple[str, ...] = ()  # holders(u) in U2 as this site saw them, u included
    signed_survivors: tuple[str, ...] | None = None  # U3 as signed in ConsistencyCheck
    revealed: Mapping[str, ShareKind] = field(default_factory=dict)  # owner -> share kind revealed

    def advance(self, stage: SiteStage, **changes: Any) -> SiteRoundState:
        return replace(self, stage=stage, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; it holds the round's secret keys, so store it like a private key."""
        secrets = {name: b64encode(getattr(self, name)) for name in _SECRET_FIELDS}
        return {
            "format": STATE_FORMAT,
            "session_id": self.context.session_id,
            "config": self.context.config.to_wire(),
            "roster": self.context.roster.to_wire(),
            "site_id": self.site_id,
            "stage": self.stage.value,
            **secrets,
            "advertised": list(self.advertised),
            "peer_keys": {site: _peer_keys_to_json(keys) for site, keys in self.peer_keys.items()},
            "held_shares": {site: _held_to_json(held) for site, held in self.held_shares.items()},
            "masked_with": list(self.masked_with),
            "signed_survivors": None if self.signed_survivors is None else list(self.signed_survivors),
            "revealed": {site: kind.value for site, kind in self.revealed.items()},
        }

    @classmethod
    def from_json(cls, obj: object) -> SiteRoundState:
        raw = fields(obj, kind=_KIND, keys=_KEYS)
        if raw["format"] != STATE_FORMAT:
            raise SecAggProtocolError(f"{_KIND}.format: {raw['format']!r} is not {STATE_FORMAT!r}")
        context = RoundContext(
            SecureSumConfig.from_wire(raw["config"]),
            Roster.from_wire(raw["roster"]),
            read_str(raw, "session_id", kind=_KIND),
        )
        site_id = _member(context, raw["site_id"], key="site_id")
        signed = raw["signed_survivors"]
        return cls(
            context=context,
            site_id=site_id,
            stage=_enum(SiteStage, raw["stage"], key="stage"),
            **{name: read_b64(raw, name, kind=_KIND, length=KEY_BYTES) for name in _SECRET_FIELDS},
            advertised=_site_list(context, raw, "advertised"),
            peer_keys={
                _member(context, s, key="peer_keys"): _peer_keys_from_json(v)
                for s, v in _dict(raw, "peer_keys")
            },
            held_shares={
                _member(context, s, key="held_shares"): _held_from_json(v)
                for s, v in _dict(raw, "held_shares")
            },
            masked_with=_site_list(context, raw, "masked_with"),
            signed_survivors=None if signed is None else _site_list(context, raw, "signed_survivors"),
            revealed={
                _member(context, s, key="revealed"): _enum(ShareKind, v, key="revealed")
                for s, v in _dict(raw, "revealed")
            },
        )

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json()).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> SiteRoundState:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SecAggProtocolError(
                f"{_KIND}: not UTF-8 JSON ({exc}); the state file is corrupted"
            ) from exc
        return cls.from_json(obj)


def save_round_state(path: Path, state: SiteRoundState) -> None:
    """Atomically replace ``path`` with ``state`` (owner-only permissions: it holds secret keys)."""
    write_json_atomic(Path(path), state.to_json(), mode=0o600)


def load_round_state(path: Path) -> SiteRoundState:
    return SiteRoundState.from_json(read_json(Path(path)))


def _peer_keys_to_json(keys: PeerKeys) -> dict[str, str]:
    return {
        "cipher_public_key": b64encode(keys.cipher_public_key),
        "mask_public_key": b64encode(keys.mask_public_key),
    }


def _peer_keys_from_json(obj: object) -> PeerKeys:
    raw = fields(obj, kind=f"{_KIND}.peer_keys", keys=("cipher_public_key", "mask_public_key"))
    return PeerKeys(
        cipher_public_key=read_b64(raw, "cipher_public_key", kind=f"{_KIND}.peer_keys", length=KEY_BYTES),
        mask_public_key=read_b64(raw, "mask_public_key", kind=f"{_KIND}.peer_keys", length=KEY_BYTES),
    )


def _held_to_json(held: HeldShares) -> dict[str, str]:
    return {
        "mask_key": b64encode(share_to_bytes(held.mask_key)),
        "self_mask": b64encode(share_to_bytes(held.self_mask)),
    }


def _held_from_json(obj: object) -> HeldShares:
    kind = f"{_KIND}.held_shares"
    raw = fields(obj, kind=kind, keys=("mask_key", "self_mask"))
    return HeldShares(
        mask_key=share_from_bytes(read_b64(raw, "mask_key", kind=kind, length=SHARE_BYTES)),
        self_mask=share_from_bytes(read_b64(raw, "self_mask", kind=kind, length=SHARE_BYTES)),
    )


def _dict(raw: Mapping[str, Any], key: str) -> list[tuple[str, Any]]:
    value = raw[key]
    if not isinstance(value, dict):
        raise SecAggProtocolError(f"{_KIND}.{key}: expected a dict, got {type(value).__name__}")
    return list(value.items())


def _member(context: RoundContext, site: object, *, key: str) -> str:
    if not isinstance(site, str) or site not in context.roster:
        raise SecAggProtocolError(f"{_KIND}.{key}: {site!r} is not a site of the roster")
    return site


def _site_list(context: RoundContext, raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(_member(context, site, key=key) for site in read_list(raw, key, kind=_KIND))


def _enum(enum: type[_E], value: object, *, key: str) -> _E:
    if not isinstance(value, str) or value not in {member.value for member in enum}:
        raise SecAggProtocolError(f"{_KIND}.{key}: {value!r} is not one of {[m.value for m in enum]}")
    return enum(value)
