"""Round checkpoints: exact restore into a fresh model, crash safety, and refusal of the wrong model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import TrainableSet, build_model, tiny_bert_config
from researcher import checkpoints
from researcher.checkpoints import (
    CheckpointCorruptError,
    CheckpointError,
    load_latest,
    restore_into,
    save_checkpoint,
)
from researcher.fedavg import LayoutMismatchError, apply_flat_delta, flatten_trainable, layout_digest

pytestmark = pytest.mark.unit


def _model(seed: int, kind: str = "full") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config=tiny_bert_config(), trainable=TrainableSet(kind=kind, top_k=1))


def _trained(seed: int = 0, kind: str = "full") -> nn.Module:
    """A model whose trainable parameters moved away from their initialisation, as after a round."""
    model = _model(seed, kind)
    vector, layout = flatten_trainable(model)
    apply_flat_delta(model, layout, np.linspace(-1, 1, vector.size, dtype=np.float32), scale=0.01)
    return model


def _assert_same_parameters(restored: nn.Module, saved: nn.Module) -> None:
    saved_state = saved.state_dict()
    restored_state = restored.state_dict()
    assert list(restored_state) == list(saved_state)
    for name, value in saved_state.items():
        assert torch.equal(restored_state[name], value), name


def test_resume_restores_every_parameter_exactly_into_a_fresh_model(tmp_path: Path) -> None:
    # Prepare: round 3 done, then the researcher's process dies
    model = _trained(seed=0)
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=3, model=model, layout=layout, meta={"run_id": "run-a", "seed": 7})
    fresh = _model(seed=99)  # a new process builds the model again, from other random weights

    # Execute
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None
    restore_into(fresh, checkpoint)

    # Assert
    _assert_same_parameters(fresh, model)
    assert checkpoint.round_index + 1 == 4  # the round to continue with
    assert dict(checkpoint.meta) == {"run_id": "run-a", "seed": 7}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest.json", "round-0003.json", "round-0003.safetensors"]


def test_sidecar_and_latest_describe_the_round(tmp_path: Path) -> None:
    # Prepare
    model = _trained()
    _, layout = flatten_trainable(model)

    # Execute
    weights = save_checkpoint(tmp_path, round_index=0, model=model, layout=layout, meta={})

    # Assert
    latest = json.loads((tmp_path / "latest.json").read_text())
    sidecar = json.loads((tmp_path / "round-0000.json").read_text())
    assert latest == {"format": "fedsite-checkpoint-v1", "round_index": 0, "sidecar": "round-0000.json"}
    assert sidecar["layout_digest"] == layout_digest(layout)
    assert sidecar["full_state"] is False
    assert sidecar["weights_file"] == weights.name == "round-0000.safetensors"
    header_length = struct.unpack("<Q", weights.read_bytes()[:8])[0]  # safetensors: u64 header size, JSON header
    header = json.loads(weights.read_bytes()[8 : 8 + header_length])
    assert set(header) - {"__metadata__"} == {name for name, _ in layout}


def test_latest_moves_forward_with_each_round(tmp_path: Path) -> None:
    # Prepare
    model = _trained()
    _, layout = flatten_trainable(model)
    for round_index in range(3):
        save_checkpoint(tmp_path, round_index=round_index, model=model, layout=layout, meta={})

    # Execute
    checkpoint = load_latest(tmp_path)

    # Assert
    assert checkpoint is not None
    assert checkpoint.round_index == 2
    assert checkpoint.path == tmp_path / "round-0002.safetensors"


def test_a_crash_before_latest_is_written_leaves_the_previous_round_current(tmp_path, monkeypatch) -> None:
    # Prepare: round 0 saved; round 1's weights and sidecar land, then the process dies
    model = _trained()
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=0, model=model, layout=layout, meta={"round": 0})
    real_write = checkpoints.write_json_atomic

    def dies_at_latest(path: Path, document: object) -> None:
        if Path(path).name == "latest.json":
            raise KeyboardInterrupt("process killed")
        real_write(path, document)

    monkeypatch.setattr(checkpoints, "write_json_atomic", dies_at_latest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, round_index=1, model=model, layout=layout, meta={"round": 1})
    monkeypatch.undo()

    # Execute
    checkpoint = load_latest(tmp_path)

    # Assert: resume redoes round 1, and may overwrite its orphaned files
    assert checkpoint is not None
    assert (checkpoint.round_index, dict(checkpoint.meta)) == (0, {"round": 0})
    assert (tmp_path / "round-0001.safetensors").is_file()
    save_checkpoint(tmp_path, round_index=1, model=model, layout=layout, meta={"round": 1})
    assert load_latest(tmp_path).round_index == 1  # type: ignore[union-attr]


def test_load_latest_of_a_new_run_is_none(tmp_path: Path) -> None:
    # Execute / Assert
    assert load_latest(tmp_path / "not-yet-created") is None
    assert load_latest(tmp_path) is None


def test_trainable_only_checkpoint_restores_onto_the_same_frozen_weights(tmp_path: Path) -> None:
    # Prepare: top_k trains the last layer and head; the frozen rest is what build_model gives again
    model = _trained(seed=5, kind="top_k")
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=1, model=model, layout=layout, meta={})
    fresh = _model(seed=5, kind="top_k")

    # Execute
    restore_into(fresh, load_latest(tmp_path))  # type: ignore[arg-type]

    # Assert
    _assert_same_parameters(fresh, model)
    assert list(load_latest(tmp_path).tensors) != []  # type: ignore[union-attr]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_checkpoint_holds_adapters_and_head_and_restores_exactly(tmp_path: Path) -> None:
    # Prepare
    model = _trained(seed=2, kind="lora")
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=0, model=model, layout=layout, meta={})
    fresh = _model(seed=2, kind="lora")

    # Execute
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None
    restore_into(fresh, checkpoint)

    # Assert
    _assert_same_parameters(fresh, model)
    assert all("lora_" in name or "modules_to_save" in name for name in checkpoint.tensors)
    assert sorted(checkpoint.tensors) == sorted(name for name, _ in layout)


def test_trainable_only_checkpoint_refuses_other_frozen_weights_and_changes_nothing(tmp_path: Path) -> None:
    # Prepare
    model = _trained(seed=5, kind="top_k")
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=1, model=model, layout=layout, meta={})
    other = _model(seed=6, kind="top_k")
    before = {name: p.detach().clone() for name, p in other.named_parameters()}

    # Execute / Assert
    with pytest.raises(CheckpointError, match="frozen parameters differ.*save with full_state=True"):
        restore_into(other, load_latest(tmp_path))  # type: ignore[arg-type]
    assert all(torch.equal(p, before[name]) for name, p in other.named_parameters())


def test_full_state_checkpoint_restores_onto_any_initialisation(tmp_path: Path) -> None:
    # Prepare
    model = _trained(seed=5, kind="top_k")
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=2, model=model, layout=layout, meta={}, full_state=True)
    other = _model(seed=6, kind="top_k")

    # Execute
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None
    restore_into(other, checkpoint)

    # Assert
    assert checkpoint.full_state is True
    _assert_same_parameters(other, model)


def test_restore_refuses_a_model_with_another_trainable_set(tmp_path: Path) -> None:
    # Prepare
    model = _trained(kind="top_k")
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=0, model=model, layout=layout, meta={})

    # Execute / Assert
    with pytest.raises(LayoutMismatchError, match="the model lacks trainable"):
        restore_into(_model(0, kind="full"), load_latest(tmp_path))  # type: ignore[arg-type]


def test_modified_weights_are_detected(tmp_path: Path) -> None:
    # Prepare: flip one byte at the end of the tensor data
    model = _trained()
    _, layout = flatten_trainable(model)
    weights = save_checkpoint(tmp_path, round_index=0, model=model, layout=layout, meta={})
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(CheckpointCorruptError, match="does not match the sha256 in its sidecar"):
        load_latest(tmp_path)


def test_rounds_only_move_forward(tmp_path: Path) -> None:
    # Prepare
    model = _trained()
    _, layout = flatten_trainable(model)
    save_checkpoint(tmp_path, round_index=4, model=model, layout=layout, meta={})

    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"round_index=4 is not after the latest checkpoint \(round 4\)"):
        save_checkpoint(tmp_path, round_index=4, model=model, layout=layout, meta={})
    with pytest.raises(CheckpointError, match="round_index must be an int >= 0, got -1"):
        save_checkpoint(tmp_path / "other", round_index=-1, model=model, layout=layout, meta={})


def test_non_json_meta_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # Prepare
    model = _trained()
    _, layout = flatten_trainable(model)

    # Execute / Assert
    with pytest.raises(CheckpointError, match="meta must be JSON"):
        save_checkpoint(tmp_path, round_index=0, model=model, layout=layout, meta={"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []
