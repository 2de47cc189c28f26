"""The secure-sum messages of Rounds 2 to 4 (Bonawitz et al. 2017, Figure 4): survivors, their signatures,
and the unmasking shares; the table and the rules are in ``policies.secagg.messages``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from policies.secagg.crypto import SIGNATURE_BYTES
from policies.secagg.message_fields import (
    _check_items,
    _check_site_list,
    _read_items,
)
from policies.secagg.shamir import SHARE_BYTES
from policies.secagg.wire import (
    b64encode,
    check_bytes,
    check_session_id,
    check_site_id,
    fields,
    read_b64,
    read_list,
    read_str,
)


@dataclass(frozen=True)
class Survivors:
    """Round 2 broadcast: U3, the sites whose masked inputs the aggregator holds, in roster order."""

    KIND: ClassVar[str] = "secagg/survivors"
    session_id: str
    survivors: tuple[str, ...]

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        _check_site_list(self.survivors, kind=self.KIND, key="survivors")

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.KIND, "session_id": self.session_id, "survivors": list(self.survivors)}

    @classmethod
    def from_wire(cls, obj: object) -> Survivors:
        raw = fields(obj, kind=cls.KIND, keys=("type", "session_id", "survivors"))
        survivors = tuple(read_list(raw, "survivors", kind=cls.KIND))
        return cls(session_id=read_str(raw, "session_id", kind=cls.KIND), survivors=survivors)


@dataclass(frozen=True)
class SurvivorSignature:
    """Round 3 (ConsistencyCheck): sigma'_u, the sender's signature over U3."""

    KIND: ClassVar[str] = "secagg/survivor-signature"
    session_id: str
    sender: str
    signature: bytes  # SIG(d_u^SK, survivors_transcript(...))

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        check_site_id(self.sender, kind=self.KIND, key="sender")
        check_bytes(self.signature, kind=self.KIND, key="signature", length=SIGNATURE_BYTES)

    def to_wire(self) -> dict[str, Any]:
        signature = b64encode(self.signature)
        return {
            "type": self.KIND,
            "session_id": self.session_id,
            "sender": self.sender,
            "signature": signature,
        }

    @classmethod
    def from_wire(cls, obj: object) -> SurvivorSignature:
        raw = fields(obj, kind=cls.KIND, keys=("type", "session_id", "sender", "signature"))
        return cls(
            session_id=read_str(raw, "session_id", kind=cls.KIND),
            sender=read_str(raw, "sender", kind=cls.KIND),
            signature=read_b64(raw, "signature", kind=cls.KIND, length=SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class SignedSurvivors:
    """Round 3 broadcast: U3 and the signatures of U4 over it, in roster order of the signers."""

    KIND: ClassVar[str] = "secagg/signed-survivors"
    session_id: str
    survivors: tuple[str, ...]
    signatures: tuple[SurvivorSignature, ...]

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        _check_site_list(self.survivors, kind=self.KIND, key="survivors")
        _check_items(self.signatures, SurvivorSignature, kind=self.KIND, key="signatures")

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.KIND,
            "session_id": self.session_id,
            "survivors": list(self.survivors),
            "signatures": [item.to_wire() for item in self.signatures],
        }

    @classmethod
    def from_wire(cls, obj: object) -> SignedSurvivors:
        raw = fields(obj, kind=cls.KIND, keys=("type", "session_id", "survivors", "signatures"))
        return cls(
            session_id=read_str(raw, "session_id", kind=cls.KIND),
            survivors=tuple(read_list(raw, "survivors", kind=cls.KIND)),
            signatures=_read_items(raw, "signatures", SurvivorSignature.from_wire, kind=cls.KIND),
        )


@dataclass(frozen=True)
class RevealedShare:
    """One Shamir share a site reveals in Unmask: the share of ``owner``'s secret it holds."""

    KIND: ClassVar[str] = "secagg/revealed-share"
    owner: str
    share: bytes  # big-endian element of GF(2^521 - 1), at x = the revealing site's roster position + 1

    def __post_init__(self) -> None:
        check_site_id(self.owner, kind=self.KIND, key="owner")
        check_bytes(self.share, kind=self.KIND, key="share", length=SHARE_BYTES)

    def to_wire(self) -> dict[str, Any]:
        return {"owner": self.owner, "share": b64encode(self.share)}

    @classmethod
    def from_wire(cls, obj: object) -> RevealedShare:
        raw = fields(obj, kind=cls.KIND, keys=("owner", "share"))
        owner = read_str(raw, "owner", kind=cls.KIND)
        return cls(owner=owner, share=read_b64(raw, "share", kind=cls.KIND, length=SHARE_BYTES))


@dataclass(frozen=True)
class UnmaskShares:
    """Round 4 (Unmask): shares of b_v for survivors v in U3 and of s_v^SK for v in U2 \\ U3."""

    KIND: ClassVar[str] = "secagg/unmask-shares"
    session_id: str
    sender: str
    self_mask_shares: tuple[RevealedShare, ...]  # owners in U3: rebuild b_v, remove PRG(b_v)
    mask_key_shares: tuple[RevealedShare, ...]  # owners dropped after ShareKeys: rebuild s_v^SK

    def __post_init__(self) -> None:
        check_session_id(self.session_id, kind=self.KIND)
        check_site_id(self.sender, kind=self.KIND, key="sender")
        _check_items(self.self_mask_shares, RevealedShare, kind=self.KIND, key="self_mask_shares")
        _check_items(self.mask_key_shares, RevealedShare, kind=self.KIND, key="mask_key_shares")

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.KIND,
            "session_id": self.session_id,
            "sender": self.sender,
            "self_mask_shares": [item.to_wire() for item in self.self_mask_shares],
            "mask_key_shares": [item.to_wire() for item in self.mask_key_shares],
        }

    @classmethod
    def from_wire(cls, obj: object) -> UnmaskShares:
        keys = ("type", "session_id", "sender", "self_mask_shares", "mask_key_shares")
        raw = fields(obj, kind=cls.KIND, keys=keys)
        return cls(
            session_id=read_str(raw, "session_id", kind=cls.KIND),
            sender=read_str(raw, "sender", kind=cls.KIND),
            self_mask_shares=_read_items(raw, "self_mask_shares", RevealedShare.from_wire, kind=cls.KIND),
            mask_key_shares=_read_items(raw, "mask_key_shares", RevealedShare.from_wire, kind=cls.KIND),
        )
