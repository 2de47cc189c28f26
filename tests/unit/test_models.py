"""Model construction and trainable-set selection."""

from __future__ import annotations

import pytest

from researcher.models import (
    ModelConfigError,
    TrainableSet,
    build_model,
    default_model_path,
    tiny_bert_config,
    trainable_parameter_count,
)

pytestmark = pytest.mark.unit


def _trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_full_trains_every_parameter_including_embeddings() -> None:
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="full"))
    names = _trainable_names(model)
    assert names == {name for name, _ in model.named_parameters()}
    assert "bert.embeddings.position_embeddings.weight" in names


def test_top_k_trains_last_layers_pooler_and_classifier() -> None:
    model = build_model(config=tiny_bert_config(layers=3), trainable=TrainableSet(kind="top_k", top_k=1))
    prefixes = {name.split(".")[0] if name.startswith("classifier") else ".".join(name.split(".")[:4]) for name in _trainable_names(model)}
    assert prefixes == {"bert.encoder.layer.2", "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier"}


def test_lora_trains_adapters_and_head_only() -> None:
    # Prepare / Execute
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="lora", lora_rank=4))

    # Assert: 2 layers x (query, value) x (A: 4x32, B: 32x4) + head (pooler 32x32+32, classifier 2x32+2)
    names = _trainable_names(model)
    assert sum("lora_A" in n for n in names) == 4 and sum("lora_B" in n for n in names) == 4
    assert trainable_parameter_count(model) == 8 * 128 + (32 * 32 + 32) + (2 * 32 + 2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "prefix"}, r"kind must be one of \('full', 'top_k', 'lora'\), got 'prefix'"),
        ({"top_k": 0}, r"top_k must be an int >= 1, got 0"),
        ({"lora_rank": -1}, r"lora_rank must be an int >= 1, got -1"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"lora_targets": ("LayerNorm",)}, r"lora_targets contains 'LayerNorm', which is not a supported layer"),
    ],
)
def test_trainable_set_rejects_bad_options(fields: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        TrainableSet(**fields)


def test_top_k_beyond_the_model_depth_is_refused() -> None:
    with pytest.raises(ModelConfigError, match=r"top_k must be <= the model's 2 encoder layers, got 3"):
        build_model(config=tiny_bert_config(layers=2), trainable=TrainableSet(kind="top_k", top_k=3))


@pytest.mark.slow
def test_default_model_loads_offline_from_the_package() -> None:
    # Prepare / Execute
    model = build_model(trainable=TrainableSet(kind="lora"))

    # Assert
    assert (default_model_path() / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
