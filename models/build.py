"""A plan's model, built from its ``ModelSpec``: what every site runs inside an approved round.

Every site (from its own installed copy of this package) and the researcher (to evaluate the global
model) build the model here, so both hold the same parameters in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.bert import build_model, set_centre, set_head, tiny_bert_config
from models.spec import ModelSpec
from models.tokens import load_tokenizer


def build_from_spec(spec: ModelSpec | Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """Model and tokenizer of a model spec (a ``ModelSpec``, or its JSON, which is parsed and validated first).

    ``tiny`` models use the default model's tokenizer (its vocabulary sets ``vocab_size``), so they need
    no download either.
    """
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.parse(spec)
    tokenizer = load_tokenizer(spec.name)
    # Weights that are not loaded (a tiny model, a new head, LoRA factors) are drawn from a generator
    # seeded by the spec, so every site and the researcher start from the same frozen parameters.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.tiny is not None:
            config = tiny_bert_config(**{"vocab_size": tokenizer.vocab_size, **dict(spec.tiny)})
            model = build_model(config=config, trainable=spec.trainable, pooling=spec.pooling, dropout=spec.dropout)
        else:
            model = build_model(spec.name, trainable=spec.trainable, pooling=spec.pooling, dropout=spec.dropout)
    if spec.centre is not None:
        set_centre(model, spec.centre)
    if spec.head_init is not None:
        set_head(model, spec.head_init)
    return model, tokenizer
