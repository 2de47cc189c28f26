"""Fixed-point encoding of a float update into Z_(2^k), and decoding of the sum.

SecAgg sums elements of Z_R (Bonawitz et al. 2017, §3 and §4: inputs x_u in Z_R^m, R = 2^k here).
A site clamps each coordinate to [-c, c], maps it affinely onto [0, L] with L = 2^b - 1 levels and
rounds stochastically:

    z = (clamp(x, -c, c) + c) * L / (2c),   q = floor(z) + [u < z - floor(z)],  u ~ U[0, 1)

so E[q] = z (unbiased) and |q - z| < 1, i.e. the error per coordinate is below one step 2c / L.
The sum of n encoded inputs is at most n * L; requiring n * L <= 2^k - 1 (headroom, checked with
a clear error) makes the modular sum equal the integer sum, and the aggregator decodes

    sum_u clamp(x_u) ~= S * 2c / L - m * c   for m participating sites,

with |error| < m * 2c / L per coordinate. The uniforms u come from an AES-CTR keystream seeded by
the site's secret rounding seed, so a re-run of the same stage rounds identically (two different
roundings of one update under the same masks would reveal their difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.secagg.crypto import MASK_CHUNK_BYTES, Keystream
from policies.secagg.errors import EncodingOverflowError, SecAggProtocolError

_UINT64 = np.dtype("<u8")
_BLOCK = MASK_CHUNK_BYTES // 8  # coordinates per block: one keystream block of 64-bit uniforms
_TWO_TO_53 = float(2**53)


@dataclass(frozen=True)
class FixedPointEncoding:
    """Clamp to [-clip, clip], quantise to 2^b levels, sum in Z_(2^k)."""

    clip: float  # c: the clamping range [-c, c]
    quantisation_bits: int  # b: L = 2^b - 1 is the largest code of one site
    modulus_bits: int  # k: 32 or 64

    @property
    def levels(self) -> int:
        return (1 << self.quantisation_bits) - 1

    @property
    def step(self) -> float:
        """Width 2c / L of one quantisation step: the bound on one site's rounding error."""
        return 2.0 * self.clip / self.levels

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u4") if self.modulus_bits == 32 else np.dtype("<u8")

    def check_headroom(self, n_sites: int) -> None:
        """Refuse parameters whose n-site sum could wrap mod 2^k (it would decode to garbage)."""
        if n_sites * self.levels <= (1 << self.modulus_bits) - 1:
            return
        most = max_quantisation_bits(n_sites, self.modulus_bits)
        raise EncodingOverflowError(
            f"quantisation_bits={self.quantisation_bits} leaves no headroom for {n_sites} sites in modulus "
            f"2^{self.modulus_bits}: {n_sites} * (2^{self.quantisation_bits} - 1) > 2^{self.modulus_bits} - 1; "
            f"use quantisation_bits <= {most} or modulus_bits=64"
        )

    def encode(self, update: np.ndarray, *, rounding_seed: bytes) -> np.ndarray:
        """Quantise a float update to codes in [0, L], shape (d,) -> (d,) words of ``self.dtype``."""
        _check_update(update)
        codes = np.empty(update.size, dtype=self.dtype)
        uniforms = Keystream(rounding_seed)
        scaled = np.empty(_BLOCK, dtype=np.float64)
        floor = np.empty(_BLOCK, dtype=np.float64)
        for start in range(0, update.size, _BLOCK):
            stop = min(start + _BLOCK, update.size)
            count = stop - start
            words = uniforms.next_words(count, _UINT64)
            codes[start:stop] = self._round_block(update[start:stop], words, scaled[:count], floor[:count])
        return codes

    def _round_block(
        self, x: np.ndarray, words: np.ndarray, scaled: np.ndarray, floor: np.ndarray
    ) -> np.ndarray:
        """Stochastic rounding of one block; ``scaled`` and ``floor`` are scratch of x's shape."""
        np.clip(x, -self.clip, self.clip, out=scaled)
        scaled += self.clip
        scaled *= self.levels / (2.0 * self.clip)  # z in [0, L]
        np.floor(scaled, out=floor)
        scaled -= floor  # the exact fractional part z - floor(z) in [0, 1)
        scaled *= _TWO_TO_53
        # u < frac  <=>  (word >> 11) < frac * 2^53, both sides exact in float64 (53-bit uniforms)
        floor += np.right_shift(words, np.uint64(11)) < scaled
        return floor

    def decode_sum(self, total: np.ndarray, *, n_summands: int) -> np.ndarray:
        """The float64 sum of ``n_summands`` clamped inputs from their modular code sum, shape (d,)."""
        if total.dtype != self.dtype:
            raise SecAggProtocolError(f"decode_sum expects {self.dtype} words, got {total.dtype}")
        self.check_headroom(n_summands)
        decoded = total.astype(np.float64)
        decoded *= self.step
        decoded -= n_summands * self.clip
        return decoded


def max_quantisation_bits(n_sites: int, modulus_bits: int) -> int:
    """The largest b with n * (2^b - 1) <= 2^k - 1: k - ceil(log2 n) or one more."""
    bits = modulus_bits - math.ceil(math.log2(n_sites)) if n_sites > 1 else modulus_bits
    while n_sites * ((1 << (bits + 1)) - 1) <= (1 << modulus_bits) - 1:
        bits += 1
    return bits


def _check_update(update: np.ndarray) -> None:
    """Refuse anything but a finite 1-D float array (NaN would encode to an arbitrary integer)."""
    if not isinstance(update, np.ndarray) or update.ndim != 1 or update.dtype.kind != "f":
        shape = getattr(update, "shape", None)
        dtype = getattr(update, "dtype", type(update).__name__)
        raise SecAggProtocolError(f"the update must be a 1-D float array, got {dtype} with shape {shape}")
    if not np.isfinite(update).all():
        bad = int(np.flatnonzero(~np.isfinite(update))[0])
        raise SecAggProtocolError(
            f"the update has a non-finite value at index {bad}: the DP step must produce finite values"
        )
