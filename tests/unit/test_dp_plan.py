"""Bad DP plans are refused before any training, with the parameter and its value in the message."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from models import TrainableSet, build_model, tiny_bert_config
from policies.budget import BudgetBook, PrivacyBudget
from policies.dp import DPPlan, DPPlanError, UnsupportedLayerError, calibrate_plan, check_trainable_layers
from policies.ledger import BudgetExceededError, PrivacyLedger

pytestmark = pytest.mark.unit

ALICE = "a11ce0000000000000000000000000a1"  # the researcher's syft user id

GOOD = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 64, "local_steps": 10, "rounds": 5, "noise_multiplier": 1.0}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"clip_norm": 0.0}, r"clip_norm must be > 0, got 0.0"),
        ({"clip_norm": -1.0}, r"clip_norm must be > 0, got -1.0"),
        ({"noise_multiplier": -0.5}, r"noise_multiplier must be > 0, got -0.5"),
        ({"noise_multiplier": None, "target_epsilon": 0.0}, r"target_epsilon must be > 0, got 0.0"),
        ({"noise_multiplier": None, "target_epsilon": -3.0}, r"target_epsilon must be > 0, got -3.0"),
        ({"target_epsilon": 3.0}, r"exactly one of target_epsilon and noise_multiplier, got target_epsilon=3.0"),
        ({"noise_multiplier": None}, r"exactly one of target_epsilon and noise_multiplier, got target_epsilon=None"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"expected_batch_size": 0}, r"expected_batch_size must be >= 1, got 0"),
        ({"local_steps": 2.5}, r"local_steps must be an int, got 2.5"),
        ({"rounds": True}, r"rounds must be an int, got True"),
        ({"clip_norm": float("nan")}, r"clip_norm must be finite, got nan"),
        ({"accountant": "gdp"}, r"accountant must be one of \('prv', 'rdp'\), got 'gdp'"),
        ({"clipping_mode": "functorch"}, r"clipping_mode must be one of \('ghost', 'hooks'\), got 'functorch'"),
        ({"secure_mode": 1}, r"secure_mode must be a bool, got 1"),
        ({"average_last_steps": -1}, r"average_last_steps must be in \[0, local_steps\] = \[0, 10\], got -1"),
        ({"average_last_steps": 11}, r"average_last_steps must be in \[0, local_steps\] = \[0, 10\], got 11: "
                                     r"0 releases the last iterate, 10 the mean of all the round's iterates"),
        ({"average_last_steps": 1.5}, r"average_last_steps must be an int, got 1.5"),
    ],
)
def test_plan_rejects_out_of_range_parameters(fields: dict, message: str) -> None:
    with pytest.raises(DPPlanError, match=message):
        DPPlan(**(GOOD | fields))


def test_delta_not_below_one_over_n_is_refused() -> None:
    plan = DPPlan(**(GOOD | {"delta": 1e-3}))
    with pytest.raises(DPPlanError, match=r"delta=0.001 is not below 1/n_records=0.001 for 1000 records"):
        plan.check_records(1000)


def test_batch_larger_than_the_data_is_refused() -> None:
    plan = DPPlan(**GOOD)
    with pytest.raises(DPPlanError, match=r"expected_batch_size=64 is larger than the data \(50 records\)"):
        plan.check_records(50)


def test_plan_parses_from_json_data_and_refuses_unknown_fields() -> None:
    # Prepare
    raw = GOOD | {"clip_norm": 1, "accountant": "rdp"}

    # Execute
    plan = DPPlan.from_dict(raw)

    # Assert
    assert plan.clip_norm == 1.0 and plan.total_steps == 50
    assert DPPlan.from_dict(plan.to_dict()) == plan
    assert plan.average_last_steps == 0 and DPPlan.from_dict(raw | {"average_last_steps": 5}).average_last_steps == 5
    with pytest.raises(DPPlanError, match=r"unknown DP plan fields \['seed'\]"):
        DPPlan.from_dict(GOOD | {"seed": 0})


def test_unsupported_trainable_layer_is_named() -> None:
    # Prepare: a trainable layer type with no exact per-sample gradient
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="top_k", top_k=1))
    model.classifier = nn.Bilinear(32, 32, 2)

    # Execute / Assert
    with pytest.raises(UnsupportedLayerError, match=r"trainable layer 'classifier' is a Bilinear"):
        check_trainable_layers(model, clipping_mode="ghost")


def test_frozen_model_is_refused() -> None:
    model = build_model(config=tiny_bert_config())
    model.requires_grad_(False)
    with pytest.raises(UnsupportedLayerError, match=r"no trainable parameters"):
        check_trainable_layers(model, clipping_mode="hooks")


def test_calibration_refuses_a_plan_over_the_budget(tmp_path: Path) -> None:
    # Prepare
    BudgetBook(tmp_path).set("imdb", PrivacyBudget(epsilon=1.0, delta=1e-5), n_records=10_000)
    ledger = PrivacyLedger(tmp_path, "imdb", ALICE, site="site-a", accountant="rdp")
    plan = DPPlan(**(GOOD | {"noise_multiplier": 0.6, "accountant": "rdp"}))

    # Execute / Assert
    with pytest.raises(BudgetExceededError, match=r"site 'site-a' refuses the plan .* over the budget epsilon=1\b"):
        calibrate_plan(plan, n_records=10_000, ledger=ledger)


def test_a_plan_of_more_dp_steps_than_a_review_can_account_is_refused() -> None:
    from policies.dp.plan import MAX_TOTAL_STEPS

    base = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 8, "target_epsilon": 3.0}
    DPPlan.from_dict({**base, "rounds": 100, "local_steps": MAX_TOTAL_STEPS // 100})  # at the bound: accepted

    with pytest.raises(DPPlanError, match=r"rounds x local_steps = 100,100 is over 100,000 DP steps"):
        DPPlan.from_dict({**base, "rounds": 100, "local_steps": MAX_TOTAL_STEPS // 100 + 1})
