"""The site side of the secure sum: one function per stage of Bonawitz et al. 2017, Figure 4.

Every stage takes the persisted ``SiteRoundState`` and the incoming message, validates all of it
first (stage, session, roster membership, order, signatures, thresholds), and only then returns
a *new* state and the outgoing message; the old state is never modified. The caller persists the
new state (``save_round_state``) before it releases the message, so a restart resumes from a
state that already records what was sent. Invalid transitions raise ``SecAggStageError``.

    advertise_keys     -> KEYS_ADVERTISED       Round 0, AdvertiseKeys
    share_keys         -> KEYS_SHARED           Round 1, ShareKeys
    mask_input         -> INPUT_MASKED          Round 2, MaskedInputCollection
    consistency_check  -> SURVIVORS_SIGNED      Round 3, ConsistencyCheck
    unmask             -> UNMASKED              Round 4, Unmasking
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.secagg.context import RoundContext
from policies.secagg.crypto import (
    KEY_BYTES,
    agree,
    apply_masks,
    identity_public_key,
    new_secret_key,
    open_sealed,
    public_key_of,
    seal,
    sign,
    transcript,
    verify_signature,
)
from policies.secagg.errors import SecAggConfigError, SecAggProtocolError, SecAggRevealError, SecAggStageError
from policies.secagg.masks import pairwise_mask_seed, self_mask_seed
from policies.secagg.messages import (
    AdvertiseKeys,
    EncryptedShares,
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
from policies.secagg.shamir import SHARE_BYTES, share_from_bytes, share_to_bytes, split
from policies.secagg.state import HeldShares, PeerKeys, ShareKind, SiteRoundState, SiteStage

_Message = RoundKeys | IncomingShares | Survivors | SignedSurvivors


def advertise_keys(
    context: RoundContext, *, site_id: str, identity_key: Ed25519PrivateKey
) -> tuple[SiteRoundState, AdvertiseKeys]:
    """Round 0 (AdvertiseKeys): fresh X25519 keys (c_u, s_u), seed b_u, and sigma_u over the public keys.

    The signature binds the keys to this site and session, so the aggregator cannot substitute its
    own keys for a site's (the man in the middle of §6, active adversaries) nor replay keys from
    another round.
    """
    _check_identity(context, site_id, identity_key)
    state = SiteRoundState(
        context=context,
        site_id=site_id,
        stage=SiteStage.KEYS_ADVERTISED,
        cipher_secret_key=new_secret_key(),
        mask_secret_key=new_secret_key(),
        self_mask_seed=os.urandom(KEY_BYTES),
        rounding_seed=os.urandom(KEY_BYTES),
    )
    keys = _own_keys(state)
    message = advertise_transcript(context.digest, site_id, keys.cipher_public_key, keys.mask_public_key)
    advert = AdvertiseKeys(
        session_id=context.session_id,
        sender=site_id,
        cipher_public_key=keys.cipher_public_key,
        mask_public_key=keys.mask_public_key,
        signature=sign(identity_key, message),
    )
    return state, advert


def share_keys(state: SiteRoundState, round_keys: RoundKeys) -> tuple[SiteRoundState, ShareKeys]:
    """Round 1 (ShareKeys): verify U1's signed keys, Shamir-share s_u^SK and b_u among the holders,
    and encrypt each holder's pair of shares to it (e_{u,v}, Figure 4)."""
    _require(state, SiteStage.KEYS_ADVERTISED, "share_keys", round_keys)
    context, site = state.context, state.site_id
    peers = _verified_round_keys(state, round_keys)
    context.require_holders(site, peers, what="advertised keys (U1)")
    holders = context.roster.ordered(context.holders[site] & frozenset(peers))
    xs = [context.roster.share_x(holder) for holder in holders]
    mask_key_shares = split(state.mask_secret_key, threshold=context.threshold, xs=xs)
    self_mask_shares = split(state.self_mask_seed, threshold=context.threshold, xs=xs)
    sealed = []
    for holder, x in zip(holders, xs, strict=True):
        if holder != site:
            plaintext = share_to_bytes(mask_key_shares[x]) + share_to_bytes(self_mask_shares[x])
            sealed.append(_seal_for(state, holder, peers[holder], plaintext))
    own_x = context.roster.share_x(site)
    new_state = state.advance(
        SiteStage.KEYS_SHARED,
        advertised=tuple(peers),
        peer_keys={holder: peers[holder] for holder in holders},
        held_shares={site: HeldShares(mask_key=mask_key_shares[own_x], self_mask=self_mask_shares[own_x])},
    )
    return new_state, ShareKeys(session_id=context.session_id, sender=site, shares=tuple(sealed))


