"""A lying aggregator: it claims a live site dropped, shows sites different survivor lists,
substitutes keys, replays an earlier round. It must learn nothing beyond the sum."""

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import chisquare

from bench.secagg_local import InMemorySession
from policies.secagg import (
    AdvertiseKeys,
    Roster,
    RoundContext,
    RoundKeys,
    SecAggProtocolError,
    SecAggRevealError,
    SecAggSignatureError,
    SecAggStageError,
    SecAggThresholdError,
    SecureSumConfig,
    ShareKind,
    SignedSurvivors,
    SiteRoundState,
    Survivors,
    consistency_check,
    mask_input,
    share_keys,
    unmask,
)
from policies.secagg.crypto import apply_masks
from policies.secagg.masks import pairwise_mask_seed, self_mask_seed
from policies.secagg.shamir import reconstruct, share_from_bytes

pytestmark = pytest.mark.unit

D = 1 << 16  # enough bytes for a chi-square test on the victim's residual
VICTIM = "site-02"


def federation(n=5, *, threshold=3, session="run-1/round-3"):
    keys = {f"site-{i:02d}": Ed25519PrivateKey.generate() for i in range(n)}
    roster = Roster.of((site, key.public_key().public_bytes_raw()) for site, key in keys.items())
    config = SecureSumConfig(vector_length=D, clip=1.0, quantisation_bits=16, threshold=threshold)
    return RoundContext(config, roster, session), keys


def masked_session(context, keys):
    """Every site through MaskedInput; returns the session, each site's state and its masked input."""
    updates = {site: np.full(D, 0.25, dtype=np.float32) for site in context.roster.site_ids}
    session = InMemorySession(context, keys, updates)
    inboxes = session.share_keys(session.advertise_keys())
    states, masked = {}, {}
    for site in context.roster.site_ids:
        states[site], masked[site] = mask_input(session.state(site), inboxes[site], updates[site])
    return session, states, masked


def sign_all(context, keys, states, survivors, sites):
    signatures = []
    for site in sites:
        states[site], signature = consistency_check(states[site], survivors, identity_key=keys[site])
        signatures.append(signature)
    return SignedSurvivors(context.session_id, survivors.survivors, tuple(signatures))


def test_aggregator_claiming_a_live_site_dropped_gets_its_mask_key_but_never_its_self_mask():
    # Prepare: all five sites sent masked inputs; the aggregator lies that the victim dropped
    context, keys = federation()
    session, states, masked = masked_session(context, keys)
    others = [s for s in context.roster.site_ids if s != VICTIM]
    lie = Survivors(context.session_id, tuple(others))
    signed_lie = sign_all(context, keys, states, lie, others)

    # Execute: the honest sites unmask against the lie, then are asked again with the victim listed
    revealed = {}
    for site in others:
        states[site], revealed[site] = unmask(states[site], signed_lie)
    truth = SignedSurvivors(context.session_id, context.roster.site_ids, signed_lie.signatures)
    for site in others:
        restored = SiteRoundState.from_bytes(states[site].to_bytes())  # a restart in between
        with pytest.raises(SecAggStageError, match="needs a site at stage 'survivors-signed'"):
            unmask(restored, truth)

    # Assert: the victim refuses to sign a list without itself, the others revealed only s^SK shares of it
    with pytest.raises(SecAggProtocolError, match="claims a live site dropped"):
        consistency_check(states[VICTIM], lie, identity_key=keys[VICTIM])
    assert all(VICTIM not in [r.owner for r in m.self_mask_shares] for m in revealed.values())
    key_shares = {
        context.roster.share_x(site): share_from_bytes(r.share)
        for site, m in revealed.items()
        for r in m.mask_key_shares
        if r.owner == VICTIM
    }
    mask_key = reconstruct(key_shares, threshold=3)
    assert mask_key == states[VICTIM].mask_secret_key  # the aggregator does rebuild the mask key ...
    residual = _strip_pairwise_masks(context, session, masked[VICTIM], mask_key)
    assert (
        chisquare(np.bincount(residual.view(np.uint8), minlength=256)).pvalue > 1e-6
    )  # ... but y - pairwise is uniform
    self_mask = self_mask_seed(context, VICTIM, states[VICTIM].self_mask_seed)
    apply_masks(residual, add=[], subtract=[self_mask])  # only b_victim, which it never got, would unmask
    np.testing.assert_array_equal(
        residual, context.encoding.encode(np.full(D, 0.25), rounding_seed=states[VICTIM].rounding_seed)
    )


def _strip_pairwise_masks(context, session, masked, mask_key):
    """What the lying aggregator can compute: y_victim minus every pairwise mask of the victim."""
    residual = np.frombuffer(masked.vector, dtype="<u4").copy()
    add, subtract = [], []
    for peer in context.neighbours(VICTIM):
        public = session.aggregator._keys[peer].mask_public_key
        seed = pairwise_mask_seed(context, VICTIM, peer, mask_key, public)
        (subtract if context.pairwise_sign(VICTIM, peer) > 0 else add).append(seed)
    apply_masks(residual, add=add, subtract=subtract)
    return residual


