"""Prior calibration of the classifier bias on public text (researcher.calibration)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from models import TrainableSet, build_model, tiny_bert_config
from researcher.calibration import (
    CalibrationError,
    calibrate_bias,
    check_calibratable,
    margin_shift,
    shift_margins,
)
from researcher.checkpoints import frozen_parameters_digest
from researcher.evaluation import predict_logits
from researcher.report import RoundRecord, RunReportError
from tests.models_fixtures import tiny_tokenizer

pytestmark = pytest.mark.unit

WORDS = ("good", "bad", "film", "plot", "actor", "dull", "great", "end")
TEXTS = [" ".join(WORDS[(i * j) % len(WORDS)] for j in range(1, 4 + i % 5)) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), words=WORDS)


def _model(tokenizer: Any, *, kind: str = "lora", num_labels: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=len(tokenizer), max_length=32), num_labels=num_labels,
                        trainable=TrainableSet(kind=kind, lora_rank=2))
    with torch.no_grad():  # a biased classifier, as DP noise leaves it: every text scores far to one side
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and name.endswith("bias") and "classifier" in name:
                parameter.copy_(torch.linspace(3.0, -3.0, num_labels))
    return model


def _margins(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> np.ndarray:
    logits = predict_logits(model, tokenizer, texts, max_length=16)
    return (logits[:, 1] - logits[:, 0]).numpy()


def test_the_shift_is_the_quantile_of_the_share() -> None:
    margins = np.array([-4.0, -1.0, 0.5, 2.0, 7.0])

    assert margin_shift(margins) == 0.5  # the median: half above, half below
    assert margin_shift(margins, 0.25) == 2.0  # a quarter of the texts are positive
    assert margin_shift(margins, 0.75) == -1.0
    assert (margins - margin_shift(margins, 0.25) > 0).sum() == 1


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1, math.nan, True, "0.5"])
def test_a_share_outside_zero_one_is_refused(share: Any) -> None:
    with pytest.raises(CalibrationError, match=r"positive_share must be a number in \(0, 1\)"):
        margin_shift(np.array([1.0, 2.0]), share)


def test_empty_or_non_finite_margins_are_refused() -> None:
    for margins in (np.array([]), np.array([1.0, math.inf]), np.zeros((2, 2))):
        with pytest.raises(CalibrationError, match="non-empty 1-d array of finite numbers"):
            margin_shift(margins)


def test_shifting_the_margins_keeps_their_sum() -> None:
    logits = torch.tensor([[1.0, 2.0], [0.5, -3.0]])

    moved = shift_margins(logits, 1.5)

    assert torch.allclose(moved[:, 1] - moved[:, 0], logits[:, 1] - logits[:, 0] - 1.5)
    assert torch.allclose(moved.sum(dim=1), logits.sum(dim=1))
    assert torch.equal(logits, torch.tensor([[1.0, 2.0], [0.5, -3.0]]))  # the input is not changed


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_calibration_splits_the_public_texts_at_the_prior(tokenizer: Any, kind: str) -> None:
    # Prepare: a model that calls every text negative
    model = _model(tokenizer, kind=kind)
    frozen = frozen_parameters_digest(model)
    before = _margins(model, tokenizer, TEXTS)
    assert (before > 0).sum() == 0

    # Execute
    shift = calibrate_bias(model, tokenizer, TEXTS, max_length=16)

    # Assert: half the texts are now positive, their order is unchanged, only the trainable bias moved
    after = _margins(model, tokenizer, TEXTS)
    assert shift == pytest.approx(float(np.median(before)))
    assert np.allclose(after, before - shift, atol=1e-5)
    assert (after > 1e-5).sum() == (before > np.median(before)).sum()
    assert 0.4 <= (after > 1e-5).mean() <= 0.5
    assert frozen_parameters_digest(model) == frozen  # peft's frozen original classifier is untouched
    quarter = calibrate_bias(model, tokenizer, TEXTS, positive_share=0.25, max_length=16)
    assert quarter > 0
    assert 0.15 <= (_margins(model, tokenizer, TEXTS) > 1e-5).mean() <= 0.25


def test_bad_input_is_refused_before_the_model_changes(tokenizer: Any) -> None:
    model = _model(tokenizer)
    before = _margins(model, tokenizer, TEXTS)

    with pytest.raises(CalibrationError, match="no public texts"):
        calibrate_bias(model, tokenizer, [], max_length=16)
    with pytest.raises(CalibrationError, match="positive_share"):
        calibrate_bias(model, tokenizer, TEXTS, positive_share=1.0, max_length=16)
    three = _model(tokenizer, num_labels=3)
    with pytest.raises(CalibrationError, match="two-label classifier bias, found \\[\\(3,\\)\\]"):
        calibrate_bias(three, tokenizer, TEXTS, max_length=16)
    frozen_head = _model(tokenizer)
    frozen_head.requires_grad_(False)
    with pytest.raises(CalibrationError, match="found \\[\\]"):
        check_calibratable(frozen_head)

    assert np.array_equal(_margins(model, tokenizer, TEXTS), before)


def test_the_round_record_keeps_both_accuracies_through_json() -> None:
    record = RoundRecord(round_index=0, accuracy=0.83, mean_loss=0.4, epsilon_spent={"a": 1.0}, participants=("a",),
                         dropped=(), seconds={}, uncalibrated_accuracy=0.79, calibration_shift=-2.5)
    old = {key: value for key, value in record.to_dict().items()
           if key not in ("uncalibrated_accuracy", "calibration_shift")}

    assert RoundRecord.from_dict(record.to_dict()) == record
    assert RoundRecord.from_dict(old).calibration_shift is None  # a report written before calibration
    with pytest.raises(RunReportError, match="come together"):
        RoundRecord(round_index=0, accuracy=0.8, mean_loss=0.4, epsilon_spent={}, participants=("a",), dropped=(),
                    seconds={}, uncalibrated_accuracy=0.7)
    with pytest.raises(RunReportError, match="calibration_shift must be a finite number"):
        RoundRecord(round_index=0, accuracy=0.8, mean_loss=0.4, epsilon_spent={}, participants=("a",), dropped=(),
                    seconds={}, uncalibrated_accuracy=0.7, calibration_shift=math.nan)
