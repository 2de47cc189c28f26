"""The global-model update of federated averaging, on one flat vector of trainable parameters.

Sites and researcher exchange trainable parameters (and their deltas) as one float32 vector: every
parameter with ``requires_grad``, in ``model.named_parameters()`` order, each flattened row-major and
concatenated. That is the order of ``policies.dp.LocalRoundResult.flat_delta``. The ``layout`` (the
list of (name, shape) pairs) is what both sides must agree on; ``layout_digest`` hashes it so a site
can refuse a round whose layout differs from the model it trains. A vector applied to the wrong
layout would silently add one layer's update to another.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", Algorithm 1) updates w_{t+1} = w_t + sum_k (n_k / n) * delta_k. Under secure aggregation
(Bonawitz et al. 2017) the researcher learns only sum_k delta_k over the m participating sites, never
one site's delta or its example count n_k, so the average is uniform:

    w_{t+1} = w_t + eta_s * (1 / m) * sum_k delta_k

with a server learning rate eta_s (Reddi et al. 2021, "Adaptive Federated Optimization", FedOpt with
server SGD); eta_s = 1 is plain FedAvg.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from policies.durable import canonical_json, sha256_hex

# Hashed together with the layout: the digest changes if the vector's encoding ever does.
FLAT_VECTOR_FORMAT = "fedsite-flat-trainable-v1: float32, named_parameters order, row-major"

Layout = list[tuple[str, tuple[int, ...]]]


class FedAvgError(ValueError):
    """An argument of the global-model update is invalid."""


class LayoutMismatchError(FedAvgError):
    """A flat vector or layout does not match the model's trainable parameters."""


def trainable_layout(model: nn.Module) -> Layout:
    """(name, shape) of each trainable parameter, in ``named_parameters()`` order."""
    return [(name, tuple(int(d) for d in p.shape)) for name, p in model.named_parameters() if p.requires_grad]


def layout_size(layout: Layout) -> int:
    """Length of the flat vector: the sum of the parameters' element counts."""
    return sum(math.prod(shape) for _, shape in layout)


def flatten_trainable(model: nn.Module) -> tuple[np.ndarray, Layout]:
    """The trainable parameters as one float32 vector [layout_size(layout)], and their layout."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LayoutMismatchError("the model has no trainable parameters: select some with models.TrainableSet")
    with torch.no_grad():
        vector = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for _, p in named])  # [sum numel]
    return vector.numpy(), trainable_layout(model)  # cat made a fresh tensor: nothing else shares it


def parse_layout(raw: object) -> Layout:
    """A layout from its JSON form ``[[name, [dims...]], ...]`` (or a Layout), checked entry by entry."""
    if not isinstance(raw, list | tuple) or not raw:
        raise LayoutMismatchError(f"a layout must be a non-empty list of [name, shape] pairs, got {type(raw).__name__}")
    layout: Layout = []
    for position, entry in enumerate(raw):
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise LayoutMismatchError(f"layout entry {position} must be a [name, shape] pair, got {entry!r}")
        name, shape = entry
        if not isinstance(name, str) or not name:
            raise LayoutMismatchError(f"layout entry {position} has name {name!r}: names are non-empty strings")
        if not isinstance(shape, list | tuple) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
        ):
            raise LayoutMismatchError(f"layout entry {position} ({name}) has shape {shape!r}: dims are ints >= 0")
        layout.append((name, tuple(shape)))
    names = [name for name, _ in layout]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise LayoutMismatchError(f"layout names {duplicate!r} more than once")
    return layout


def layout_digest(layout: Layout) -> str:
    """Hex SHA-256 of the canonical JSON of the layout and the vector format: what sites and researcher compare."""
    checked = parse_layout(layout)
    document = {"format": FLAT_VECTOR_FORMAT, "parameters": [[name, list(shape)] for name, shape in checked]}
    return sha256_hex(canonical_json(document))


def _describe_difference(expected: Layout, actual: Layout) -> str:
    expected_names = {name for name, _ in expected}
    actual_names = {name for name, _ in actual}
    missing = [name for name, _ in expected if name not in actual_names]
    extra = [name for name, _ in actual if name not in expected_names]
    if missing or extra:
        return f"the model lacks trainable {missing[:3]} and has extra trainable {extra[:3]}"
    for position, (want, have) in enumerate(zip(expected, actual, strict=True)):
        if want[0] != have[0]:
            return f"entry {position} is {want[0]!r} in the layout but {have[0]!r} in the model (order differs)"
        if want[1] != have[1]:
            return f"{want[0]} has shape {want[1]} in the layout but {have[1]} in the model"
    return "no difference"  # unreachable when expected != actual


def trainable_parameters_for(model: nn.Module, layout: Layout) -> list[nn.Parameter]:
    """The model's trainable parameters in layout order, after checking names and shapes match exactly."""
    expected = parse_layout(layout)
    actual = trainable_layout(model)
    if actual != expected:
        raise LayoutMismatchError(
            f"the layout does not match the model's trainable parameters: {_describe_difference(expected, actual)}; "
            "build the model with the same TrainableSet the round was planned with"
        )
    return [p for _, p in model.named_parameters() if p.requires_grad]


def _checked_vector(vector: object, size: int) -> np.ndarray:
    """Refuse anything but a finite 1-D float array of ``size`` elements."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype.kind != "f":
        dtype = getattr(vector, "dtype", type(vector).__name__)
        raise FedAvgError(
            f"the delta must be a 1-D float numpy array, got {dtype} with shape {getattr(vector, 'shape', None)}; "
            "dequantise the secure sum (FixedPointEncoding.decode_sum) before applying it"
        )
    if vector.size != size:
        raise LayoutMismatchError(f"the delta has {vector.size} elements but the layout has {size}")
    return vector


def apply_flat_delta(model: nn.Module, layout: Layout, delta_vector: np.ndarray, *, scale: float) -> None:
    """Add ``scale * delta`` to each trainable parameter named in ``layout``, in place.

    Everything is checked before any parameter changes, so a refused delta leaves the model intact.
    """
    parameters = trainable_parameters_for(model, layout)
    delta = _checked_vector(delta_vector, layout_size(layout))
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise FedAvgError(f"scale must be a finite number, got {scale!r}")
    scaled = (delta.astype(np.float64) * float(scale)).astype(np.float32)  # [size]
    if not np.isfinite(scaled).all():
        bad = int(np.flatnonzero(~np.isfinite(scaled))[0])
        raise FedAvgError(f"scale * delta is not finite at index {bad}: refusing to poison the global model")
    offset = 0
    with torch.no_grad():
        for parameter in parameters:
            count = parameter.numel()
            segment = torch.from_numpy(scaled[offset : offset + count]).reshape(parameter.shape)  # [count] -> shape
            parameter.add_(segment.to(parameter.device, parameter.dtype))
            offset += count

