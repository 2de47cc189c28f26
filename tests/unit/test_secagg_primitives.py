"""Shamir sharing, the mask generator and the fixed-point encoding, against obviously-correct references."""

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.secagg import (
    EncodingOverflowError,
    FixedPointEncoding,
    SecAggProtocolError,
    SecAggThresholdError,
    max_quantisation_bits,
)
from policies.secagg.crypto import MASK_CHUNK_BYTES, apply_masks
from policies.secagg.shamir import PRIME, reconstruct, share_from_bytes, share_to_bytes, split

pytestmark = pytest.mark.unit

SECRET = bytes(range(32))


# --- Shamir ----------------------------------------------------------------------------------------------


def test_reconstruct_matches_a_hand_computed_polynomial():
    # Prepare: f(x) = s + 2x + 3x^2 over GF(2^521 - 1), evaluated by hand at x = 1, 2, 3, 4
    s = int.from_bytes(SECRET, "big")
    shares = {x: (s + 2 * x + 3 * x * x) % PRIME for x in (1, 2, 3, 4)}

    # Execute
    from_first_three = reconstruct({x: shares[x] for x in (1, 2, 3)}, threshold=3)
    from_all_four = reconstruct(shares, threshold=3)

    # Assert
    assert from_first_three == SECRET
    assert from_all_four == SECRET


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_threshold_subset_of_shares_rebuilds_the_secret(data):
    # Prepare
    n = data.draw(st.integers(2, 20), label="n")
    t = data.draw(st.integers(1, n), label="t")
    secret = data.draw(st.binary(min_size=32, max_size=32), label="secret")
    shares = split(secret, threshold=t, xs=list(range(1, n + 1)))
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True))

    # Execute
    rebuilt = reconstruct({x: shares[x] for x in subset}, threshold=t)

    # Assert
    assert rebuilt == secret


def test_reconstruct_refuses_fewer_than_threshold_shares():
    # Prepare
    shares = split(SECRET, threshold=3, xs=[1, 2, 3, 4, 5])

    # Execute / Assert
    with pytest.raises(SecAggThresholdError, match="only 2 shares for a 3-of-n secret"):
        reconstruct({1: shares[1], 4: shares[4]}, threshold=3)


def test_threshold_minus_one_shares_fit_every_secret():
    # Prepare: t - 1 = 2 shares of a 3-of-5 sharing
    shares = split(SECRET, threshold=3, xs=[1, 2, 3, 4, 5])
    known = {1: shares[1], 2: shares[2]}

    # Execute: adding any claimed secret at x = 0 gives a valid degree-2 polynomial
    other = bytes(32)
    points = [(0, int.from_bytes(other, "big")), *known.items()]
    third = _lagrange(points, 3)

    # Assert: the 2 real shares plus an invented third rebuild the invented secret
    assert reconstruct({**known, 3: third}, threshold=3) == other


def test_reconstruct_refuses_an_inconsistent_extra_share():
    # Prepare
    shares = split(SECRET, threshold=2, xs=[1, 2, 3])
    shares[3] = (shares[3] + 1) % PRIME

    # Execute / Assert
    with pytest.raises(SecAggProtocolError, match="share at x=3 is inconsistent"):
        reconstruct(shares, threshold=2)


@pytest.mark.parametrize(
    ("threshold", "xs", "message"),
    [(4, [1, 2, 3], r"threshold=4 must be in \[1, 3\]"), (2, [1, 1, 2], "distinct"), (2, [0, 1], "distinct")],
)
def test_split_refuses_unusable_parameters(threshold, xs, message):
    with pytest.raises(SecAggProtocolError, match=message):
        split(SECRET, threshold=threshold, xs=xs)


def test_share_bytes_round_trip_and_refuse_values_outside_the_field():
    # Prepare
    value = PRIME - 1

    # Execute
    decoded = share_from_bytes(share_to_bytes(value))

    # Assert
    assert decoded == value
    with pytest.raises(SecAggProtocolError, match="outside the field"):
        share_from_bytes(PRIME.to_bytes(66, "big"))
    with pytest.raises(SecAggProtocolError, match="must be 66 bytes, got 65"):
        share_from_bytes(bytes(65))


def _lagrange(points, at):
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if i != j:
                term = term * (at - xj) * pow(xi - xj, -1, PRIME) % PRIME
        total = (total + term) % PRIME
    return total


# --- mask generator --------------------------------------------------------------------------------------


def test_masks_equal_the_aes_ctr_keystream_across_block_boundaries():
    # Prepare: a length that is not a multiple of the block, and the reference keystream in one call
    seed = os.urandom(32)
    d = MASK_CHUNK_BYTES // 4 * 2 + 7
    reference = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor().update(bytes(4 * d))
    words = np.zeros(d, dtype="<u4")

    # Execute
    apply_masks(words, add=[seed], subtract=[])

    # Assert
    np.testing.assert_array_equal(words, np.frombuffer(reference, dtype="<u4"))