def check_incoming_shares(state: SiteRoundState, incoming: IncomingShares) -> tuple[str, ...]:
    """Everything ``mask_input`` checks of the forwarded shares (stage, session, recipient, decryption, U2 of
    at least t), without the update: a site runs it before it trains, so shares it will refuse never cost a
    round of privacy budget. Returns U2 as this site sees it."""
    return _opened_shares(state, incoming)[1]


def _opened_shares(state: SiteRoundState, incoming: IncomingShares) -> tuple[dict[str, HeldShares], tuple[str, ...]]:
    """The decrypted shares received and U2 (this site and the senders), after every check of Round 2."""
    _require(state, SiteStage.KEYS_SHARED, "mask_input", incoming)
    if incoming.recipient != state.site_id:
        raise SecAggProtocolError(
            f"IncomingShares.recipient is {incoming.recipient!r}, not this site {state.site_id!r}"
        )
    received = _open_incoming(state, incoming)
    masked_with = state.context.roster.ordered({state.site_id, *received})
    state.context.require_holders(state.site_id, masked_with, what="shared their keys (U2)")
    return received, masked_with


def mask_input(
    state: SiteRoundState, incoming: IncomingShares, update: np.ndarray
) -> tuple[SiteRoundState, MaskedInput]:
    """Round 2 (MaskedInputCollection): decrypt the shares received (they define U2 for this site),
    then send y_u = x_u + PRG(b_u) + sum_{v in U2} Delta_{u,v} PRG(s_{u,v})  (mod 2^k).

    ``update`` is the float (already DP-noised) update, shape (vector_length,).
    """
    context, site = state.context, state.site_id
    received, masked_with = _opened_shares(state, incoming)
    if getattr(update, "shape", None) != (context.config.vector_length,):
        raise SecAggProtocolError(
            f"the update has shape {getattr(update, 'shape', None)}, the session sums vectors of shape "
            f"({context.config.vector_length},): flatten the trainable parameters in the agreed order"
        )
    codes = context.encoding.encode(update, rounding_seed=state.rounding_seed)
    _add_masks(state, codes, masked_with)
    new_state = state.advance(
        SiteStage.INPUT_MASKED, held_shares={**state.held_shares, **received}, masked_with=masked_with
    )
    return new_state, MaskedInput(session_id=context.session_id, sender=site, vector=codes.tobytes())


def consistency_check(
    state: SiteRoundState, survivors: Survivors, *, identity_key: Ed25519PrivateKey
) -> tuple[SiteRoundState, SurvivorSignature]:
    """Round 3 (ConsistencyCheck): check U3 and sign it. The signature commits this site to one
    survivor list, so an aggregator cannot show different lists to different sites (§6, active
    adversaries)."""
    _require(state, SiteStage.INPUT_MASKED, "consistency_check", survivors)
    context, site = state.context, state.site_id
    _check_identity(context, site, identity_key)
    survivor_ids = _checked_survivors(state, survivors.survivors)
    signature = sign(identity_key, survivors_transcript(context.digest, site, survivor_ids))
    new_state = state.advance(SiteStage.SURVIVORS_SIGNED, signed_survivors=survivor_ids)
    return new_state, SurvivorSignature(session_id=context.session_id, sender=site, signature=signature)


def unmask(state: SiteRoundState, signed: SignedSurvivors) -> tuple[SiteRoundState, UnmaskShares]:
    """Round 4 (Unmasking): after checking >= t signatures on the U3 this site signed, reveal for
    each owner v whose shares it holds the share of b_v if v in U3, else the share of s_v^SK.

    Never both for one v: with b_v and s_v^SK the aggregator could strip every mask from y_v.
    """
    _require(state, SiteStage.SURVIVORS_SIGNED, "unmask", signed)
    context = state.context
    if signed.survivors != state.signed_survivors:
        raise SecAggProtocolError(
            "SignedSurvivors.survivors differs from the survivor list this site signed in ConsistencyCheck: "
            "the aggregator is showing sites different lists; refuse to unmask"
        )
    signers = _verified_signers(state, signed)
    reveal = _choose_reveals(state)
    for owner in reveal:
        context.require_holders(owner, signers, what="signed the survivor list (U4)")
    message = UnmaskShares(
        session_id=context.session_id,
        sender=state.site_id,
        self_mask_shares=_revealed(state, reveal, ShareKind.SELF_MASK),
        mask_key_shares=_revealed(state, reveal, ShareKind.MASK_KEY),
    )
    return state.advance(SiteStage.UNMASKED, revealed={**state.revealed, **reveal}), message


