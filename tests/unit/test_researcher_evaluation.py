"""Evaluation on public test data against a one-review-at-a-time reference, and the stratified test subset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from models import TrainableSet, build_model, tiny_bert_config
from researcher.evaluation import Evaluation, EvaluationError, evaluate, load_test_subset
from tests.models_fixtures import tiny_tokenizer

pytestmark = [
    pytest.mark.unit,
    # peft probes transformers' deprecated is_gradient_checkpointing when wrapping a LoRA model
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TEXTS = [
    "a great film",
    "terrible acting and a dull plot that never ends",
    "loved it",
    "boring",
    "the best movie of the year with a wonderful cast",
    "not worth the ticket",
    "superb",
    "an awful mess from start to finish",
    "charming and funny",
    "i walked out",
]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), words=("film", "movie", "the"))


def _model() -> nn.Module:
    """The default trainable set (LoRA), so evaluation runs through the peft wrapper as in a real run."""
    torch.manual_seed(3)
    return build_model(config=tiny_bert_config(max_length=64), trainable=TrainableSet(kind="lora"))


def _reference(model: nn.Module, tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> Evaluation:
    """Obviously correct: one review at a time, no padding, plain Python sums."""
    losses, correct = [], 0
    with torch.no_grad():
        for text, label in zip(texts, labels, strict=True):
            encoded = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits[0]  # [2]
            losses.append(float(-torch.log_softmax(logits, dim=0)[label]))
            correct += int(int(logits.argmax()) == label)
    return Evaluation(accuracy=correct / len(texts), mean_loss=sum(losses) / len(losses), n=len(texts))


def test_evaluate_matches_the_one_review_at_a_time_reference(tokenizer: Any) -> None:
    # Prepare: batches of 4 over 10 reviews, the last one partial and padded
    model = _model()
    reference = _reference(model, tokenizer, TEXTS, LABELS, max_length=16)

    # Execute
    result = evaluate(model, tokenizer, TEXTS, LABELS, max_length=16, batch_size=4)

    # Assert
    assert result.n == 10
    assert result.accuracy == reference.accuracy
    assert result.mean_loss == pytest.approx(reference.mean_loss, rel=1e-5)


def test_flipping_binary_labels_complements_the_accuracy(tokenizer: Any) -> None:
    # Prepare
    model = _model()

    # Execute
    straight = evaluate(model, tokenizer, TEXTS, LABELS, batch_size=3)
    flipped = evaluate(model, tokenizer, TEXTS, [1 - label for label in LABELS], batch_size=3)

    # Assert
    assert straight.accuracy + flipped.accuracy == pytest.approx(1.0)
    assert straight.accuracy in {k / 10 for k in range(11)}


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluate_restores_the_mode_and_computes_no_gradients(tokenizer: Any, was_training: bool) -> None:
    # Prepare
    model = _model()
    model.train(was_training)

    # Execute
    evaluate(model, tokenizer, TEXTS[:2], LABELS[:2])

    # Assert
    assert model.training is was_training
    assert all(module.training is was_training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("texts", "labels", "kwargs", "message"),
    [
        ([], [], {}, "no texts to evaluate on"),
        (["a", "b"], [1], {}, "texts and labels differ in length: 2 != 1"),
        (["a"], [True], {}, "label 0 is True: labels are class indices"),
        (["a"], [2], {}, "a label is 2 but the model has 2 classes"),
        (["a"], [1], {"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ],
)
def test_evaluate_refuses_bad_inputs(tokenizer: Any, texts, labels, kwargs, message) -> None:
    # Execute / Assert
    with pytest.raises(EvaluationError, match=message):
        evaluate(_model(), tokenizer, texts, labels, **kwargs)


def _write_test_split(folder: Path, *, positives: int, negatives: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        {"text": [f"review {i}" for i in range(positives + negatives)], "label": [1] * positives + [0] * negatives}
    )
    frame.to_parquet(folder / "test.parquet")
    return folder


def test_subset_keeps_the_label_proportions(tmp_path: Path) -> None:
    # Prepare: 10 positive and 30 negative reviews
    folder = _write_test_split(tmp_path, positives=10, negatives=30)

    # Execute
    subset = load_test_subset(folder, 9, seed=1)

    # Assert: 9 * 10/40 = 2.25 -> 2 positives, 9 * 30/40 = 6.75 -> 7 negatives (largest remainder)
    assert list(subset.columns) == ["text", "label"]
    assert subset["label"].value_counts().to_dict() == {0: 7, 1: 2}
    assert list(subset.index) == list(range(9))
    assert subset["text"].is_unique


def test_subset_is_the_same_for_the_same_seed_and_differs_for_another(tmp_path: Path) -> None:
    # Prepare
    folder = _write_test_split(tmp_path, positives=50, negatives=50)

    # Execute
    first = load_test_subset(folder, 10, seed=4)
    again = load_test_subset(folder, 10, seed=4)
    other = load_test_subset(folder, 10, seed=5)

    # Assert
    pd.testing.assert_frame_equal(first, again)
    assert list(first["text"]) != list(other["text"])


def test_subset_of_the_real_imdb_test_split_is_balanced(imdb_dir: Path) -> None:
    # Execute
    subset = load_test_subset(imdb_dir, 200, seed=0)

    # Assert
    assert subset["label"].value_counts().to_dict() == {0: 100, 1: 100}
    assert subset["text"].map(len).min() > 0


def test_subset_refuses_a_missing_file_a_missing_column_and_too_many_rows(tmp_path: Path) -> None:
    # Prepare
    folder = _write_test_split(tmp_path / "ok", positives=2, negatives=2)
    (tmp_path / "bad").mkdir()
    pd.DataFrame({"review": ["x"], "label": [0]}).to_parquet(tmp_path / "bad" / "test.parquet")

    # Execute / Assert
    with pytest.raises(EvaluationError, match=r"empty/test.parquet does not exist"):
        load_test_subset(tmp_path / "empty", 2, seed=0)
    with pytest.raises(EvaluationError, match=r"lacks column\(s\) \['text'\]"):
        load_test_subset(tmp_path / "bad", 1, seed=0)
    with pytest.raises(EvaluationError, match="n=5 exceeds the 4 reviews"):
        load_test_subset(folder, 5, seed=0)
    with pytest.raises(EvaluationError, match="seed must be an int >= 0, got -1"):
        load_test_subset(folder, 2, seed=-1)
