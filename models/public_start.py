"""The default DP recipe's start, computed by the researcher from public text only: a centre and a prompt head.

* ``public_centre``: the pretrained encoder's mean embedding of public reviews, which the mean-pooling
  model subtracts (see ``models.bert``); it goes into the plan's ``model.centre``.
* ``prompt_head``: a classifier that starts as a zero-shot one, built from short descriptions of each
  label (``SENTIMENT_PROMPTS``); it goes into the plan's ``model.head_init``. Under DP-SGD the few noisy
  rounds then refine a classifier that is already right on ~3 reviews in 4 instead of finding one from a
  random start.
* ``with_public_start``: both, written into a model spec in one pass over the texts.

Every site loads them from the plan (``models.build_from_spec``); none reads any data to make them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models.bert import BertMeanPoolingForSequenceClassification, mean_pooling_head
from models.build import build_from_spec
from models.spec import DEFAULT_POOLING, ModelConfigError
from models.tokens import check_tail_tokens, tokenize

# Descriptions of IMDB's labels (0 negative, 1 positive) from which prompt_head builds a zero-shot head.
SENTIMENT_PROMPTS = (
    ("This is a negative review.", "This movie was terrible.", "I hated this film.", "An awful, boring movie.",
     "negative"),
    ("This is a positive review.", "This movie was great.", "I loved this film.", "A wonderful, excellent movie.",
     "positive"),
)


def _embed(head: BertMeanPoolingForSequenceClassification, tokenizer: Any, texts: Sequence[str], *,
           max_length: int, tail_tokens: int = 0) -> torch.Tensor:
    """Mean-pooled, uncentred embeddings of ``texts`` under ``head``'s encoder as it stands: float64 [n, h]."""
    check_tail_tokens(tail_tokens, max_length)
    limit = min(max_length, int(head.config.max_position_embeddings))
    was_training = head.training
    head.eval()
    rows = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                encoded = tokenize(tokenizer, texts[start : start + 64], max_length=limit,
                                   tail_tokens=min(tail_tokens, limit - 2))  # a tiny model's positions
                input_ids = encoded["input_ids"].clamp(max=head.config.vocab_size - 1)  # tiny test vocabularies
                hidden = head.bert(input_ids=input_ids, attention_mask=encoded["attention_mask"]).last_hidden_state
                rows.append(head.pool(hidden, encoded["attention_mask"]).double())  # [b, h]
    finally:
        head.train(was_training)
    return torch.cat(rows)


def public_centre(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128,
                  tail_tokens: int = 0) -> list[float]:
    """The mean-pooled embedding of public ``texts`` (e.g. IMDB test reviews) under the pretrained encoder.

    Compute it on the model as built (LoRA adapters still zero) and pass it as the plan's
    ``model.centre``; it uses no private data, and ~256 texts fix it to within a few percent.
    """
    head = mean_pooling_head(model)
    if head is None:
        raise ModelConfigError("public_centre needs a mean-pooling model (pooling='mean')")
    if not texts:
        raise ModelConfigError("public_centre needs at least one text")
    return _rounded_mean(_embed(head, tokenizer, texts, max_length=max_length, tail_tokens=tail_tokens))


def _rounded_mean(embedded: torch.Tensor) -> list[float]:
    """The centre of embeddings [n, h], to 6 decimals (it is written into the plan as JSON)."""
    return [round(float(v), 6) for v in embedded.mean(dim=0)]


