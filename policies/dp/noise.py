"""Randomness: the DP-SGD noise and the Poisson sampling, from a CSPRNG nothing in the process can seed.

The researcher's code runs in the site's process before training (it builds the model), so it can
seed or read torch's default generator; and torch's generators (MT19937 on the CPU, Philox on CUDA)
are not cryptographic: a few outputs or the seed give away every later one. With secure_mode (every
plan's default) no torch generator draws the noise or the batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from policies.dp.plan import DPPlanError

# Coordinates per key-stream request: 2 MiB of key stream and 3.5 MiB of float64 work arrays, made once
# per sampler (arrays allocated per call ran at a fifth of the speed here: fresh pages every call).
NOISE_CHUNK = 1 << 16
_AES_BLOCK = 16  # bytes; Cipher.update_into wants this much headroom beyond the input


class AesCtrRandomStream:
    """Uniform random bits: the AES-256-CTR key stream under a fresh key and counter from ``os.urandom``.

    AES in counter mode under a secret 256-bit key is a pseudorandom generator: its output cannot be
    told from uniform bits without the key, up to the birthday bound of ~2^64 blocks (a round on full
    MiniLM draws ~2^25 blocks per step). The key lives only in this object (OpenSSL's cipher context,
    through ``cryptography``), is drawn from the kernel's CSPRNG when the object is made, and is never
    written anywhere. Key stream runs at ~5 GB/s with AES-NI; ``os.urandom`` itself at ~0.3 GB/s.
    Not thread-safe: one stream per sampler.
    """

    def __init__(self) -> None:
        self._encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
        self._zeros = np.zeros(0, dtype=np.uint8)  # plaintext: the cipher text of zeros is the key stream
        self._stream = np.empty(0, dtype=np.uint8)  # reused between calls (fresh pages cost more than AES)

    def _key_stream(self, count: int) -> np.ndarray:
        """The next ``count`` key-stream words, in this stream's buffer (overwritten by the next call): uint64 [count]."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        size = 8 * count
        if self._zeros.size < size:
            self._zeros = np.zeros(size, dtype=np.uint8)
            self._stream = np.empty(size + _AES_BLOCK - 1, dtype=np.uint8)
        written = self._encryptor.update_into(self._zeros.data[:size], self._stream.data)  # .data: memoryviews
        if written != size:
            raise RuntimeError(f"AES-CTR wrote {written} bytes of key stream, {size} were asked for")
        return self._stream[:size].view(np.uint64)

    def words(self, count: int) -> np.ndarray:
        """``count`` independent uniform 64-bit words: uint64 [count]."""
        return self._key_stream(count).copy()

    def uniform53(self, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """``count`` independent uniforms on the grid {0, 1, ..., 2^53 - 1} * 2^-53 in [0, 1): float64 [count].

        The top 53 bits of each word: a double's whole significand, so every value, and ``1 - u`` in
        (0, 1], is exact. Written into ``out`` (float64, at least ``count`` long) when given.
        """
        words = self._key_stream(count)
        words >>= np.uint64(11)
        target = np.empty(count, dtype=np.float64) if out is None else out[:count]
        np.multiply(words, 2.0**-53, out=target)  # uint64 < 2^53 to float64 is exact, so is the power of two
        return target


class UniformSource(Protocol):
    """What the samplers below draw from (``AesCtrRandomStream``; a stub in the tests)."""

    def uniform53(self, count: int, out: np.ndarray | None = None) -> np.ndarray: ...


class SecureGaussianNoise:
    """N(0, std^2) noise from a CSPRNG, summed so as to resist the floating-point attacks on samplers.

    Each coordinate is ``(z1 + z2 + z3 + z4) * std / 2`` with z_i independent N(0, 1), so its variance
    is 4 * std^2 / 4 = std^2. Each z_i is a Box-Muller draw (Box & Muller 1958):
    ``z = sqrt(-2 ln(1 - u1)) * cos(2 pi u2)`` and its twin ``... * sin(2 pi u2)``, u1, u2 uniform on the
    53-bit grid (``AesCtrRandomStream.uniform53``), computed in float64 and rounded once to the
    gradient's dtype at the end.

    Notes
    -----
    Why a sum of four. Mironov (CCS 2012, "On significance of the least significant bits for
    differential privacy") showed that a textbook floating-point sampler reaches only a sparse set of
    doubles, a set that depends on the value the noise is added to, so one output can reveal the
    input. Jin, McMurtry, Rubinstein & Ohrimenko (IEEE S&P 2022, "Are we there yet? Timing and
    floating-point attacks on differential privacy systems") carried the attack to Gaussian samplers,
    Opacus's among them. Holohan & Braghin (ESORICS 2021, "Secure random sampling in differential
    privacy", Section 5.1) defend by summing 2n independent draws: inverting the sum costs 2^(53(2n-1))
    guesses, 2^159 for n = 2. Opacus's ``secure_mode`` does the same with torch's generators
    (``opacus.optimizers.optimizer._generate_noise``); here the bits come from AES-CTR instead.

    Box-Muller has no rejection loop: the time taken depends on the number of coordinates only, never
    on the values drawn (the timing channel of Jin et al. is in samplers whose loop count depends on
    the output). One draw's radius is at most sqrt(2 * 53 ln 2) = 8.57, so the sum is bounded by
    17.1 std; a Gaussian puts ~1e-65 of its mass beyond that, nothing a delta of 1e-5 would notice.

    Not thread-safe: the sampler reuses its work arrays between calls (one sampler per optimizer).
    """

    def __init__(self, source: UniformSource | None = None) -> None:
        self.source: UniformSource = source if source is not None else AesCtrRandomStream()
        self._uniforms = np.empty(4 * NOISE_CHUNK, dtype=np.float64)  # radius then angle uniforms of a chunk
        self._cosines = np.empty(2 * NOISE_CHUNK, dtype=np.float64)
        self._sums = np.empty(NOISE_CHUNK, dtype=np.float64)

    def sample(self, std: float, *, like: torch.Tensor) -> torch.Tensor:
        """Noise with ``like``'s shape, dtype and device, each coordinate N(0, std^2)."""
        if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) or std < 0:
            raise DPPlanError(f"noise std must be a finite number >= 0, got {std!r}")
        if std == 0:
            return torch.zeros_like(like)
        count = like.numel()
        # float64 sums, rounded once to the gradient's dtype (numpy has no bfloat16: those round in torch)
        dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(like.dtype, np.float64)
        flat = np.empty(count, dtype=dtype)  # [numel]
        for start in range(0, count, NOISE_CHUNK):
            stop = min(start + NOISE_CHUNK, count)
            np.multiply(self._sum_of_four_normals(stop - start), std / 2.0, out=flat[start:stop], casting="same_kind")
        return torch.from_numpy(flat).to(like.dtype).reshape(like.shape).to(like.device)

    def _sum_of_four_normals(self, count: int) -> np.ndarray:
        """z1 + z2 + z3 + z4 for each of ``count`` <= NOISE_CHUNK coordinates, the z's independent N(0, 1).

        Returns float64 [count], a view of the work arrays (valid until the next call). 2m Box-Muller
        pairs (m = max(count, 2)) give 4m normals. The two halves of a pair share their radius, so both
        must never land in one coordinate (their sum would be one draw in disguise): coordinate c gets
        the cosine halves of pairs c and m + c and the sine halves of pairs c - 1 and m + c - 1 (mod m),
        four different pairs since m >= 2.
        """
        m = max(count, 2)
        u = self.source.uniform53(4 * m, out=self._uniforms)  # [4m]: 2m radius uniforms, then 2m angle uniforms
        radius, angle = u[: 2 * m], u[2 * m : 4 * m]  # [2m] each, pair j = (radius[j], angle[j])
        np.subtract(1.0, radius, out=radius)  # (0, 1], exact
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle *= 2.0 * np.pi
        cosines = self._cosines[: 2 * m]
        np.cos(angle, out=cosines)
        sines = np.sin(angle, out=angle)
        cosines *= radius  # [2m]: z of pair j
        sines *= radius  # [2m]: its twin
        total = self._sums[:m]
        np.add(cosines[:m], cosines[m:], out=total)  # [m]: pairs c and m + c
        sine_sums = sines[:m]
        sine_sums += sines[m:]  # [m]: pairs j and m + j, for coordinate j + 1 (mod m)
        total[1:] += sine_sums[:-1]
        total[0] += sine_sums[-1]
        return total[:count]


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampling, each record in each batch independently with probability q, from a CSPRNG.

    Record i is in a batch when u_i < q, u_i uniform on the 53-bit grid: probability ceil(q 2^53) / 2^53,
    within 2^-53 of q. Opacus's own sampler compares ``torch.rand`` with q the same way.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, source: UniformSource) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=None)
        self.source = source

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(self.source.uniform53(self.num_samples) < self.sample_rate).tolist()
