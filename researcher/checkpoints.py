"""Round checkpoints of the global model: safetensors weights, a JSON sidecar, and ``latest.json``.

A run directory holds, per completed round r,

* ``round-rrrr.safetensors``: the trainable parameters (or, with ``full_state=True``, the whole state
  dict). safetensors stores raw tensors and a JSON header, never pickle, so loading a checkpoint
  cannot execute code planted in it; ``torch.load`` is not used.
* ``round-rrrr.json``: round index, layout and its digest, the SHA-256 of the weights file, a digest of
  the frozen parameters, and the caller's ``meta``.

and one ``latest.json`` naming the newest sidecar. Each file is replaced atomically (temporary file,
fsync, ``os.replace``), weights first, then sidecar, then ``latest.json``: a researcher process that
dies at any point leaves ``latest.json`` pointing at a complete checkpoint, and the run resumes at
``load_latest(run_dir).round_index + 1``.

A trainable-only checkpoint is small (LoRA: adapters and head) but only means something on top of the
same frozen weights. Its sidecar records a SHA-256 of the frozen parameters, and ``restore_into``
refuses a model whose frozen weights differ rather than producing a silently different model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from policies.durable import canonical_json, read_json, sha256_hex, write_bytes_atomic, write_json_atomic
from researcher.fedavg import Layout, layout_digest, parse_layout, trainable_parameters_for

CHECKPOINT_FORMAT = "fedsite-checkpoint-v1"
LATEST_NAME = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or does not fit the model it is restored into."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint on disk is incomplete, edited or not a checkpoint of this format."""


@dataclass(frozen=True)
class Checkpoint:
    """One round's checkpoint, read and verified from disk."""

    round_index: int  # the completed round whose global model this is; resume at round_index + 1
    tensors: Mapping[str, torch.Tensor]  # parameter name -> value (trainable only, or the full state dict)
    layout: Layout  # the model's trainable layout when it was saved
    full_state: bool  # True: ``tensors`` is the whole state dict, frozen weights included
    frozen_digest: str  # hex SHA-256 of the frozen parameters the trainable ones sit on
    meta: Mapping[str, Any]  # the caller's JSON metadata (run id, config, seeds, ...)
    path: Path  # the weights file


