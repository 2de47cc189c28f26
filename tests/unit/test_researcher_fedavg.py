"""The FedAvg global-model update on the flat trainable vector, against per-parameter references."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from models import TrainableSet, build_model, tiny_bert_config
from policies.dp import trainable_parameters
from researcher.fedavg import (
    FLAT_VECTOR_FORMAT,
    FedAvgError,
    LayoutMismatchError,
    apply_flat_delta,
    flatten_trainable,
    layout_digest,
    layout_size,
    parse_layout,
)

pytestmark = pytest.mark.unit


def _model(seed: int = 0, kind: str = "full") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config=tiny_bert_config(), trainable=TrainableSet(kind=kind, top_k=1))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _site_delta(layout: list[tuple[str, tuple[int, ...]]], seed: int) -> np.ndarray:
    """Multiples of 1/64 in [-1, 1]: sums, means over 4 sites and float32 adds are all exact."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-64, 65, size=layout_size(layout)) / 64).astype(np.float32)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["top_k", "lora"])
def test_flatten_concatenates_trainable_parameters_in_the_sites_order(kind: str) -> None:
    # Prepare
    model = _model(kind=kind)
    site_named = trainable_parameters(model)  # what policies.dp.LocalRoundResult.flat_delta follows

    # Execute
    vector, layout = flatten_trainable(model)

    # Assert
    assert [name for name, _ in layout] == [name for name, _ in site_named]
    assert [shape for _, shape in layout] == [tuple(p.shape) for _, p in site_named]
    assert vector.dtype == np.float32
    assert vector.shape == (sum(p.numel() for _, p in site_named),)
    reference = np.concatenate([p.detach().numpy().reshape(-1) for _, p in site_named])
    np.testing.assert_array_equal(vector, reference)
    assert not any(name.endswith("layer.0.attention.self.query.weight") for name, _ in layout)  # frozen in both


def test_apply_flat_delta_matches_a_per_parameter_reference() -> None:
    # Prepare
    model = _model()
    before = _snapshot(model)
    _, layout = flatten_trainable(model)
    delta = _site_delta(layout, seed=1)
    offsets = np.cumsum([0] + [int(np.prod(shape)) for _, shape in layout])

    # Execute
    apply_flat_delta(model, layout, delta, scale=0.5)

    # Assert: reference adds 0.5 * its own slice to each parameter, one name at a time
    after = dict(model.named_parameters())
    for index, (name, shape) in enumerate(layout):
        piece = torch.from_numpy(delta[offsets[index] : offsets[index + 1]].reshape(shape))
        assert torch.equal(after[name].detach(), before[name] + 0.5 * piece), name


def test_a_scaled_sum_adds_the_mean_of_the_site_deltas() -> None:
    # Prepare: four sites, of which the secure sum reveals only the total
    model = _model()
    before = _snapshot(model)
    vector_before, layout = flatten_trainable(model)
    deltas = [_site_delta(layout, seed=site) for site in range(4)]
    summed = np.sum(np.stack(deltas).astype(np.float64), axis=0)  # [4, d] -> [d], as decode_sum returns

    # Execute
    apply_flat_delta(model, layout, summed, scale=1 / 4)  # FedAvg: the sum over 4 participants / 4

    # Assert
    vector_after, _ = flatten_trainable(model)
    np.testing.assert_array_equal(vector_after, vector_before + np.mean(np.stack(deltas), axis=0))
    assert not torch.equal(dict(model.named_parameters())["classifier.weight"], before["classifier.weight"])


def test_the_scale_carries_the_server_learning_rate() -> None:
    # Prepare
    model = _model()
    vector_before, layout = flatten_trainable(model)
    summed = np.full(layout_size(layout), 2.0)

    # Execute
    apply_flat_delta(model, layout, summed, scale=0.25 / 2)  # server_lr 0.25, 2 participants

    # Assert: 0.25 * 2.0 / 2 = 0.25 added everywhere
    vector_after, _ = flatten_trainable(model)
    np.testing.assert_array_equal(vector_after, vector_before + np.float32(0.25))


