"""Accuracy and loss of the global model on the public IMDB test split.

The test split is public data: evaluating on it costs no privacy budget, and only the researcher
holds it. ``load_test_subset`` reads ``<folder>/test.parquet`` directly with pandas (the researcher
side never imports ``datasites``) and draws a stratified subset, so each round is scored on the
same reviews and a small subset keeps the IMDB label balance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from models import ModelConfigError, check_tail_tokens, tokenize

TEST_FILE = "test.parquet"
IMDB_LABELS = (0, 1)  # negative, positive


class EvaluationError(ValueError):
    """Evaluation inputs or the public test data are invalid."""


@dataclass(frozen=True)
class Evaluation:
    """The model's score on a labelled set."""

    accuracy: float  # fraction of examples whose argmax logit is the label, in [0, 1]
    mean_loss: float  # mean cross-entropy per example, in nats
    n: int  # examples scored


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvaluationError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _checked_labels(labels: Sequence[Any], n_texts: int) -> torch.Tensor:
    if len(labels) != n_texts:
        raise EvaluationError(f"texts and labels differ in length: {n_texts} != {len(labels)}")
    for position, label in enumerate(labels):
        if isinstance(label, bool | np.bool_) or not isinstance(label, int | np.integer) or label < 0:
            raise EvaluationError(f"label {position} is {label!r}: labels are class indices, ints >= 0")
    return torch.tensor([int(label) for label in labels], dtype=torch.long)  # [n]


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise EvaluationError("the model has no parameters")
    return parameter.device


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    max_length: int = 128,
    tail_tokens: int = 0,
    batch_size: int = 64,
) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on (texts, labels), without gradients.

    The model runs in eval mode (no dropout) and is put back in the mode it was in, so a caller that
    trains next does not silently train without dropout. ``tail_tokens`` truncates long texts as the
    plan's ``dp.tail_tokens`` does in training (``models.tokenize``).
    """
    if len(texts) == 0:
        raise EvaluationError("no texts to evaluate on: pass at least one labelled review")
    targets = _checked_labels(labels, len(texts))
    logits = predict_logits(model, tokenizer, texts, max_length=max_length, tail_tokens=tail_tokens,
                            batch_size=batch_size)
    return score_logits(logits, targets)


def predict_logits(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    tail_tokens: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """The model's logits [n, num_labels] (float32, on the CPU) for ``texts``, in eval mode, without gradients."""
    _positive_int("max_length", max_length)
    _positive_int("batch_size", batch_size)
    try:
        check_tail_tokens(tail_tokens, max_length)
    except ModelConfigError as exc:
        raise EvaluationError(str(exc)) from exc
    if len(texts) == 0:
        raise EvaluationError("no texts to score: pass at least one text")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    batches = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = [str(text) for text in texts[start : start + batch_size]]
                encoded = tokenize(tokenizer, batch, max_length=max_length, tail_tokens=tail_tokens)
                logits = model(
                    input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
                ).logits
                batches.append(logits.float().cpu())  # [b, num_labels]
    finally:
        model.train(was_training)
    return torch.cat(batches)


def score_logits(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> Evaluation:
    """Accuracy and mean cross-entropy of ``logits`` [n, num_labels] against ``labels``."""
    targets = labels if isinstance(labels, torch.Tensor) else _checked_labels(labels, len(logits))
    if logits.ndim != 2 or len(targets) != len(logits) or len(logits) == 0:
        raise EvaluationError(f"logits {tuple(logits.shape)} do not match {len(targets)} labels")
    if int(targets.max()) >= logits.shape[1]:
        raise EvaluationError(f"a label is {int(targets.max())} but the model has {logits.shape[1]} classes")
    loss = float(nn.functional.cross_entropy(logits.float(), targets, reduction="mean"))
    accuracy = int((logits.argmax(dim=1) == targets).sum()) / len(targets)
    return Evaluation(accuracy=accuracy, mean_loss=loss, n=len(targets))


def _read_test_split(imdb_source: str | os.PathLike[str]) -> pd.DataFrame:
    folder = Path(imdb_source)
    parquet = folder / TEST_FILE
    if not parquet.is_file():
        raise EvaluationError(f"{parquet} does not exist: point imdb_source at the folder holding IMDB's {TEST_FILE}")
    frame = pd.read_parquet(parquet)
    missing = [column for column in ("text", "label") if column not in frame.columns]
    if missing:
        raise EvaluationError(f"{parquet} lacks column(s) {missing}: IMDB needs 'text' and 'label'")
    if frame["label"].dtype.kind not in "iu" or not frame["label"].isin(IMDB_LABELS).all():
        raise EvaluationError(f"{parquet}: 'label' must hold the ints {IMDB_LABELS}, got dtype {frame['label'].dtype}")
    if not frame["text"].map(lambda text: isinstance(text, str)).all():
        raise EvaluationError(f"{parquet}: 'text' must hold strings only")
    return frame[["text", "label"]]


def _stratified_counts(class_sizes: dict[int, int], n: int) -> dict[int, int]:
    """Proportional allocation of n draws to classes, largest remainder first (Hamilton's method)."""
    total = sum(class_sizes.values())
    exact = {label: n * size / total for label, size in class_sizes.items()}
    counts = {label: math.floor(share) for label, share in exact.items()}
    by_remainder = sorted(exact, key=lambda label: (-(exact[label] - counts[label]), label))
    for label in by_remainder[: n - sum(counts.values())]:
        counts[label] += 1
    return counts


def load_test_subset(imdb_source: str | os.PathLike[str], n: int, seed: int) -> pd.DataFrame:
    """``n`` reviews of the IMDB test split, stratified by label, the same for the same (n, seed).

    Returns a DataFrame with columns text and label, rows in their test-split order, index 0..n-1.
    """
    _positive_int("n", n)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EvaluationError(f"seed must be an int >= 0, got {seed!r}")
    frame = _read_test_split(imdb_source)
    if n > len(frame):
        raise EvaluationError(f"n={n} exceeds the {len(frame)} reviews of the test split")
    labels = frame["label"].to_numpy()
    class_sizes = {int(label): int((labels == label).sum()) for label in np.unique(labels)}
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for label, count in sorted(_stratified_counts(class_sizes, n).items()):
        rows = np.flatnonzero(labels == label)  # [class size], ascending
        chosen.append(rows[rng.permutation(rows.size)[:count]])
    selected = np.sort(np.concatenate(chosen))  # [n]
    return frame.iloc[selected].reset_index(drop=True)