def frozen_parameters_digest(model: nn.Module) -> str:
    """Hex SHA-256 over name, shape, dtype and bytes of every parameter that does not train."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            continue
        header = canonical_json([name, list(parameter.shape), str(parameter.dtype)])
        digest.update(header.encode("utf-8"))
        raw = parameter.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # [numel * itemsize]
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def _tensors_to_save(model: nn.Module, layout: Layout, *, full_state: bool) -> dict[str, torch.Tensor]:
    """CPU copies (clones: safetensors refuses tensors that share storage, as tied weights do)."""
    trainable = trainable_parameters_for(model, layout)  # refuses a layout that is not the model's
    items: list[tuple[str, torch.Tensor]]
    if full_state:
        items = list(model.state_dict().items())
    else:
        items = list(zip([name for name, _ in layout], trainable, strict=True))
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in items}


def _round_stem(round_index: int) -> str:
    return f"round-{round_index:04d}"


def _check_round_index(run_dir: Path, round_index: int) -> None:
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise CheckpointError(f"round_index must be an int >= 0, got {round_index!r}")
    latest = run_dir / LATEST_NAME
    if latest.is_file():
        previous = _read_latest_round(latest)
        if round_index <= previous:
            raise CheckpointError(
                f"round_index={round_index} is not after the latest checkpoint (round {previous}) in {run_dir}: "
                "rounds only move forward; resume at load_latest(run_dir).round_index + 1"
            )


def save_checkpoint(
    run_dir: Path,
    *,
    round_index: int,
    model: nn.Module,
    layout: Layout,
    meta: dict[str, Any],
    full_state: bool = False,
) -> Path:
    """Write round ``round_index``'s checkpoint and point ``latest.json`` at it; returns the weights path.

    Every argument is checked (layout against the model, ``meta`` as JSON) before anything is written.
    """
    run_dir = Path(run_dir)
    _check_round_index(run_dir, round_index)
    if not isinstance(full_state, bool):
        raise CheckpointError(f"full_state must be a bool, got {full_state!r}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        canonical_json(meta)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"meta must be JSON (str keys, finite numbers, lists, dicts): {exc}") from exc
    tensors = _tensors_to_save(model, layout, full_state=full_state)
    data = safetensors_save(tensors, metadata={"format": CHECKPOINT_FORMAT, "round_index": str(round_index)})
    stem = _round_stem(round_index)
    weights = run_dir / f"{stem}.safetensors"
    sidecar = {
        "format": CHECKPOINT_FORMAT,
        "round_index": round_index,
        "weights_file": weights.name,
        "weights_sha256": sha256_hex(data),
        "full_state": full_state,
        "layout": [[name, list(shape)] for name, shape in layout],
        "layout_digest": layout_digest(layout),
        "frozen_digest": frozen_parameters_digest(model),
        "meta": meta,
    }
    write_bytes_atomic(weights, data)
    write_json_atomic(run_dir / f"{stem}.json", sidecar)
    latest = {"format": CHECKPOINT_FORMAT, "round_index": round_index, "sidecar": f"{stem}.json"}
    write_json_atomic(run_dir / LATEST_NAME, latest)
    return weights


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        document = read_json(path)
    except (OSError, ValueError) as exc:
        raise CheckpointCorruptError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointCorruptError(f"{path} is not a {CHECKPOINT_FORMAT} document")
    return document


def _read_latest_round(latest: Path) -> int:
    round_index = _read_json_object(latest).get("round_index")
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise CheckpointCorruptError(f"{latest} has round_index {round_index!r}, not an int >= 0")
    return round_index


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``run_dir``, verified; None when the run has none yet."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST_NAME
    if not latest.is_file():
        return None
    round_index = _read_latest_round(latest)
    return _load_round(run_dir, round_index)


def _load_round(run_dir: Path, round_index: int) -> Checkpoint:
    stem = _round_stem(round_index)
    sidecar = _read_json_object(run_dir / f"{stem}.json")
    if sidecar.get("round_index") != round_index or sidecar.get("weights_file") != f"{stem}.safetensors":
        raise CheckpointCorruptError(f"{run_dir / stem}.json describes another round or file than {stem}")
    weights = run_dir / f"{stem}.safetensors"
    data = weights.read_bytes()
    if sha256_hex(data) != sidecar.get("weights_sha256"):
        raise CheckpointCorruptError(f"{weights} does not match the sha256 in its sidecar: it was modified or truncated")
    try:
        layout = parse_layout(sidecar.get("layout"))
    except ValueError as exc:
        raise CheckpointCorruptError(f"{run_dir / stem}.json has an invalid layout ({exc})") from exc
    full_state = sidecar.get("full_state")
    frozen_digest = sidecar.get("frozen_digest")
    if not isinstance(full_state, bool) or not isinstance(sidecar.get("meta"), dict):
        raise CheckpointCorruptError(f"{run_dir / stem}.json lacks a bool full_state or a dict meta")
    if not isinstance(frozen_digest, str) or len(frozen_digest) != 64:
        raise CheckpointCorruptError(f"{run_dir / stem}.json lacks a hex sha256 frozen_digest")
    tensors = safetensors_load(data)
    if not full_state:
        _check_tensors_match_layout(weights, tensors, layout)
    return Checkpoint(
        round_index=round_index,
        tensors=MappingProxyType(tensors),
        layout=layout,
        full_state=full_state,
        frozen_digest=frozen_digest,
        meta=MappingProxyType(sidecar["meta"]),
        path=weights,
    )


def _check_tensors_match_layout(weights: Path, tensors: Mapping[str, torch.Tensor], layout: Layout) -> None:
    """Same names and exact shapes: ``copy_`` would otherwise broadcast a wrong-shaped tensor."""
    if sorted(name for name, _ in layout) != sorted(tensors):
        raise CheckpointCorruptError(f"{weights} holds other tensors than its sidecar's layout names")
    for name, shape in layout:
        if tuple(tensors[name].shape) != shape:
            raise CheckpointCorruptError(f"{weights}: {name} has shape {tuple(tensors[name].shape)}, the layout says {shape}")


def _check_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    state = model.state_dict()
    if set(state) != set(tensors):
        missing = sorted(set(state) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(state))[:3]
        raise CheckpointError(f"the checkpoint's state dict lacks {missing} and has extra {extra}: not this model")
    for name, value in state.items():
        if tuple(value.shape) != tuple(tensors[name].shape) or value.dtype != tensors[name].dtype:
            raise CheckpointError(
                f"{name} is {tuple(tensors[name].shape)} {tensors[name].dtype} in the checkpoint "
                f"but {tuple(value.shape)} {value.dtype} in the model"
            )


def restore_into(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's weights into ``model`` in place, after checking it is the same model.

    The model must have the same trainable layout; for a trainable-only checkpoint also the same
    frozen weights (build it from the same pretrained checkpoint, or save with ``full_state=True``).
    """
    parameters = trainable_parameters_for(model, checkpoint.layout)
    if checkpoint.full_state:
        _check_state_dict(model, checkpoint.tensors)
        model.load_state_dict(dict(checkpoint.tensors), strict=True)
        return
    if frozen_parameters_digest(model) != checkpoint.frozen_digest:
        raise CheckpointError(
            "the model's frozen parameters differ from those the checkpoint's trainable parameters were "
            "trained on: build the model from the same pretrained weights, or save with full_state=True"
        )
    for (name, _), parameter in zip(checkpoint.layout, parameters, strict=True):
        if checkpoint.tensors[name].dtype != parameter.dtype:
            raise CheckpointError(f"{name} is {checkpoint.tensors[name].dtype} in the checkpoint but {parameter.dtype} in the model")
    with torch.no_grad():
        for (name, _), parameter in zip(checkpoint.layout, parameters, strict=True):
            parameter.copy_(checkpoint.tensors[name])

