"""The parameters of one federation's secure sum, fixed by the admins and agreed by every party.

The config travels inside every signed transcript (through the session digest, see
``context.RoundContext``), so a site whose parameters differ from its peers' fails signature
checks at ShareKeys instead of producing a sum that silently decodes wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from policies.secagg.errors import SecAggConfigError, SecAggProtocolError
from policies.secagg.wire import fields, read_int

MODULUS_BITS_CHOICES = (32, 64)  # sums live in Z_(2^k) with k the width of a numpy unsigned word
MAX_QUANTISATION_BITS = 52  # keeps every quantised value exact in float64 during rounding
_WIRE_KEYS = ("vector_length", "clip", "quantisation_bits", "threshold", "modulus_bits", "neighbourhood_size")


@dataclass(frozen=True, kw_only=True)
class SecureSumConfig:
    """Parameters of the secure sum (Bonawitz et al. 2017, §4; Bell et al. 2020 for SecAgg+)."""

    vector_length: int  # d: float32 coordinates summed per round (the trainable parameters); >= 1
    clip: float  # every coordinate is clamped to [-clip, clip] before quantisation; finite, > 0
    quantisation_bits: int  # b: a site's coordinate becomes an integer in [0, 2^b - 1]
    threshold: int  # t: shares needed to rebuild a secret; > half the (neighbourhood) holders
    modulus_bits: int = 32  # k: arithmetic in Z_(2^k); 32 or 64 so numpy's uint wraparound is mod 2^k
    neighbourhood_size: int | None = None  # SecAgg+: even number of neighbours per site; None = all

    def __post_init__(self) -> None:
        _check_int("vector_length", self.vector_length, low=1)
        if isinstance(self.clip, bool) or not isinstance(self.clip, int | float):
            raise SecAggConfigError(f"clip must be a number, got {self.clip!r}")
        if not math.isfinite(self.clip) or self.clip <= 0:
            raise SecAggConfigError(f"clip must be finite and > 0, got {self.clip}: pass e.g. clip=1.0")
        if self.modulus_bits not in MODULUS_BITS_CHOICES or isinstance(self.modulus_bits, bool):
            raise SecAggConfigError(
                f"modulus_bits must be one of {MODULUS_BITS_CHOICES}, got {self.modulus_bits!r}"
            )
        top = min(self.modulus_bits - 1, MAX_QUANTISATION_BITS)
        _check_int("quantisation_bits", self.quantisation_bits, low=1, high=top)
        _check_int("threshold", self.threshold, low=2)
        if self.neighbourhood_size is not None:
            _check_int("neighbourhood_size", self.neighbourhood_size, low=2)
            if self.neighbourhood_size % 2:
                raise SecAggConfigError(
                    f"neighbourhood_size must be even (a Harary graph links k/2 sites each side), "
                    f"got {self.neighbourhood_size}: use {self.neighbourhood_size + 1}"
                )

    def to_wire(self) -> dict[str, Any]:
        wire = {key: getattr(self, key) for key in _WIRE_KEYS}
        wire["clip"] = float(self.clip)
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> SecureSumConfig:
        kind = "SecureSumConfig"
        raw = fields(obj, kind=kind, keys=_WIRE_KEYS)
        if not isinstance(raw["clip"], float):
            raise SecAggProtocolError(f"{kind}.clip: expected a float, got {type(raw['clip']).__name__}")
        neighbourhood = raw["neighbourhood_size"]
        return cls(
            vector_length=read_int(raw, "vector_length", kind=kind),
            clip=raw["clip"],
            quantisation_bits=read_int(raw, "quantisation_bits", kind=kind),
            threshold=read_int(raw, "threshold", kind=kind),
            modulus_bits=read_int(raw, "modulus_bits", kind=kind),
            neighbourhood_size=None
            if neighbourhood is None
            else read_int(raw, "neighbourhood_size", kind=kind),
        )


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggConfigError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SecAggConfigError(f"{name} must be {bound}, got {value}")
