"""One site's masked vector is statistically indistinguishable from uniform (Bonawitz et al. 2017, §4:
y_u is a one-time pad of x_u under the self mask and the pairwise masks)."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import chisquare

from bench.secagg_local import InMemorySession
from policies.secagg import Roster, RoundContext, SecureSumConfig, mask_input

pytestmark = pytest.mark.unit

D = 1 << 17  # 131072 coordinates
ALPHA = 1e-6  # false-alarm rate of each chi-square test: a real masking bug gives p ~ 0


def masked_vector(modulus_bits):
    """Site-00's masked input for a constant update (the least random input there is)."""
    keys = {f"site-{i:02d}": Ed25519PrivateKey.generate() for i in range(3)}
    roster = Roster.of((site, key.public_key().public_bytes_raw()) for site, key in keys.items())
    config = SecureSumConfig(
        vector_length=D, clip=1.0, quantisation_bits=16, threshold=2, modulus_bits=modulus_bits
    )
    context = RoundContext(config, roster, "run-1/round-1")
    updates = {site: np.full(D, 0.5, dtype=np.float32) for site in keys}
    session = InMemorySession(context, keys, updates)
    inboxes = session.share_keys(session.advertise_keys())
    _, message = mask_input(session.state("site-00"), inboxes["site-00"], updates["site-00"])
    width = modulus_bits // 8
    return np.frombuffer(message.vector, dtype=np.uint8).reshape(D, width), context, session


def byte_lane_pvalues(lanes):
    """Chi-square p-value of each byte position of the words against 256 equiprobable values."""
    return [chisquare(np.bincount(lanes[:, i], minlength=256)).pvalue for i in range(lanes.shape[1])]


@pytest.mark.parametrize("modulus_bits", [32, 64])
def test_each_byte_lane_of_a_masked_vector_is_uniform(modulus_bits):
    # Prepare / Execute
    lanes, _, _ = masked_vector(modulus_bits)

    # Assert
    assert min(byte_lane_pvalues(lanes)) > ALPHA


def test_top_bits_and_pairs_of_a_masked_vector_are_uniform():
    # Prepare
    lanes, _, _ = masked_vector(32)
    words = lanes.copy().view("<u4").ravel()

    # Execute: the top 10 bits of each word, and consecutive pairs of top nibbles (serial structure)
    top = np.bincount(words >> 22, minlength=1024)
    nibbles = (words >> 28).astype(np.int64)
    pairs = np.bincount(nibbles[:-1] * 16 + nibbles[1:], minlength=256)

    # Assert
    assert chisquare(top).pvalue > ALPHA
    assert chisquare(pairs).pvalue > ALPHA


def test_the_test_detects_an_unmasked_vector():
    # Prepare: the encoded input itself, without masks
    _, context, session = masked_vector(32)
    state = session.state("site-00")
    codes = context.encoding.encode(np.full(D, 0.5, np.float32), rounding_seed=state.rounding_seed)

    # Execute
    pvalues = byte_lane_pvalues(codes.view(np.uint8).reshape(D, 4))

    # Assert: the same test rejects uniformity outright
    assert max(pvalues) < 1e-100
