"""The model side of DP-SGD: which layers may train, and the fix that gives embeddings per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from policies.dp.plan import CLIPPING_MODES, DPPlanError, UnsupportedLayerError


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def check_trainable_layers(model: nn.Module, *, clipping_mode: str) -> None:
    """Refuse a model whose trainable parameters are not all in layers with exact per-sample gradients.

    Every module that directly owns a trainable parameter must be a layer Opacus has a registered
    per-sample gradient (hooks) or norm (ghost) function for; anything else would fall back to
    generic machinery or fail halfway through training. Opacus's own validator also runs (it refuses
    BatchNorm, whose running statistics mix records, among others).
    """
    if clipping_mode not in CLIPPING_MODES:
        raise DPPlanError(f"clipping_mode must be one of {CLIPPING_MODES}, got {clipping_mode!r}")
    supported = set(GradSampleModule.GRAD_SAMPLERS)
    if not trainable_parameters(model):
        raise UnsupportedLayerError("the model has no trainable parameters: select a trainable set")
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) and type(module) not in supported:
            raise UnsupportedLayerError(
                f"trainable layer {name!r} is a {type(module).__name__}, which has no exact per-sample gradient "
                f"in clipping_mode={clipping_mode!r}: freeze it or choose a trainable set of "
                f"{sorted(t.__name__ for t in supported)} layers"
            )
    ModuleValidator.validate(model, strict=True)


class BatchedEmbeddingIndices:
    """Give every trainable embedding an index tensor with the batch dimension it is used with.

    Hugging Face BERT looks up position embeddings with its ``position_ids`` buffer of shape [1, L]
    and lets broadcasting add the [1, L, H] result to the [B, L, H] token embeddings. The gradient of
    that lookup is then summed over the batch before any hook sees it, and Opacus's per-sample
    gradient of ``position_embeddings.weight`` has batch size 1 ([1, max_len, H]): the per-sample
    norms are wrong or (Opacus 1.6) the clipping fails on mismatched shapes. The fix changes no value:
    a forward pre-hook on each trainable ``nn.Embedding`` expands a batch-1 index tensor to
    [B, L] (B read from ``input_ids`` by a pre-hook on the model), so the lookup returns [B, L, H],
    the addition is elementwise, and each record's gradient reaches the embedding separately.
    The token-type ids, which HF expands from a buffer with stride 0, are made contiguous, since
    Opacus's ghost-clipping norm of an embedding reshapes its ids with ``view``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.batch_size: int | None = None
        self._handles = [model.register_forward_pre_hook(self._record_batch_size, with_kwargs=True)]
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                self._handles.append(module.register_forward_pre_hook(self._expand_indices))

    def _record_batch_size(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for tensor in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
                self.batch_size = int(tensor.shape[0])
                return

    def _expand_indices(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        indices = args[0] if args else None
        if self.batch_size is None or not isinstance(indices, torch.Tensor) or indices.dim() < 1:
            return None
        if indices.shape[0] == 1 and self.batch_size > 1:
            # [1, L] -> [B, L]: same ids for every record, one row of gradients per record.
            return (indices.expand(self.batch_size, *indices.shape[1:]).contiguous(), *args[1:])
        if not indices.is_contiguous():
            # HF expands token_type_ids with stride 0; Opacus's ghost norm calls .view() on the ids.
            return (indices.contiguous(), *args[1:])
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