def _require(state: SiteRoundState, stage: SiteStage, action: str, message: _Message) -> None:
    """The transition guard: right stage, and a message of this session (a replay is refused)."""
    if state.stage is not stage:
        raise SecAggStageError(
            f"{action} needs a site at stage {stage.value!r}, but {state.site_id} is at {state.stage.value!r}: "
            "stages run AdvertiseKeys, ShareKeys, MaskedInput, ConsistencyCheck, Unmask, once each"
        )
    if message.session_id != state.context.session_id:
        raise SecAggProtocolError(
            f"{type(message).__name__}.session_id {message.session_id!r} is not this round's session "
            f"{state.context.session_id!r}: a message from another round (replayed?) is refused"
        )


def _check_identity(context: RoundContext, site_id: str, identity_key: Ed25519PrivateKey) -> None:
    if site_id not in context.roster:
        raise SecAggConfigError(
            f"{site_id!r} is not in the roster; the admins must pin its identity key first"
        )
    if identity_public_key(identity_key) != context.roster.identity_key(site_id):
        raise SecAggConfigError(
            f"the identity key given for {site_id} is not the one pinned in the roster: "
            "load the site's own identity key, or re-pin it with the other admins"
        )


def _own_keys(state: SiteRoundState) -> PeerKeys:
    return PeerKeys(public_key_of(state.cipher_secret_key), public_key_of(state.mask_secret_key))


def _verified_round_keys(state: SiteRoundState, round_keys: RoundKeys) -> dict[str, PeerKeys]:
    """U1's keys in roster order, after checking order, session, signatures, our own entry, and that
    all keys are distinct (Figure 4, Round 1 requires every advertised key pair to differ)."""
    context = state.context
    _check_order(context, [advert.sender for advert in round_keys.keys], what="RoundKeys.keys")
    peers: dict[str, PeerKeys] = {}
    for advert in round_keys.keys:
        if advert.session_id != context.session_id:
            raise SecAggProtocolError(
                f"RoundKeys: the keys of {advert.sender} are from session {advert.session_id!r}"
            )
        message = advertise_transcript(
            context.digest, advert.sender, advert.cipher_public_key, advert.mask_public_key
        )
        verify_signature(
            context.roster.identity_key(advert.sender),
            advert.signature,
            message,
            what=f"the keys of {advert.sender}",
        )
        peers[advert.sender] = PeerKeys(advert.cipher_public_key, advert.mask_public_key)
    if peers.get(state.site_id) != _own_keys(state):
        raise SecAggProtocolError(
            f"RoundKeys does not carry {state.site_id}'s own advertised keys unchanged: refuse this broadcast"
        )
    all_keys = [key for keys in peers.values() for key in (keys.cipher_public_key, keys.mask_public_key)]
    if len(set(all_keys)) != len(all_keys):
        raise SecAggProtocolError("RoundKeys: two advertised public keys are equal; every key must be fresh")
    return peers


def _check_order(context: RoundContext, sites: list[str], *, what: str) -> None:
    """Refuse unknown sites, duplicates and any order but the roster's (a reordered list)."""
    positions = [context.roster.position(site) for site in sites]
    if any(later <= earlier for earlier, later in zip(positions, positions[1:], strict=False)):
        raise SecAggProtocolError(
            f"{what} must list distinct sites in roster order, got {sites}: a reordered or duplicated entry"
        )


def _transport_key(state: SiteRoundState, sender: str, recipient: str, peer: PeerKeys) -> bytes:
    label = transcript("secagg/share-transport", sender=sender, recipient=recipient)
    return agree(state.cipher_secret_key, peer.cipher_public_key, salt=state.context.digest, info=label)


def _shares_aad(state: SiteRoundState, sender: str, recipient: str) -> bytes:
    """Associated data of e_{u,v}: binds the ciphertext to u, v and the session (the u || v of §4)."""
    return transcript(
        "secagg/encrypted-shares", session=state.context.digest.hex(), sender=sender, recipient=recipient
    )


def _seal_for(state: SiteRoundState, holder: str, peer: PeerKeys, plaintext: bytes) -> EncryptedShares:
    key = _transport_key(state, state.site_id, holder, peer)
    sealed = seal(key, plaintext, associated_data=_shares_aad(state, state.site_id, holder))
    return EncryptedShares(sender=state.site_id, recipient=holder, ciphertext=sealed)


