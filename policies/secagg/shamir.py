"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Bonawitz et al. 2017 (§3, "Secret Sharing") share each site's mask key s_u^SK and self-mask
seed b_u so that any ``threshold`` holders can rebuild them and fewer learn nothing. Both secrets
are 32 bytes, so they are elements of a field larger than 2^256; we use the Mersenne prime
p = 2^521 - 1 so every 32-byte secret is a field element without reduction. A share is the value
f(x) of a random polynomial of degree t - 1 with f(0) = secret, at a public x >= 1 that the caller
derives from the roster order (site i of the roster holds x = i + 1), never from a site's name.

Coefficients come from ``secrets`` (the OS CSPRNG). Python integers make the arithmetic exact;
with t, n <= a few hundred it costs well under a millisecond per secret.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence

from policies.secagg.errors import SecAggProtocolError, SecAggThresholdError

PRIME = 2**521 - 1  # Mersenne prime M521: the field GF(p) of the shares
SHARE_BYTES = 66  # big-endian encoding of a field element (521 bits -> 66 bytes)
SECRET_BYTES = 32  # the secrets shared here: X25519 private keys and 32-byte seeds


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares f(x) for each ``x`` of a random degree-(threshold - 1) polynomial with f(0) = secret.

    Raises
    ------
    SecAggProtocolError
        When the secret is not 32 bytes, the threshold exceeds the number of holders, or an x is
        repeated or outside [1, p): such shares could not be reconstructed, or would leak.
    """
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise SecAggProtocolError(f"split: the secret must be {SECRET_BYTES} bytes")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise SecAggProtocolError(
            f"split: threshold={threshold} must be in [1, {len(xs)}] (the number of holders)"
        )
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def reconstruct(shares: Mapping[int, int], *, threshold: int) -> bytes:
    """Rebuild the 32-byte secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    Shares beyond the first ``threshold`` (by x) must lie on the same polynomial; a share that does
    not is a corrupted or forged one, and the secret is refused rather than silently wrong.

    Raises
    ------
    SecAggThresholdError
        With fewer than ``threshold`` shares: below t, Shamir's scheme reveals nothing.
    SecAggProtocolError
        When the shares are inconsistent or out of the field.
    """
    if len(shares) < threshold:
        raise SecAggThresholdError(
            f"only {len(shares)} shares for a {threshold}-of-n secret: at least {threshold} holders must respond"
        )
    _check_xs(list(shares))
    points = sorted(shares.items())
    for _, y in points:
        if not 0 <= y < PRIME:
            raise SecAggProtocolError("reconstruct: a share is outside the field GF(2^521 - 1)")
    basis, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise SecAggProtocolError(
                f"reconstruct: the share at x={x} is inconsistent with the others (corrupted)"
            )
    secret = _interpolate(basis, 0)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggProtocolError("reconstruct: the shares do not encode a 32-byte secret (corrupted shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Decode a share, refusing values outside the field (they cannot come from ``split``)."""
    if len(data) != SHARE_BYTES:
        raise SecAggProtocolError(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise SecAggProtocolError("a share is outside the field GF(2^521 - 1): corrupted share")
    return value


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs) or any(isinstance(x, bool) or not 1 <= x < PRIME for x in xs):
        raise SecAggProtocolError(f"share positions must be distinct integers >= 1, got {sorted(xs)}")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """f(x) by Horner's rule, coefficients[0] being f(0)."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """Value at ``at`` of the unique polynomial of degree < len(points) through ``points``.

    Lagrange form f(at) = sum_i y_i w_i prod_{j != i} (at - x_j) with barycentric weights
    w_i = 1 / prod_{j != i} (x_i - x_j), cached per set of positions (every secret of a session is
    shared at the same positions); the products come from prefix and suffix products, so each
    evaluation costs O(t) multiplications and no inversion.
    """
    xs = tuple(x for x, _ in points)
    weights = _barycentric_weights(xs)
    prefix = [1]
    for x in xs:
        prefix.append(prefix[-1] * (at - x) % PRIME)
    total, suffix = 0, 1
    for i in range(len(xs) - 1, -1, -1):
        total = (total + points[i][1] * weights[i] % PRIME * prefix[i] % PRIME * suffix) % PRIME
        suffix = suffix * (at - xs[i]) % PRIME
    return total


@functools.lru_cache(maxsize=256)
def _barycentric_weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    weights = []
    for i, xi in enumerate(xs):
        denominator = 1
        for j, xj in enumerate(xs):
            if i != j:
                denominator = denominator * (xi - xj) % PRIME
        weights.append(pow(denominator, -1, PRIME))
    return tuple(weights)