@pytest.mark.parametrize(
    ("make_delta", "message"),
    [
        (lambda size: np.zeros(size - 1, dtype=np.float32), r"has \d+ elements but the layout has \d+"),
        (lambda size: np.zeros(size, dtype=np.uint64), r"1-D float numpy array, got uint64.*dequantise"),
        (lambda size: np.zeros((1, size), dtype=np.float32), r"1-D float numpy array, got float32 with shape \(1, "),
        (lambda size: np.zeros(size).tolist(), r"1-D float numpy array, got list"),
        (lambda size: np.concatenate([np.zeros(size - 1), [np.nan]]), r"not finite at index \d+"),
    ],
)
def test_apply_flat_delta_refuses_a_bad_vector_and_leaves_the_model_untouched(make_delta, message) -> None:
    # Prepare
    model = _model()
    before = _snapshot(model)
    _, layout = flatten_trainable(model)

    # Execute / Assert
    with pytest.raises(FedAvgError, match=message):
        apply_flat_delta(model, layout, make_delta(layout_size(layout)), scale=1.0)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_apply_flat_delta_names_the_parameters_a_different_trainable_set_adds() -> None:
    # Prepare: the layout of a top_k model applied to a fully trainable one
    _, layout = flatten_trainable(_model(kind="top_k"))
    model = _model(kind="full")

    # Execute / Assert
    with pytest.raises(LayoutMismatchError, match=r"extra trainable \['bert.embeddings.word_embeddings.weight'"):
        apply_flat_delta(model, layout, np.zeros(layout_size(layout), dtype=np.float32), scale=1.0)


def test_apply_flat_delta_names_a_shape_that_differs() -> None:
    # Prepare
    model = _model()
    _, layout = flatten_trainable(model)
    layout[-1] = ("classifier.bias", (3,))

    # Execute / Assert
    with pytest.raises(LayoutMismatchError, match=r"classifier.bias has shape \(3,\) in the layout but \(2,\) in the model"):
        apply_flat_delta(model, layout, np.zeros(layout_size(layout), dtype=np.float32), scale=1.0)


def test_apply_flat_delta_names_an_order_that_differs() -> None:
    # Prepare
    model = _model()
    _, layout = flatten_trainable(model)
    layout[-2], layout[-1] = layout[-1], layout[-2]

    # Execute / Assert
    with pytest.raises(LayoutMismatchError, match=r"entry \d+ is 'classifier.bias' in the layout but 'classifier.weight'"):
        apply_flat_delta(model, layout, np.zeros(layout_size(layout), dtype=np.float32), scale=1.0)


def test_layout_digest_is_sha256_of_the_canonical_json() -> None:
    # Prepare
    layout = [("classifier.weight", (2, 32)), ("classifier.bias", (2,))]
    expected_text = (
        '{"format":"' + FLAT_VECTOR_FORMAT + '","parameters":[["classifier.weight",[2,32]],["classifier.bias",[2]]]}'
    )

    # Execute
    digest = layout_digest(layout)

    # Assert
    assert digest == hashlib.sha256(expected_text.encode("utf-8")).hexdigest()


def test_layout_digest_agrees_across_seeds_and_differs_across_trainable_sets() -> None:
    # Prepare
    _, layout_a = flatten_trainable(_model(seed=1))
    _, layout_b = flatten_trainable(_model(seed=2))
    _, layout_top = flatten_trainable(_model(seed=1, kind="top_k"))

    # Execute
    digests = [layout_digest(layout) for layout in (layout_a, layout_b, layout_top)]

    # Assert
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_parse_layout_round_trips_json_and_rejects_bad_entries() -> None:
    # Prepare
    _, layout = flatten_trainable(_model(kind="top_k"))
    wire = json.loads(json.dumps(layout))

    # Execute
    parsed = parse_layout(wire)

    # Assert
    assert parsed == layout
    assert layout_digest(wire) == layout_digest(layout)
    with pytest.raises(LayoutMismatchError, match=r"layout entry 0 \(a\) has shape \[True\]"):
        parse_layout([["a", [True]]])
    with pytest.raises(LayoutMismatchError, match="layout names 'a' more than once"):
        parse_layout([["a", [1]], ["a", [2]]])