def test_adding_then_subtracting_the_same_masks_restores_the_vector_mod_2_to_the_k():
    # Prepare
    original = np.arange(1000, dtype="<u8") * np.uint64(2**61)
    words = original.copy()
    seeds = [os.urandom(32) for _ in range(3)]

    # Execute
    apply_masks(words, add=seeds, subtract=[])
    masked = words.copy()
    apply_masks(words, add=[], subtract=seeds)

    # Assert
    assert not np.array_equal(masked, original)
    np.testing.assert_array_equal(words, original)


def test_masks_refuse_a_float_vector():
    with pytest.raises(SecAggProtocolError, match="contiguous 1-D <u4 or <u8"):
        apply_masks(np.zeros(4), add=[os.urandom(32)], subtract=[])


# --- encoding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k", "expected"), [(2, 32, 31), (3, 32, 30), (50, 32, 26), (20, 64, 59)])
def test_max_quantisation_bits_leaves_headroom_for_n_sites(n, k, expected):
    # Execute
    bits = max_quantisation_bits(n, k)

    # Assert: n * (2^b - 1) fits in k bits, one more bit would not
    assert bits == expected
    assert n * (2**bits - 1) <= 2**k - 1 < n * (2 ** (bits + 1) - 1)


def test_headroom_check_names_the_fix():
    # Prepare
    encoding = FixedPointEncoding(clip=1.0, quantisation_bits=28, modulus_bits=32)

    # Execute / Assert
    with pytest.raises(EncodingOverflowError, match="no headroom for 50 sites.*quantisation_bits <= 26"):
        encoding.check_headroom(50)


def test_encoding_clamps_and_keeps_codes_in_range():
    # Prepare
    encoding = FixedPointEncoding(clip=0.5, quantisation_bits=8, modulus_bits=32)
    update = np.array([-3.0, -0.5, 0.0, 0.5, 7.0], dtype=np.float32)

    # Execute
    codes = encoding.encode(update, rounding_seed=bytes(32))

    # Assert: the clip ends map to exactly 0 and L = 255
    assert codes.dtype == np.dtype("<u4")
    assert codes.tolist()[:2] == [0, 0]
    assert codes.tolist()[3:] == [255, 255]
    assert codes[2] in (127, 128)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), bits=st.integers(2, 24), seed=st.binary(min_size=32, max_size=32))
def test_decoded_sum_is_within_n_steps_of_the_clamped_float_sum(n, bits, seed):
    # Prepare
    encoding = FixedPointEncoding(clip=1.0, quantisation_bits=bits, modulus_bits=32)
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))  # test data only, never a mask
    updates = rng.uniform(-1.5, 1.5, size=(n, 257)).astype(np.float32)
    codes = [encoding.encode(u, rounding_seed=bytes([i]) + seed[1:]) for i, u in enumerate(updates)]

    # Execute
    total = encoding.decode_sum(np.sum(codes, axis=0, dtype=np.uint64).astype("<u4"), n_summands=n)

    # Assert
    exact = np.clip(updates.astype(np.float64), -1.0, 1.0).sum(axis=0)
    assert np.abs(total - exact).max() < n * encoding.step + 1e-9


def test_stochastic_rounding_is_unbiased():
    # Prepare: 200k copies of a value a third of the way between two levels
    encoding = FixedPointEncoding(clip=1.0, quantisation_bits=4, modulus_bits=32)
    value = -1.0 + encoding.step * (5 + 1 / 3)
    update = np.full(200_000, value, dtype=np.float64)

    # Execute
    codes = encoding.encode(update, rounding_seed=bytes(range(32)))

    # Assert: codes are 5 or 6, and their mean is 5 1/3 within 5 standard errors
    assert set(np.unique(codes).tolist()) == {5, 6}
    standard_error = np.sqrt((1 / 3) * (2 / 3) / update.size)
    assert abs(codes.mean() - (5 + 1 / 3)) < 5 * standard_error


def test_rounding_is_deterministic_per_seed():
    # Prepare
    encoding = FixedPointEncoding(clip=1.0, quantisation_bits=10, modulus_bits=64)
    update = np.linspace(-1, 1, 5000, dtype=np.float32)

    # Execute
    first = encoding.encode(update, rounding_seed=bytes(32))
    again = encoding.encode(update, rounding_seed=bytes(32))
    other = encoding.encode(update, rounding_seed=bytes(31) + b"\x01")

    # Assert
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (np.array([0.0, np.nan], dtype=np.float32), "non-finite value at index 1"),
        (np.array([np.inf], dtype=np.float32), "non-finite value at index 0"),
        (np.zeros((2, 2), dtype=np.float32), "1-D float array"),
        (np.zeros(3, dtype=np.int64), "1-D float array"),
    ],
)
def test_encoding_refuses_non_finite_or_misshapen_updates(update, message):
    encoding = FixedPointEncoding(clip=1.0, quantisation_bits=8, modulus_bits=32)
    with pytest.raises(SecAggProtocolError, match=message):
        encoding.encode(update, rounding_seed=bytes(32))