def test_a_restored_state_that_revealed_a_mask_key_share_refuses_the_self_mask_share():
    # Prepare: a site's persisted state records that it revealed the victim's mask-key share
    context, keys = federation()
    _, states, _ = masked_session(context, keys)
    survivors = Survivors(context.session_id, context.roster.site_ids)
    signed = sign_all(context, keys, states, survivors, context.roster.site_ids)
    recorded = dataclasses.replace(states["site-00"], revealed={VICTIM: ShareKind.MASK_KEY})
    restored = SiteRoundState.from_bytes(recorded.to_bytes())

    # Execute / Assert
    with pytest.raises(SecAggRevealError, match=f"refusing to reveal the self-mask share of {VICTIM}"):
        unmask(restored, signed)


def test_split_survivor_lists_cannot_both_reach_the_threshold():
    # Prepare: sites 00, 01 and the victim see the truth; sites 03, 04 are told the victim dropped
    context, keys = federation()
    _, states, _ = masked_session(context, keys)
    truth = Survivors(context.session_id, context.roster.site_ids)
    lie = Survivors(context.session_id, tuple(s for s in context.roster.site_ids if s != VICTIM))
    signed_truth = sign_all(context, keys, states, truth, ["site-00", "site-01", VICTIM])
    signed_lie = sign_all(context, keys, states, lie, ["site-03", "site-04"])
    padded_lie = dataclasses.replace(
        signed_lie, signatures=signed_truth.signatures[:2] + signed_lie.signatures
    )

    # Execute / Assert: the lie gathers 2 < t = 3 signatures, and signatures over the truth do not count
    with pytest.raises(
        SecAggThresholdError, match="only 2 of the sites holding shares of site-00 signed the survivor list"
    ):
        unmask(states["site-03"], signed_lie)
    with pytest.raises(
        SecAggSignatureError, match="survivor list signed by site-00 has a signature that does not"
    ):
        unmask(states["site-03"], padded_lie)


def test_substituted_round_keys_are_refused_by_sites_and_aggregator():
    # Prepare: the aggregator swaps site-01's mask key for one it generated
    context, keys = federation(3, threshold=2)
    session = InMemorySession(context, keys, {s: np.zeros(D, np.float32) for s in context.roster.site_ids})
    round_keys = session.advertise_keys()
    forged = dataclasses.replace(
        round_keys.keys[1], mask_public_key=round_keys.keys[2].cipher_public_key[::-1]
    )
    substituted = RoundKeys(context.session_id, (round_keys.keys[0], forged, round_keys.keys[2]))

    # Execute / Assert
    with pytest.raises(
        SecAggSignatureError, match="the keys of site-01 has a signature that does not verify"
    ):
        share_keys(session.state("site-00"), substituted)
    fresh = InMemorySession(context, keys, {})
    with pytest.raises(SecAggSignatureError, match="the keys of site-01"):
        fresh.aggregator.receive_advertise_keys(forged)


def test_keys_signed_for_an_earlier_round_cannot_be_replayed_into_this_one():
    # Prepare: site-01's signed keys from round 2, relabelled with round 3's session id
    old_context, keys = federation(3, threshold=2, session="run-1/round-2")
    new_context = RoundContext(old_context.config, old_context.roster, "run-1/round-3")
    old_keys = InMemorySession(old_context, keys, {s: None for s in keys}).advertise_keys()
    new_keys = InMemorySession(new_context, keys, {s: None for s in keys})
    new_keys.advertise_keys()
    relabelled = dataclasses.replace(old_keys.keys[1], session_id=new_context.session_id)
    replayed = RoundKeys(new_context.session_id, (new_keys.aggregator._keys["site-00"], relabelled))

    # Execute / Assert
    with pytest.raises(SecAggSignatureError, match="keys of site-01 has a signature that does not verify"):
        share_keys(new_keys.state("site-00"), replayed)
    with pytest.raises(SecAggProtocolError, match="another round"):
        share_keys(new_keys.state("site-00"), old_keys)


def test_the_aggregator_cannot_rebuild_a_survivors_mask_key_below_threshold():
    # Prepare: the shares of the victim's mask key that 2 < t = 3 sites hold
    context, keys = federation()
    _, states, _ = masked_session(context, keys)
    held = {context.roster.share_x(s): states[s].held_shares[VICTIM].mask_key for s in ("site-00", "site-01")}

    # Execute / Assert
    with pytest.raises(SecAggThresholdError, match="only 2 shares for a 3-of-n secret"):
        reconstruct(held, threshold=3)


def test_advertised_keys_carry_a_signature_the_aggregator_checks():
    # Prepare: an unsigned advertisement (all-zero signature)
    context, keys = federation(3, threshold=2)
    session = InMemorySession(context, keys, {})
    advert = InMemorySession(context, keys, {s: None for s in keys}).advertise_keys().keys[0]
    unsigned = AdvertiseKeys(
        advert.session_id, advert.sender, advert.cipher_public_key, advert.mask_public_key, bytes(64)
    )

    # Execute / Assert
    with pytest.raises(SecAggSignatureError, match="the keys of site-00 is unsigned"):
        session.aggregator.receive_advertise_keys(unsigned)