def prompt_head(
    model: nn.Module,
    tokenizer: Any,
    label_prompts: Sequence[Sequence[str]],
    public_texts: Sequence[str],
    *,
    max_length: int = 128,
    tail_tokens: int = 0,
) -> dict[str, list[Any]]:
    """A classifier head that starts as a zero-shot classifier: ``{"weight": [[...] per label], "bias": [...]}``.

    Label k's row points at the mean embedding of ``label_prompts[k]`` (short descriptions of the label,
    such as "This movie was great."), less the mean over labels, so a text scores highest for the label
    whose descriptions it is closest to. It is scaled so that the logits of the public texts
    (unlabelled, e.g. IMDB test reviews) have a standard deviation of 0.5 (a logit margin of ~1 for two
    labels) and the bias makes their mean logit zero. It reads label descriptions and public text only:
    no private data, and no review's label. Under DP-SGD the rounds start from this classifier instead
    of a random one (all-MiniLM-L6-v2 on 1,000 IMDB test reviews: 0.74 accuracy before any training).
    """
    head = mean_pooling_head(model)
    if head is None:
        raise ModelConfigError("prompt_head needs a mean-pooling model (pooling='mean')")
    if not public_texts:
        raise ModelConfigError("prompt_head needs at least one public text to scale the head")
    _check_label_prompts(head, label_prompts)
    public = _embed(head, tokenizer, public_texts, max_length=max_length, tail_tokens=tail_tokens) - head.centre.double()
    return _prompt_rows(head, tokenizer, label_prompts, public, max_length=max_length)


def _check_label_prompts(head: BertMeanPoolingForSequenceClassification, label_prompts: Sequence[Sequence[str]]) -> None:
    if len(label_prompts) != head.num_labels:
        raise ModelConfigError(f"label_prompts has {len(label_prompts)} labels, the model has {head.num_labels}: "
                               "give one list of descriptions per label, in label order")
    if not all(isinstance(p, Sequence) and not isinstance(p, str) and p and all(isinstance(t, str) and t for t in p)
               for p in label_prompts):
        raise ModelConfigError("each label's prompts must be a non-empty list of non-empty strings")


def _prompt_rows(head: BertMeanPoolingForSequenceClassification, tokenizer: Any,
                 label_prompts: Sequence[Sequence[str]], public: torch.Tensor, *, max_length: int) -> dict[str, list[Any]]:
    """prompt_head's weight and bias, given the public texts' centred embeddings ``public`` [n, h]."""
    labels = torch.stack([_embed(head, tokenizer, prompts, max_length=max_length).mean(dim=0)
                          for prompts in label_prompts])  # [labels, h]
    rows = labels - labels.mean(dim=0)
    spread = float((public @ rows.T).std(dim=0, correction=0).mean())
    if not math.isfinite(spread) or spread <= 1e-9:
        raise ModelConfigError("the label prompts' embeddings do not separate the public texts: use other prompts")
    weight = rows * (0.5 / spread)
    bias = -(public @ weight.T).mean(dim=0)
    return {"weight": [[round(float(v), 7) for v in row] for row in weight],
            "bias": [round(float(v), 7) for v in bias]}


def with_public_start(
    spec: Mapping[str, Any],
    texts: Sequence[str],
    *,
    label_prompts: Sequence[Sequence[str]] | None = SENTIMENT_PROMPTS,
    max_length: int = 128,
    tail_tokens: int = 0,
) -> dict[str, Any]:
    """``spec`` with its ``centre`` from public ``texts`` and, unless ``label_prompts`` is None, a
    ``head_init`` from ``prompt_head``: the start of the default DP recipe, in one pass over the texts."""
    if spec.get("pooling", DEFAULT_POOLING) != "mean":
        raise ModelConfigError("with_public_start needs a mean-pooling spec (pooling='mean')")
    if not texts:
        raise ModelConfigError("with_public_start needs at least one public text")
    model, tokenizer = build_from_spec({key: value for key, value in spec.items() if key not in ("centre", "head_init")})
    head = mean_pooling_head(model)
    if head is None:
        raise ModelConfigError(f"the spec's model {spec.get('name')!r} has no mean-pooling head")
    if label_prompts is not None:
        _check_label_prompts(head, label_prompts)
    public = _embed(head, tokenizer, texts, max_length=max_length, tail_tokens=tail_tokens)
    centre = _rounded_mean(public)
    start = {**spec, "centre": centre}
    if label_prompts is not None:
        centred = public - torch.tensor(centre, dtype=torch.float64)
        start["head_init"] = _prompt_rows(head, tokenizer, label_prompts, centred, max_length=max_length)
    return start
