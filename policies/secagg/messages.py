"""The messages of one secure-sum session, in the order of Bonawitz et al. 2017, Figure 4.

Each message is a frozen dataclass whose ``__post_init__`` checks field types and lengths, with
``to_wire()`` giving a dict of ``str``/``int``/``list``/``dict`` only (small binary fields as
canonical base64) except ``MaskedInput.vector``, which is raw ``bytes``: the little-endian uint32
(k = 32) or uint64 (k = 64) words of the masked vector. ``from_wire`` is strict: exact keys, a
``type`` tag naming the message, exact types and lengths; anything else raises
``SecAggProtocolError`` naming the field. Checks against the round (session, roster, order,
signatures) happen in the stage that consumes the message, before any state changes.

=================  ===============  =============================================================
message            direction        paper (Figure 4)
=================  ===============  =============================================================
AdvertiseKeys      site -> agg      Round 0: (c_u^PK, s_u^PK, sigma_u)
RoundKeys          agg -> sites     Round 0 broadcast of {(v, c_v^PK, s_v^PK, sigma_v)}, v in U1
ShareKeys          site -> agg      Round 1: e_{u,v} for each holder v
IncomingShares     agg -> site      Round 1 forwarding: e_{v,u} for the recipient u, v in U2
MaskedInput        site -> agg      Round 2: y_u
Survivors          agg -> sites     Round 2 broadcast of U3
SurvivorSignature  site -> agg      Round 3 (ConsistencyCheck): sigma'_u over U3
SignedSurvivors    agg -> sites     Round 3 broadcast of {(v, sigma'_v)}, v in U4
UnmaskShares       site -> agg      Round 4: shares of b_v (v in U3), of s_v^SK (v in U2 \\ U3)
=================  ===============  =============================================================

The first five are here; the messages of Rounds 2 to 4 are in ``policies.secagg.messages_unmask``,
their shared checks in ``policies.secagg.message_fields``. Every name is importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from policies.secagg.crypto import KEY_BYTES, SIGNATURE_BYTES
from policies.secagg.errors import SecAggProtocolError
from policies.secagg.message_fields import (
    SEALED_SHARES_BYTES,
    SHARE_PAIR_BYTES,
    _check_items,
    _read_items,
    advertise_transcript,
    survivors_transcript,
)
from policies.secagg.messages_unmask import (
    RevealedShare,
    SignedSurvivors,
    Survivors,
    SurvivorSignature,
    UnmaskShares,
)
from policies.secagg.wire import (
    b64encode,
    check_bytes,
    check_session_id,
    check_site_id,
    fields,
    read_b64,
    read_str,
)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0 (AdvertiseKeys): a site's two fresh X25519 public keys, signed with its identity key."""

    KIND: ClassVar[str] = "secagg/advertise-keys"
    session_id: str
    sender: str
    cipher_public_key: bytes  # c_u^PK: agrees the keys that encrypt shares in transit
    mask_public_key: bytes  # s_u^PK: agrees the pairwise mask seeds
    signature: bytes  # sigma_u = SIG(d_u^SK, advertise_transcript(...))

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        check_site_id(self.sender, kind=self.KIND, key="sender")
        check_bytes(self.cipher_public_key, kind=self.KIND, key="cipher_public_key", length=KEY_BYTES)
        check_bytes(self.mask_public_key, kind=self.KIND, key="mask_public_key", length=KEY_BYTES)
        check_bytes(self.signature, kind=self.KIND, key="signature", length=SIGNATURE_BYTES)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.KIND,
            "session_id": self.session_id,
            "sender": self.sender,
            "cipher_public_key": b64encode(self.cipher_public_key),
            "mask_public_key": b64encode(self.mask_public_key),
            "signature": b64encode(self.signature),
        }

    @classmethod
    def from_wire(cls, obj: object) -> AdvertiseKeys:
        keys = ("type", "session_id", "sender", "cipher_public_key", "mask_public_key", "signature")
        raw = fields(obj, kind=cls.KIND, keys=keys)
        return cls(
            session_id=read_str(raw, "session_id", kind=cls.KIND),
            sender=read_str(raw, "sender", kind=cls.KIND),
            cipher_public_key=read_b64(raw, "cipher_public_key", kind=cls.KIND, length=KEY_BYTES),
            mask_public_key=read_b64(raw, "mask_public_key", kind=cls.KIND, length=KEY_BYTES),
            signature=read_b64(raw, "signature", kind=cls.KIND, length=SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class RoundKeys:
    """Round 0 broadcast: the signed keys of every site in U1, in roster order."""

    KIND: ClassVar[str] = "secagg/round-keys"
    session_id: str
    keys: tuple[AdvertiseKeys, ...]

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        _check_items(self.keys, AdvertiseKeys, kind=self.KIND, key="keys")

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.KIND, "session_id": self.session_id, "keys": [k.to_wire() for k in self.keys]}

    @classmethod
    def from_wire(cls, obj: object) -> RoundKeys:
        raw = fields(obj, kind=cls.KIND, keys=("type", "session_id", "keys"))
        keys = _read_items(raw, "keys", AdvertiseKeys.from_wire, kind=cls.KIND)
        return cls(session_id=read_str(raw, "session_id", kind=cls.KIND), keys=keys)


@dataclass(frozen=True)
class EncryptedShares:
    """e_{u,v} (Figure 4, Round 1): u's shares for v, sealed with the key u and v agreed."""

    KIND: ClassVar[str] = "secagg/encrypted-shares"
    sender: str  # u, the owner of the shared secrets
    recipient: str  # v, the holder
    ciphertext: bytes  # nonce || AE.enc(share of s_u^SK || share of b_u) || tag

    def __post_init__(self) -> None:
        check_site_id(self.sender, kind=self.KIND, key="sender")
        check_site_id(self.recipient, kind=self.KIND, key="recipient")
        check_bytes(self.ciphertext, kind=self.KIND, key="ciphertext", length=SEALED_SHARES_BYTES)

    def to_wire(self) -> dict[str, Any]:
        return {"sender": self.sender, "recipient": self.recipient, "ciphertext": b64encode(self.ciphertext)}

    @classmethod
    def from_wire(cls, obj: object) -> EncryptedShares:
        raw = fields(obj, kind=cls.KIND, keys=("sender", "recipient", "ciphertext"))
        return cls(
            sender=read_str(raw, "sender", kind=cls.KIND),
            recipient=read_str(raw, "recipient", kind=cls.KIND),
            ciphertext=read_b64(raw, "ciphertext", kind=cls.KIND, length=SEALED_SHARES_BYTES),
        )


@dataclass(frozen=True)
class ShareKeys:
    """Round 1 (ShareKeys): the sender's encrypted shares, one per other holder, in roster order."""

    KIND: ClassVar[str] = "secagg/share-keys"
    session_id: str
    sender: str
    shares: tuple[EncryptedShares, ...]

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        check_site_id(self.sender, kind=self.KIND, key="sender")
        _check_items(self.shares, EncryptedShares, kind=self.KIND, key="shares")
        if any(item.sender != self.sender for item in self.shares):
            raise SecAggProtocolError(
                f"{self.KIND}.shares: every entry must come from the sender {self.sender}"
            )

    def to_wire(self) -> dict[str, Any]:
        shares = [item.to_wire() for item in self.shares]
        return {"type": self.KIND, "session_id": self.session_id, "sender": self.sender, "shares": shares}

    @classmethod
    def from_wire(cls, obj: object) -> ShareKeys:
        raw = fields(obj, kind=cls.KIND, keys=("type", "session_id", "sender", "shares"))
        return cls(
            session_id=read_str(raw, "session_id", kind=cls.KIND),
            sender=read_str(raw, "sender", kind=cls.KIND),
            shares=_read_items(raw, "shares", EncryptedShares.from_wire, kind=cls.KIND),
        )


@dataclass(frozen=True)
class IncomingShares:
    """Round 1 forwarding: the shares addressed to ``recipient``, in roster order of the senders."""

    KIND: ClassVar[str] = "secagg/incoming-shares"
    session_id: str
    recipient: str
    shares: tuple[EncryptedShares, ...]

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        check_site_id(self.recipient, kind=self.KIND, key="recipient")
        _check_items(self.shares, EncryptedShares, kind=self.KIND, key="shares")
        if any(item.recipient != self.recipient for item in self.shares):
            raise SecAggProtocolError(
                f"{self.KIND}.shares: every entry must be addressed to {self.recipient}"
            )

    def to_wire(self) -> dict[str, Any]:
        shares = [item.to_wire() for item in self.shares]
        return {
            "type": self.KIND,
            "session_id": self.session_id,
            "recipient": self.recipient,
            "shares": shares,
        }

    @classmethod
    def from_wire(cls, obj: object) -> IncomingShares:
        raw = fields(obj, kind=cls.KIND, keys=("type", "session_id", "recipient", "shares"))
        return cls(
            session_id=read_str(raw, "session_id", kind=cls.KIND),
            recipient=read_str(raw, "recipient", kind=cls.KIND),
            shares=_read_items(raw, "shares", EncryptedShares.from_wire, kind=cls.KIND),
        )


@dataclass(frozen=True)
class MaskedInput:
    """Round 2 (MaskedInput): y_u = x_u + PRG(b_u) + sum_v Delta_{u,v} PRG(s_{u,v})  (mod 2^k).

    ``vector`` holds d little-endian words of k bits (4 * d bytes for k = 32); its length is checked
    against the round's config by the aggregator.
    """

    KIND: ClassVar[str] = "secagg/masked-input"
    session_id: str
    sender: str
    vector: bytes  # raw little-endian uint32/uint64 words, d of them

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        check_site_id(self.sender, kind=self.KIND, key="sender")
        if not isinstance(self.vector, bytes):
            raise SecAggProtocolError(f"{self.KIND}.vector: expected bytes, got {type(self.vector).__name__}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.KIND,
            "session_id": self.session_id,
            "sender": self.sender,
            "vector": self.vector,
        }

    @classmethod
    def from_wire(cls, obj: object) -> MaskedInput:
        raw = fields(obj, kind=cls.KIND, keys=("type", "session_id", "sender", "vector"))
        return cls(
            session_id=read_str(raw, "session_id", kind=cls.KIND),
            sender=read_str(raw, "sender", kind=cls.KIND),
            vector=raw["vector"],
        )


__all__ = ["SEALED_SHARES_BYTES", "SHARE_PAIR_BYTES", "AdvertiseKeys", "EncryptedShares", "IncomingShares",
           "MaskedInput", "RevealedShare", "RoundKeys", "ShareKeys", "SignedSurvivors", "SurvivorSignature",
           "Survivors", "UnmaskShares", "advertise_transcript", "survivors_transcript"]
