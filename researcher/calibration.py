"""Prior calibration of the global model's classifier bias on public, unlabelled text.

DP noise moves a two-label classifier's decision threshold: in the federated runs at epsilon 8 the
global model came to call 39 % of the (balanced) IMDB test reviews positive, and under label skew
0 % after some rounds, while the reviews' order by score stayed good. Saerens et al. (2002) adjust
a classifier's outputs to known label priors; here the researcher knows the prior of the population
the model is for (IMDB: half positive) and holds public, unlabelled reviews of it. After each round
the bias is shifted so that the public texts are predicted positive at that prior: the median logit
margin (positive minus negative) of the public texts moves to 0 for a prior of 0.5.

It reads only the global model and public text (no site's data, no label), after the secure sum: DP
post-processing, which costs no privacy. The sites train the next round from the calibrated model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from researcher.evaluation import Evaluation, predict_logits, score_logits


class CalibrationError(ValueError):
    """Calibration inputs are invalid; the message names the problem and the fix."""


def check_positive_share(positive_share: object) -> float:
    if (
        isinstance(positive_share, bool)
        or not isinstance(positive_share, int | float)
        or not math.isfinite(positive_share)
        or not 0 < positive_share < 1
    ):
        raise CalibrationError(
            f"positive_share must be a number in (0, 1), the share of the population with label 1, got {positive_share!r}"
        )
    return float(positive_share)


def margin_shift(margins: np.ndarray, positive_share: float = 0.5) -> float:
    """The shift s such that a fraction ``positive_share`` of ``margins - s`` is above 0 (a quantile)."""
    share = check_positive_share(positive_share)
    values = np.asarray(margins, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise CalibrationError(f"margins must be a non-empty 1-d array of finite numbers, got shape {values.shape}")
    return float(np.quantile(values, 1.0 - share))


def shift_margins(logits: torch.Tensor, shift: float) -> torch.Tensor:
    """Two-label ``logits`` [n, 2] as ``shift_bias`` leaves them: the margin falls by ``shift``, the sum stays."""
    moved = logits.clone()
    moved[:, 1] -= shift / 2
    moved[:, 0] += shift / 2
    return moved


def _trainable_classifier_bias(model: nn.Module) -> nn.Parameter:
    """The bias of the classifier the model trains (peft's trainable copy, not its frozen original)."""
    found = [
        parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and name.endswith("bias") and ".classifier." in f".{name}"
    ]
    if len(found) != 1 or tuple(found[0].shape) != (2,):
        shapes = [tuple(p.shape) for p in found]
        raise CalibrationError(
            f"calibration needs one trainable two-label classifier bias, found {shapes}: it applies to "
            "two-label models whose head trains (every trainable kind of the plan)"
        )
    return found[0]


def check_calibratable(model: nn.Module) -> None:
    """Raise ``CalibrationError`` unless ``model`` trains one two-label classifier bias (before any round runs)."""
    _trainable_classifier_bias(model)


def shift_bias(model: nn.Module, shift: float) -> None:
    """Lower the classifier's logit margin (label 1 minus label 0) by ``shift``, in place."""
    if not math.isfinite(shift):
        raise CalibrationError(f"shift must be finite, got {shift!r}")
    bias = _trainable_classifier_bias(model)
    with torch.no_grad():
        bias[1] -= shift / 2
        bias[0] += shift / 2


def calibrate_bias(
    model: nn.Module,
    tokenizer: Any,
    public_texts: Sequence[str],
    *,
    positive_share: float = 0.5,
    max_length: int = 128,
    tail_tokens: int = 0,
    batch_size: int = 64,
) -> float:
    """Shift the classifier bias so ``positive_share`` of ``public_texts`` are predicted label 1; returns the shift.

    Validates everything before it changes the model: a model without one trainable two-label
    classifier bias, no public texts or a share outside (0, 1) raise ``CalibrationError``.
    """
    share = check_positive_share(positive_share)
    if len(public_texts) == 0:
        raise CalibrationError("no public texts to calibrate on: pass unlabelled texts of the target population")
    _trainable_classifier_bias(model)
    logits = predict_logits(model, tokenizer, public_texts, max_length=max_length, tail_tokens=tail_tokens,
                            batch_size=batch_size)  # [n, 2]
    shift = margin_shift((logits[:, 1] - logits[:, 0]).numpy(), share)
    shift_bias(model, shift)
    return shift


@dataclass(frozen=True)
class CalibratedEvaluation:
    """A round's score: the model as it leaves the round, and before its calibration."""

    evaluation: Evaluation  # the calibrated model's (the uncalibrated one's without calibration texts)
    uncalibrated_accuracy: float | None  # None without calibration texts
    shift: float | None  # the logit-margin shift applied; None without calibration texts


def evaluate_and_calibrate(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    calibration_texts: Sequence[str],
    *,
    positive_share: float = 0.5,
    max_length: int = 128,
    tail_tokens: int = 0,
    batch_size: int = 64,
) -> CalibratedEvaluation:
    """Score ``model`` on (texts, labels), then (with ``calibration_texts``) calibrate it and score it again.

    The second score needs no second pass over the texts: calibration moves every margin by the same shift.
    """
    logits = predict_logits(model, tokenizer, texts, max_length=max_length, tail_tokens=tail_tokens,
                            batch_size=batch_size)
    if not calibration_texts:
        return CalibratedEvaluation(score_logits(logits, labels), None, None)
    uncalibrated = score_logits(logits, labels).accuracy
    shift = calibrate_bias(model, tokenizer, calibration_texts, positive_share=positive_share, max_length=max_length,
                           tail_tokens=tail_tokens, batch_size=batch_size)
    return CalibratedEvaluation(score_logits(shift_margins(logits, shift), labels), uncalibrated, shift)


__all__ = [
    "CalibratedEvaluation",
    "CalibrationError",
    "calibrate_bias",
    "check_calibratable",
    "check_positive_share",
    "evaluate_and_calibrate",
    "margin_shift",
    "shift_bias",
    "shift_margins",
]