def _open_incoming(state: SiteRoundState, incoming: IncomingShares) -> dict[str, HeldShares]:
    """Decrypt e_{v,u} from each sender v; senders must be this site's holders in U1, in roster order."""
    senders = [item.sender for item in incoming.shares]
    _check_order(state.context, senders, what="IncomingShares.shares")
    received: dict[str, HeldShares] = {}
    for item in incoming.shares:
        if item.sender == state.site_id or item.sender not in state.peer_keys:
            raise SecAggProtocolError(
                f"IncomingShares: {item.sender} is not a peer this site shares with in this session (not in U1)"
            )
        key = _transport_key(state, item.sender, state.site_id, state.peer_keys[item.sender])
        aad = _shares_aad(state, item.sender, state.site_id)
        plaintext = open_sealed(
            key, item.ciphertext, associated_data=aad, what=f"the shares from {item.sender}"
        )
        received[item.sender] = HeldShares(
            mask_key=share_from_bytes(plaintext[:SHARE_BYTES]),
            self_mask=share_from_bytes(plaintext[SHARE_BYTES:]),
        )
    return received


def _add_masks(state: SiteRoundState, codes: np.ndarray, masked_with: tuple[str, ...]) -> None:
    """codes += PRG(b_u) + sum_v Delta_{u,v} PRG(s_{u,v}), in place (Figure 4, Round 2)."""
    context, site = state.context, state.site_id
    add = [self_mask_seed(context, site, state.self_mask_seed)]
    subtract: list[bytes] = []
    for peer in masked_with:
        if peer != site:
            seed = pairwise_mask_seed(
                context, site, peer, state.mask_secret_key, state.peer_keys[peer].mask_public_key
            )
            (add if context.pairwise_sign(site, peer) > 0 else subtract).append(seed)
    apply_masks(codes, add=add, subtract=subtract)


def _checked_survivors(state: SiteRoundState, survivors: tuple[str, ...]) -> tuple[str, ...]:
    """U3 must be in roster order, within U1, contain this site, agree with U2 on this site's
    holders (U3 subset of U2, Figure 4 Round 3) and keep >= t of its holders."""
    context, site = state.context, state.site_id
    _check_order(context, list(survivors), what="Survivors.survivors")
    outside = [
        v
        for v in survivors
        if v not in state.advertised or (v in context.holders[site] and v not in state.masked_with)
    ]
    if outside:
        raise SecAggProtocolError(
            f"Survivors lists {outside}, which did not share keys with this site (U3 must be within U2)"
        )
    if site not in survivors:
        raise SecAggProtocolError(
            f"Survivors omits {site}, which sent its masked input: the aggregator claims a live site dropped; refuse"
        )
    context.require_holders(site, survivors, what="sent masked inputs (U3)")
    return survivors


def _verified_signers(state: SiteRoundState, signed: SignedSurvivors) -> list[str]:
    """U4: signers in roster order, within U3, each signature valid over this session's U3."""
    context = state.context
    signers = [item.sender for item in signed.signatures]
    _check_order(context, signers, what="SignedSurvivors.signatures")
    for item in signed.signatures:
        if item.session_id != context.session_id:
            raise SecAggProtocolError(
                f"SignedSurvivors: the signature of {item.sender} is from session {item.session_id!r}"
            )
        if item.sender not in signed.survivors:
            raise SecAggProtocolError(
                f"SignedSurvivors: {item.sender} signed but is not in U3 (U4 must be within U3)"
            )
        message = survivors_transcript(context.digest, item.sender, signed.survivors)
        verify_signature(
            context.roster.identity_key(item.sender),
            item.signature,
            message,
            what=f"the survivor list signed by {item.sender}",
        )
    return signers


def _choose_reveals(state: SiteRoundState) -> dict[str, ShareKind]:
    """For each owner whose shares this site holds: b-share if it survived, s^SK-share if it dropped.
    Refuses if an earlier Unmask (recorded in the state) revealed the other kind for that owner."""
    survivors = state.signed_survivors or ()
    reveal = {}
    for owner in state.context.roster.ordered(state.held_shares):
        kind = ShareKind.SELF_MASK if owner in survivors else ShareKind.MASK_KEY
        earlier = state.revealed.get(owner)
        if earlier is not None and earlier is not kind:
            raise SecAggRevealError(
                f"refusing to reveal the {kind.value} share of {owner}: this site already revealed its "
                f"{earlier.value} share, and both together would unmask {owner}'s input"
            )
        reveal[owner] = kind
    return reveal


def _revealed(
    state: SiteRoundState, reveal: dict[str, ShareKind], kind: ShareKind
) -> tuple[RevealedShare, ...]:
    shares = []
    for owner, chosen in reveal.items():
        if chosen is kind:
            held = state.held_shares[owner]
            value = held.self_mask if kind is ShareKind.SELF_MASK else held.mask_key
            shares.append(RevealedShare(owner=owner, share=share_to_bytes(value)))
    return tuple(shares)
