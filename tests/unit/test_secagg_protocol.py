"""Whole sessions: the secure sum equals numpy's sum of the quantised inputs, with any dropouts."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.secagg_local import DropPoint, run_in_memory_round
from policies.secagg import Roster, RoundContext, SecAggThresholdError, SecureSumConfig

pytestmark = pytest.mark.unit

D = 64  # vector length: small, since exactness does not depend on it


def federation(n, *, threshold=None, neighbourhood_size=None, modulus_bits=32, quantisation_bits=16):
    keys = {f"site-{i:02d}": Ed25519PrivateKey.generate() for i in range(n)}
    roster = Roster.of((site, key.public_key().public_bytes_raw()) for site, key in keys.items())
    config = SecureSumConfig(
        vector_length=D,
        clip=1.0,
        quantisation_bits=quantisation_bits,
        threshold=threshold or n // 2 + 1,
        modulus_bits=modulus_bits,
        neighbourhood_size=neighbourhood_size,
    )
    return RoundContext(config, roster, "run-1/round-3"), keys


def random_updates(context, seed):
    rng = np.random.default_rng(seed)  # test data only, never a mask
    return {site: rng.uniform(-1.2, 1.2, D).astype(np.float32) for site in context.roster.site_ids}


def quantised_sum(context, outcome, updates, sites):
    """The obviously-correct reference: numpy's sum of each participant's codes, mod 2^k."""
    codes = [
        context.encoding.encode(updates[s], rounding_seed=outcome.states[s].rounding_seed).astype(object)
        for s in sites
    ]
    return np.array(np.sum(codes, axis=0) % 2**context.config.modulus_bits, dtype=context.encoding.dtype)


def survivors_after(context, dropouts, stage):
    return [s for s in context.roster.site_ids if dropouts.get(s, len(DropPoint)) > stage]


def draw_round(data, *, leaving_at_least_t):
    """n in 2..20, t in its allowed range, and which sites drop at which stage: at most n - t of them
    (so >= t sites answer every stage), or more than n - t."""
    n = data.draw(st.integers(2, 20), label="n")
    t = data.draw(st.integers(n // 2 + 1, n), label="t")
    context, keys = federation(n, threshold=t)
    count = data.draw(
        st.integers(0, n - t) if leaving_at_least_t else st.integers(n - t + 1, n), label="drops"
    )
    sites = data.draw(st.permutations(context.roster.site_ids), label="order")[:count]
    points = data.draw(
        st.lists(st.sampled_from(list(DropPoint)), min_size=count, max_size=count), label="points"
    )
    return t, context, keys, dict(zip(sites, points, strict=True))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_secure_sum_is_exact_for_every_dropout_pattern_that_keeps_t_sites(data):
    # Prepare
    t, context, keys, dropouts = draw_round(data, leaving_at_least_t=True)
    updates = random_updates(context, seed=len(context.roster) * 100 + t)

    # Execute
    outcome = run_in_memory_round(context, keys, updates, dropouts=dropouts)

    # Assert: the participants are U3 (still answering at MaskedInput), and the sum is exact
    participants = survivors_after(context, dropouts, DropPoint.MASKED_INPUT)
    assert outcome.result.participants == tuple(participants)
    np.testing.assert_array_equal(
        outcome.result.encoded_sum, quantised_sum(context, outcome, updates, participants)
    )


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_secure_sum_refuses_every_dropout_pattern_that_leaves_fewer_than_t_sites(data):
    # Prepare
    t, context, keys, dropouts = draw_round(data, leaving_at_least_t=False)
    updates = random_updates(context, seed=t)

    # Execute / Assert
    with pytest.raises(SecAggThresholdError, match=f"threshold={t} are needed"):
        run_in_memory_round(context, keys, updates, dropouts=dropouts)


@pytest.mark.parametrize("point", list(DropPoint))
def test_one_site_dropping_at_each_stage_leaves_an_exact_sum(point):
    # Prepare
    context, keys = federation(5, threshold=3)
    updates = random_updates(context, seed=int(point))
    dropouts = {"site-02": point}

    # Execute
    outcome = run_in_memory_round(context, keys, updates, dropouts=dropouts)

    # Assert: a site that sent its masked input (dropping later) is in the sum, one that did not is not
    participants = outcome.result.participants
    assert ("site-02" in participants) == (point >= DropPoint.CONSISTENCY_CHECK)
    np.testing.assert_array_equal(
        outcome.result.encoded_sum, quantised_sum(context, outcome, updates, participants)
    )


def test_decoded_total_is_within_one_step_per_site_of_numpy_sum():
    # Prepare
    context, keys = federation(6, threshold=4)
    updates = random_updates(context, seed=7)

    # Execute
    outcome = run_in_memory_round(context, keys, updates, dropouts={"site-05": DropPoint.MASKED_INPUT})

    # Assert
    clamped = [np.clip(updates[s].astype(np.float64), -1, 1) for s in outcome.result.participants]
    error = np.abs(outcome.result.total - np.sum(clamped, axis=0)).max()
    assert error < len(clamped) * context.encoding.step


def test_64_bit_modulus_sums_exactly():
    # Prepare
    context, keys = federation(4, threshold=3, modulus_bits=64, quantisation_bits=40)
    updates = random_updates(context, seed=64)

    # Execute
    outcome = run_in_memory_round(context, keys, updates, dropouts={"site-00": DropPoint.MASKED_INPUT})

    # Assert
    assert outcome.result.encoded_sum.dtype == np.dtype("<u8")
    expected = quantised_sum(context, outcome, updates, outcome.result.participants)
    np.testing.assert_array_equal(outcome.result.encoded_sum, expected)


def test_refuses_to_unmask_below_threshold():
    # Prepare: 5 sites, t = 3, and 3 of them stop before sending masked inputs
    context, keys = federation(5, threshold=3)
    dropouts = {site: DropPoint.MASKED_INPUT for site in ("site-00", "site-01", "site-02")}

    # Execute / Assert
    with pytest.raises(
        SecAggThresholdError, match="only 2 of the sites holding shares of site-00 sent masked inputs"
    ):
        run_in_memory_round(context, keys, random_updates(context, seed=1), dropouts=dropouts)


@pytest.mark.parametrize("point", list(DropPoint))
def test_secagg_plus_neighbourhoods_sum_exactly_with_a_dropout(point):
    # Prepare: 14 sites, each sharing with 4 neighbours (5 holders, t = 3)
    context, keys = federation(14, threshold=3, neighbourhood_size=4)
    updates = random_updates(context, seed=14)

    # Execute
    outcome = run_in_memory_round(context, keys, updates, dropouts={"site-03": point})

    # Assert
    assert all(len(holders) == 5 for holders in context.holders.values())
    participants = outcome.result.participants
    np.testing.assert_array_equal(
        outcome.result.encoded_sum, quantised_sum(context, outcome, updates, participants)
    )


def test_secagg_plus_refuses_when_a_neighbourhood_falls_below_threshold():
    # Prepare: drop three of site-00's four neighbours before masked input
    context, keys = federation(14, threshold=3, neighbourhood_size=4)
    neighbours = sorted(context.neighbours("site-00"))
    dropouts = {site: DropPoint.MASKED_INPUT for site in neighbours[:3]}

    # Execute / Assert
    with pytest.raises(SecAggThresholdError, match="at least threshold=3 are needed"):
        run_in_memory_round(context, keys, random_updates(context, seed=2), dropouts=dropouts)


def test_secagg_plus_site_work_depends_on_k_not_n():
    # Prepare
    context, _ = federation(20, threshold=4, neighbourhood_size=6)

    # Execute
    degrees = {site: len(context.neighbours(site)) for site in context.roster.site_ids}
    symmetric = all(v in context.neighbours(u) for u in degrees for v in context.neighbours(u))

    # Assert: a 6-regular, symmetric graph (pairwise masks cancel only if both ends add them)
    assert set(degrees.values()) == {6}
    assert symmetric
