"""The aggregator side of the secure sum (the researcher), Bonawitz et al. 2017, Figure 4.

The aggregator is an explicit state machine: ``receive_*`` collects one message of the current
stage, ``close_*`` ends the stage (checking the threshold) and returns the broadcast for the next
one, and ``finish`` rebuilds the secrets of Round 4 and returns the sum. Every message is checked
completely before anything is recorded; a message of the wrong stage, session or sender, a
duplicate (replay), a bad signature or a wrong length raises and changes nothing.

The masked inputs are added into one running sum as they arrive (memory: one vector of d words),
never kept one by one.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from policies.secagg.context import RoundContext
from policies.secagg.crypto import apply_masks, public_key_of, verify_signature
from policies.secagg.errors import SecAggProtocolError, SecAggStageError, SecAggThresholdError
from policies.secagg.masks import pairwise_mask_seed, self_mask_seed
from policies.secagg.messages import (
    AdvertiseKeys,
    IncomingShares,
    MaskedInput,
    RevealedShare,
    RoundKeys,
    ShareKeys,
    SignedSurvivors,
    Survivors,
    SurvivorSignature,
    UnmaskShares,
    advertise_transcript,
    survivors_transcript,
)
from policies.secagg.shamir import reconstruct, share_from_bytes

_Incoming = AdvertiseKeys | ShareKeys | MaskedInput | SurvivorSignature | UnmaskShares


class AggregatorStage(StrEnum):
    """What the aggregator is collecting (Figure 4: the server's view of Rounds 0 to 4)."""

    COLLECTING_KEYS = "collecting-keys"  # Round 0: AdvertiseKeys from U1
    COLLECTING_SHARES = "collecting-shares"  # Round 1: ShareKeys from U2
    COLLECTING_MASKED_INPUTS = "collecting-masked-inputs"  # Round 2: MaskedInput from U3
    COLLECTING_SIGNATURES = "collecting-signatures"  # Round 3: SurvivorSignature from U4
    COLLECTING_UNMASK_SHARES = "collecting-unmask-shares"  # Round 4: UnmaskShares from U5
    FINISHED = "finished"  # the sum was returned; terminal


@dataclass(frozen=True)
class SecureSumResult:
    """The only thing the aggregator learns: the sum of the participants' encoded inputs."""

    session_id: str
    participants: tuple[str, ...]  # U3: the sites whose inputs are in the sum, in roster order
    encoded_sum: np.ndarray  # (d,) uint words: sum of the participants' codes, exact (no wraparound)
    total: np.ndarray  # (d,) float64: the decoded sum of the participants' clamped updates


class SecureSumAggregator:
    """Drives one session from the aggregator's side. Not thread-safe: feed it from one loop."""

    def __init__(self, context: RoundContext) -> None:
        self.context = context
        self.stage = AggregatorStage.COLLECTING_KEYS
        self._keys: dict[str, AdvertiseKeys] = {}  # U1
        self._shares: dict[str, ShareKeys] = {}  # U2
        self._masked_from: set[str] = set()  # U3 while collecting
        self._masked_sum = np.zeros(context.config.vector_length, dtype=context.encoding.dtype)  # (d,)
        self._survivors: tuple[str, ...] = ()  # U3 once closed
        self._signatures: dict[str, SurvivorSignature] = {}  # U4
        self._unmask: dict[str, UnmaskShares] = {}  # U5

    @property
    def advertised(self) -> tuple[str, ...]:
        """U1: the sites whose signed keys were accepted."""
        return self.context.roster.ordered(self._keys)

    @property
    def shared(self) -> tuple[str, ...]:
        """U2: the sites whose encrypted shares were accepted."""
        return self.context.roster.ordered(self._shares)

    @property
    def survivors(self) -> tuple[str, ...]:
        """U3, fixed when MaskedInput closes."""
        return self._survivors

    @property
    def signers(self) -> tuple[str, ...]:
        """U4: the sites whose signature over U3 was accepted."""
        return self.context.roster.ordered(self._signatures)

    def receive_advertise_keys(self, message: AdvertiseKeys) -> None:
        """Round 0: accept a site's signed round keys (verified now, so no forgery is forwarded)."""
        self._check(
            message, AggregatorStage.COLLECTING_KEYS, self._keys, allowed=self.context.roster.site_ids
        )
        signed = advertise_transcript(
            self.context.digest, message.sender, message.cipher_public_key, message.mask_public_key
        )
        identity = self.context.roster.identity_key(message.sender)
        verify_signature(identity, message.signature, signed, what=f"the keys of {message.sender}")
        self._keys[message.sender] = message

    def close_advertise_keys(self) -> RoundKeys:
        """End Round 0: broadcast U1's keys; refuse when a site would have fewer than t holders."""
        self._require_stage(AggregatorStage.COLLECTING_KEYS, "close_advertise_keys")
        self._require_all_holders(self.advertised, self.advertised, what="advertised keys (U1)")
        self.stage = AggregatorStage.COLLECTING_SHARES
        return RoundKeys(
            session_id=self.context.session_id, keys=tuple(self._keys[v] for v in self.advertised)
        )

    def receive_share_keys(self, message: ShareKeys) -> None:
        """Round 1: accept a site's encrypted shares, one for each of its holders in U1."""
        self._check(message, AggregatorStage.COLLECTING_SHARES, self._shares, allowed=self.advertised)
        expected = self._holders_within(message.sender, self.advertised)
        recipients = tuple(item.recipient for item in message.shares)
        if recipients != expected:
            raise SecAggProtocolError(
                f"ShareKeys from {message.sender} is addressed to {list(recipients)}, expected its holders "
                f"in U1 in roster order {list(expected)}: a truncated, reordered or padded share list"
            )
        self._shares[message.sender] = message

    def close_share_keys(self) -> dict[str, IncomingShares]:
        """End Round 1: for each site in U2, the shares addressed to it (Figure 4, server Round 1)."""
        self._require_stage(AggregatorStage.COLLECTING_SHARES, "close_share_keys")
        self._require_all_holders(self.shared, self.shared, what="shared their keys (U2)")
        inbox: dict[str, list] = {site: [] for site in self.shared}
        for sender in self.shared:
            for item in self._shares[sender].shares:
                if item.recipient in inbox:
                    inbox[item.recipient].append(item)
        self.stage = AggregatorStage.COLLECTING_MASKED_INPUTS
        session = self.context.session_id
        return {
            site: IncomingShares(session_id=session, recipient=site, shares=tuple(items))
            for site, items in inbox.items()
        }

    def receive_masked_input(self, message: MaskedInput) -> None:
        """Round 2: add y_u into the running sum (mod 2^k) after checking its exact length."""
        self._check(message, AggregatorStage.COLLECTING_MASKED_INPUTS, self._masked_from, allowed=self.shared)
        dtype, d = self.context.encoding.dtype, self.context.config.vector_length
        if len(message.vector) != d * dtype.itemsize:
            raise SecAggProtocolError(
                f"MaskedInput.vector from {message.sender}: expected {d * dtype.itemsize} bytes ({d} little-endian "
                f"{dtype.name} words), got {len(message.vector)}: truncated or for another model; resend"
            )
        np.add(self._masked_sum, np.frombuffer(message.vector, dtype=dtype), out=self._masked_sum)
        self._masked_from.add(message.sender)

    def close_masked_input(self) -> Survivors:
        """End Round 2: fix U3 and broadcast it; refuse below the threshold."""
        self._require_stage(AggregatorStage.COLLECTING_MASKED_INPUTS, "close_masked_input")
        survivors = self.context.roster.ordered(self._masked_from)
        self._require_all_holders(self.shared, survivors, what="sent masked inputs (U3)")
        self._survivors = survivors
        self.stage = AggregatorStage.COLLECTING_SIGNATURES
        return Survivors(session_id=self.context.session_id, survivors=survivors)

    def receive_survivor_signature(self, message: SurvivorSignature) -> None:
        """Round 3 (ConsistencyCheck): accept a site's signature over U3."""
        self._check(message, AggregatorStage.COLLECTING_SIGNATURES, self._signatures, allowed=self._survivors)
        signed = survivors_transcript(self.context.digest, message.sender, self._survivors)
        identity = self.context.roster.identity_key(message.sender)
        verify_signature(
            identity, message.signature, signed, what=f"the survivor list signed by {message.sender}"
        )
        self._signatures[message.sender] = message

    def close_consistency_check(self) -> SignedSurvivors:
        """End Round 3: broadcast U3 with U4's signatures; refuse below the threshold."""
        self._require_stage(AggregatorStage.COLLECTING_SIGNATURES, "close_consistency_check")
        self._require_all_holders(self.shared, self.signers, what="signed the survivor list (U4)")
        self.stage = AggregatorStage.COLLECTING_UNMASK_SHARES
        signatures = tuple(self._signatures[v] for v in self.signers)
        return SignedSurvivors(
            session_id=self.context.session_id, survivors=self._survivors, signatures=signatures
        )

    def receive_unmask_shares(self, message: UnmaskShares) -> None:
        """Round 4: accept a site's revealed shares: exactly b-shares of the survivors and s^SK-shares
        of the dropped sites among the owners it holds shares of."""
        self._check(message, AggregatorStage.COLLECTING_UNMASK_SHARES, self._unmask, allowed=self.signers)
        owners = self._holders_within(message.sender, self.shared, include_self=True)
        expected_self = tuple(v for v in owners if v in self._survivors)
        expected_key = tuple(v for v in owners if v not in self._survivors)
        if (
            tuple(s.owner for s in message.self_mask_shares) != expected_self
            or tuple(s.owner for s in message.mask_key_shares) != expected_key
        ):
            raise SecAggProtocolError(
                f"UnmaskShares from {message.sender}: expected self-mask shares of {list(expected_self)} and "
                f"mask-key shares of {list(expected_key)}, in roster order"
            )
        for item in message.self_mask_shares + message.mask_key_shares:
            share_from_bytes(item.share)
        self._unmask[message.sender] = message

    def finish(self) -> SecureSumResult:
        """Rebuild b_v (v in U3) and s_v^SK (v in U2 \\ U3), remove the masks that do not cancel,
        decode (Figure 4, server Round 4). Raises ``SecAggThresholdError`` naming a secret with fewer
        than t shares; more shares may then still arrive and ``finish`` be called again."""
        self._require_stage(AggregatorStage.COLLECTING_UNMASK_SHARES, "finish")
        dropped = tuple(v for v in self.shared if v not in self._survivors)
        self_seeds = {v: self._rebuild(v, "self_mask_shares") for v in self._survivors}
        mask_keys = {v: self._rebuild_mask_key(v) for v in dropped}
        add, subtract = self._unmatched_pairwise(mask_keys)
        subtract += [self_mask_seed(self.context, v, seed) for v, seed in self_seeds.items()]
        apply_masks(self._masked_sum, add=add, subtract=subtract)
        self.stage = AggregatorStage.FINISHED
        total = self.context.encoding.decode_sum(self._masked_sum, n_summands=len(self._survivors))
        return SecureSumResult(self.context.session_id, self._survivors, self._masked_sum, total)

    def _check(
        self, message: _Incoming, stage: AggregatorStage, seen: Container[str], *, allowed: tuple[str, ...]
    ) -> None:
        """Stage, session, sender and replay checks shared by every ``receive_*``."""
        self._require_stage(stage, f"receive {type(message).__name__}")
        if message.session_id != self.context.session_id:
            raise SecAggProtocolError(
                f"{type(message).__name__}.session_id {message.session_id!r} is not this round's session "
                f"{self.context.session_id!r}: a message from another round (replayed?) is refused"
            )
        if message.sender not in allowed:
            raise SecAggProtocolError(
                f"{type(message).__name__} from {message.sender!r}, which is not expected at this stage "
                f"(expected one of {list(allowed)})"
            )
        if message.sender in seen:
            raise SecAggProtocolError(
                f"{type(message).__name__} from {message.sender} was already received in this session: replay refused"
            )

    def _require_stage(self, stage: AggregatorStage, action: str) -> None:
        if self.stage is not stage:
            raise SecAggStageError(
                f"{action} needs the aggregator at stage {stage.value!r}, but it is at {self.stage.value!r}: "
                "collect and close AdvertiseKeys, ShareKeys, MaskedInput, ConsistencyCheck, then Unmask"
            )

    def _require_all_holders(self, owners: tuple[str, ...], present: tuple[str, ...], *, what: str) -> None:
        if not owners:
            raise SecAggThresholdError(
                f"no site {what}; at least threshold={self.context.threshold} are needed: "
                "abandon this round and start a new session"
            )
        for owner in owners:
            self.context.require_holders(owner, present, what=what)

    def _holders_within(
        self, site: str, among: tuple[str, ...], *, include_self: bool = False
    ) -> tuple[str, ...]:
        holders = self.context.holders[site] & frozenset(among)
        return self.context.roster.ordered(holders if include_self else holders - {site})

    def _collect_shares(self, owner: str, field: str) -> dict[int, int]:
        shares = {}
        for sender, message in self._unmask.items():
            items: tuple[RevealedShare, ...] = getattr(message, field)
            for item in items:
                if item.owner == owner:
                    shares[self.context.roster.share_x(sender)] = share_from_bytes(item.share)
        return shares

    def _rebuild(self, owner: str, field: str) -> bytes:
        shares = self._collect_shares(owner, field)
        threshold = self.context.threshold
        if len(shares) < threshold:
            what = "self-mask seed b" if field == "self_mask_shares" else "mask key s^SK"
            raise SecAggThresholdError(
                f"only {len(shares)} sites revealed their share of {owner}'s {what}; threshold={threshold} are "
                "needed: wait for more UnmaskShares, or abandon this round"
            )
        return reconstruct(shares, threshold=threshold)

    def _rebuild_mask_key(self, owner: str) -> bytes:
        """s_owner^SK from its shares, checked against the signed s_owner^PK (corrupt shares fail)."""
        secret = self._rebuild(owner, "mask_key_shares")
        if public_key_of(secret) != self._keys[owner].mask_public_key:
            raise SecAggProtocolError(f"the rebuilt mask key of {owner} does not match its signed public key")
        return secret

    def _unmatched_pairwise(self, mask_keys: dict[str, bytes]) -> tuple[list[bytes], list[bytes]]:
        """Seeds that undo p_{u,v} for survivors u and dropped v: u added Delta_{u,v} PRG(s_{u,v})."""
        add: list[bytes] = []
        subtract: list[bytes] = []
        for dropped, secret in mask_keys.items():
            for survivor in self._holders_within(dropped, self._survivors):
                public = self._keys[survivor].mask_public_key
                seed = pairwise_mask_seed(self.context, dropped, survivor, secret, public)
                (subtract if self.context.pairwise_sign(survivor, dropped) > 0 else add).append(seed)
        return add, subtract
