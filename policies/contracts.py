"""What the researcher's side and a site must agree on, in one place both import.

The asset's name, the syft policies a request must use, how a site words a refusal, the secure-sum
stages, how a flat float32 vector travels, and the one typed reply a stage call returns. A change here
changes both sides at once; nothing else in the repo spells these out.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

ASSET = "reviews"  # the one asset of a Fedsite dataset: the private partition with its mock twin
INPUT_POLICY = "MixedInputPolicy"  # syft's own input policy, bound to the site's asset (no custom policy code)
OUTPUT_POLICY = "OutputPolicyExecuteCount"  # syft's own output policy; the site's ledger, not syft, limits runs

REFUSAL_MARK = ": refused: "  # "<site>: refused: <why>", from the guard, the gate and the round runtime
_REFUSAL = re.compile(r"[a-z0-9][a-z0-9-]*: refused: .*")


class ContractError(ValueError):
    """A value crossing between the researcher and a site is not in the agreed shape."""


def refusal(site: str, why: str) -> str:
    """How a site words a refusal of its policy (the researcher tells these from connection failures)."""
    return f"{site}{REFUSAL_MARK}{why}"


def find_refusal(text: str) -> str | None:
    """The site's refusal inside ``text`` (e.g. an exception's message), or None ("Connection refused" is none)."""
    match = _REFUSAL.search(text)
    return match.group(0) if match else None


class Stage(StrEnum):
    """The secure-sum stages of one round, in order (Bonawitz et al. 2017, Figure 4)."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASK_INPUT = "mask_input"  # trains with DP-SGD, spends, releases the masked update
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"

    @classmethod
    def parse(cls, value: object) -> Stage:
        for stage in cls:
            if stage.value == value:
                return stage
        raise ContractError(f"unknown stage {value!r}: one of {', '.join(s.value for s in cls)}")


# ---- the flat vector: a model's trainable parameters, float32 little-endian, base64 -------------------------

def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(encoded: object, length: int) -> np.ndarray:
    """The vector ``encode_vector`` made; refuses another type, length, or a non-finite value."""
    if not isinstance(encoded, str):
        raise ContractError(f"a vector must be a base64 str, got {type(encoded).__name__}")
    try:
        raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ContractError("a vector must be base64 of little-endian float32 values") from None
    if len(raw) != 4 * length:
        raise ContractError(f"the vector has {len(raw) / 4:g} values, the plan has {length} trainable parameters")
    vector = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(vector).all():
        raise ContractError("the vector contains NaN or infinite values")
    return vector


# ---- what a stage call returns ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageMessage:
    """The site's secure-sum message for the stage; after ``mask_input``, the researcher's spend there."""

    message: Mapping[str, Any]
    epsilon_spent: float | None = None  # cumulative, two decimals; only with the masked input


@dataclass(frozen=True)
class Refused:
    """The site's policy refused the call; ``reason`` is ``"<site>: refused: ..."`` or ``"<site>: ..."``."""

    reason: str


@dataclass(frozen=True)
class MockRun:
    """syft's second execution, on the mock twin: nothing ran, nothing was spent."""


@dataclass(frozen=True)
class DryRun:
    """The admin's review on the mock: the model built, one noisy step taken."""

    trainable_parameters: int
    mock_rows: int
    mock_loss: float
    seconds: float


StageReply = StageMessage | Refused | MockRun | DryRun


def reply_to_wire(reply: StageReply) -> dict[str, Any]:
    if isinstance(reply, StageMessage):
        wire: dict[str, Any] = {"reply": "message", "message": dict(reply.message)}
        if reply.epsilon_spent is not None:
            wire["epsilon_spent"] = reply.epsilon_spent
        return wire
    if isinstance(reply, Refused):
        return {"reply": "refused", "refused": reply.reason}
    if isinstance(reply, MockRun):
        return {"reply": "mock"}
    return {"reply": "dry_run", "trainable_parameters": reply.trainable_parameters, "mock_rows": reply.mock_rows,
            "mock_loss": reply.mock_loss, "seconds": reply.seconds}


def _number(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ContractError(f"a stage reply's {key!r} must be a finite number, got {value!r}")
    return float(value)


def reply_from_wire(raw: object) -> StageReply:
    """The typed reply of a stage call; anything else is a ContractError naming what is wrong."""
    if not isinstance(raw, Mapping):
        raise ContractError(f"a stage reply must be a mapping, got {type(raw).__name__}")
    kind = raw.get("reply")
    if kind == "message":
        message = raw.get("message")
        if not isinstance(message, Mapping):
            raise ContractError("a stage reply's 'message' must be a mapping")
        spent = _number(raw, "epsilon_spent") if "epsilon_spent" in raw else None
        return StageMessage(message=message, epsilon_spent=spent)
    if kind == "refused":
        return Refused(reason=str(raw.get("refused")))
    if kind == "mock":
        return MockRun()
    if kind == "dry_run":
        return DryRun(trainable_parameters=int(_number(raw, "trainable_parameters")),
                      mock_rows=int(_number(raw, "mock_rows")), mock_loss=_number(raw, "mock_loss"),
                      seconds=_number(raw, "seconds"))
    raise ContractError(f"a stage reply's 'reply' must be message, refused, mock or dry_run, got {kind!r}")


__all__ = [
    "ASSET", "INPUT_POLICY", "OUTPUT_POLICY", "REFUSAL_MARK", "ContractError", "DryRun", "MockRun", "Refused",
    "Stage", "StageMessage", "StageReply", "decode_vector", "encode_vector", "find_refusal", "refusal",
    "reply_from_wire", "reply_to_wire",
]
