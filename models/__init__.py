"""The models a federated run trains, installed at every site and at the researcher's: one entry point.

* ``models.spec``: ``ModelSpec``, the plan's ``model`` field, parsed and validated by both sides, and
  ``TrainableSet`` (standard library only);
* ``models.tokens``: the tokenizer, head + tail truncation, the tensors a round trains on;
* ``models.bert``: the BERT-family classifier with its mean pooling, centre and head;
* ``models.trainable``: which parameters train (full, top-k, LoRA, head);
* ``models.build``: ``build_from_spec``, the model a spec names;
* ``models.public_start``: the default DP recipe's centre and prompt head, from public text.

This package imports nothing else of Fedsite's: the site's trusted code (``policies``, ``datasites``)
and the researcher's (``researcher``) both depend on it, never it on them. Names load on first use, so
``from models import ModelSpec`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "spec": ("DEFAULT_MODEL", "DEFAULT_POOLING", "LORA_TARGETS", "MAX_TINY_PARAMETERS", "POOLINGS", "TINY_LIMITS",
             "TRAINABLE_KINDS", "ModelConfigError", "ModelSpec", "TrainableSet", "default_model_path",
             "resolve_model_path", "tiny_parameters"),
    "tokens": ("check_tail_tokens", "encode_texts", "load_tokenizer", "recipe_tail_tokens", "tokenize", "trim_padding"),
    "trainable": ("HEAD_MODULES", "encoder_layers", "select_trainable"),
    "bert": ("BertMeanPoolingForSequenceClassification", "build_model", "mean_pooling_head", "set_centre", "set_head",
             "tiny_bert_config"),
    "build": ("build_from_spec",),
    "public_start": ("SENTIMENT_PROMPTS", "prompt_head", "public_centre", "with_public_start"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    from models.bert import (
        BertMeanPoolingForSequenceClassification,
        build_model,
        mean_pooling_head,
        set_centre,
        set_head,
        tiny_bert_config,
    )
    from models.build import build_from_spec
    from models.public_start import SENTIMENT_PROMPTS, prompt_head, public_centre, with_public_start
    from models.spec import (
        DEFAULT_MODEL,
        DEFAULT_POOLING,
        LORA_TARGETS,
        MAX_TINY_PARAMETERS,
        POOLINGS,
        TINY_LIMITS,
        TRAINABLE_KINDS,
        ModelConfigError,
        ModelSpec,
        TrainableSet,
        default_model_path,
        resolve_model_path,
        tiny_parameters,
    )
    from models.tokens import (
        check_tail_tokens,
        encode_texts,
        load_tokenizer,
        recipe_tail_tokens,
        tokenize,
        trim_padding,
    )
    from models.trainable import HEAD_MODULES, encoder_layers, select_trainable


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"models.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = [
    "BertMeanPoolingForSequenceClassification", "DEFAULT_MODEL", "DEFAULT_POOLING", "HEAD_MODULES",
    "LORA_TARGETS", "MAX_TINY_PARAMETERS", "ModelConfigError", "ModelSpec", "POOLINGS", "SENTIMENT_PROMPTS",
    "TINY_LIMITS", "TRAINABLE_KINDS", "TrainableSet", "build_from_spec", "build_model", "check_tail_tokens",
    "default_model_path", "encode_texts", "encoder_layers", "load_tokenizer", "mean_pooling_head",
    "prompt_head", "public_centre", "recipe_tail_tokens", "resolve_model_path", "select_trainable",
    "set_centre", "set_head", "tiny_bert_config", "tiny_parameters", "tokenize", "trim_padding",
    "with_public_start",
]
