"""Which parameters of a BERT-family model train: the ``TrainableSet`` (``models.spec``) applied to a model.

Nothing here touches private data or privacy: the site's DP step (``policies.dp``) trains whatever the
model marks trainable and checks that every trainable layer is one whose per-sample gradients it
computes exactly.
"""

from __future__ import annotations

from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from models.spec import ModelConfigError, TrainableSet

HEAD_MODULES = ("classifier", "pooler", "pre_classifier")


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
    if trainable.kind == "head":
        model.requires_grad_(False)
        for module in _head_modules(model):
            module.requires_grad_(True)
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
