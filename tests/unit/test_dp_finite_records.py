"""A record whose per-sample gradient overflows contributes nothing (no membership oracle through NaN)."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from policies.dp import DPPlan, DPPlanError
from policies.dp.engine import _dp_optimizer, _generators
from policies.federated_plan import FederatedPlan, FederatedPlanError

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def _clipped_sum(rows: torch.Tensor, labels: torch.Tensor, *, secure: bool) -> torch.Tensor:
    """The gradient after one DP step without noise (sigma 0), for the batch ``rows``."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    module = GradSampleModule(layer, loss_reduction="sum")
    optimizer = _dp_optimizer(torch.optim.SGD(layer.parameters(), lr=0.0), ghost=False, secure_mode=secure,
                              generators=_generators(CPU, secure_mode=secure, seed=None if secure else 1),
                              noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3)
    nn.functional.cross_entropy(module(rows), labels, reduction="sum").backward()
    optimizer.step()
    return torch.cat([p.grad.reshape(-1) for p in layer.parameters()])


@pytest.mark.parametrize("secure", [True, False])
def test_a_record_whose_gradient_is_not_finite_adds_nothing_to_the_step(secure: bool) -> None:
    # Prepare: two ordinary records, and a third whose input overflows (as a crafted global model makes a
    # chosen review overflow at a site)
    honest = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    poisoned = torch.cat([honest, torch.tensor([[float("inf"), 1.0, 1.0]])])

    # Execute
    with_it = _clipped_sum(poisoned, torch.tensor([0, 1, 1]), secure=secure)
    without_it = _clipped_sum(honest, torch.tensor([0, 1]), secure=secure)

    # Assert: finite, and exactly as if the record were not in the batch
    assert torch.isfinite(with_it).all()
    torch.testing.assert_close(with_it, without_it)
    assert float(without_it.abs().sum()) > 0


def test_a_federated_plan_refuses_ghost_clipping() -> None:
    from tests.unit.test_submission import make_raw_plan

    raw = make_raw_plan()
    raw["dp"] = {**raw["dp"], "clipping_mode": "ghost"}

    assert DPPlan.from_dict(raw["dp"]).clipping_mode == "ghost"  # a DP plan may (benches, tests)
    with pytest.raises(FederatedPlanError, match=r"clipping_mode must be 'hooks' in a federated plan, got 'ghost'"):
        FederatedPlan.parse(raw)
    with pytest.raises(DPPlanError):
        DPPlan.from_dict({**raw["dp"], "clipping_mode": "other"})
