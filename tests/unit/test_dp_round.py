"""One federated round at a site: trains and spends on the private partition, neither on the mock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import models.tokens as tokens_module
import policies.dp.engine as engine_module
from models import TrainableSet, build_model, tiny_bert_config
from policies.accounting import epsilon_of
from policies.budget import BudgetBook, PrivacyBudget
from policies.dp import (
    CalibratedPlan,
    DPPlan,
    DPPlanError,
    calibrate_plan,
    local_dp_round,
    trainable_parameters,
)
from policies.fingerprint import partition_fingerprint
from policies.ledger import BudgetExceededError, PrivacyLedger
from tests.models_fixtures import tiny_tokenizer

pytestmark = pytest.mark.unit

ALICE = "a11ce0000000000000000000000000a1"  # the researcher's syft user id

WORDS = ("good", "bad", "movie", "film", "great", "awful", "plot", "actor")
N = 120


def _partition() -> tuple[list[str], list[int]]:
    texts = [f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]} movie number {'x' * (i % 5)}" for i in range(N)]
    return texts, [i % 2 for i in range(N)]


def _setup(tmp_path: Path, *, epsilon: float = 20.0, mode: str = "ghost", kind: str = "full"):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer", words=WORDS)
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=len(tokenizer)), trainable=TrainableSet(kind=kind))
    BudgetBook(tmp_path).set("imdb", PrivacyBudget(epsilon=epsilon, delta=1e-3), n_records=N)
    ledger = PrivacyLedger(tmp_path, "imdb", ALICE, site="site-a", accountant="rdp")
    plan = DPPlan(
        clip_norm=1.0,
        delta=1e-3,
        expected_batch_size=16,
        local_steps=2,
        rounds=3,
        noise_multiplier=1.0,
        max_physical_batch_size=8,
        max_length=24,
        accountant="rdp",
        clipping_mode=mode,
    )
    return model, tokenizer, ledger, calibrate_plan(plan, n_records=N, ledger=ledger)


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in trainable_parameters(model)}


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_private_round_trains_spends_once_and_returns_the_delta(tmp_path: Path, mode: str) -> None:
    # Prepare: every parameter trainable, position and token-type embeddings included
    model, tokenizer, ledger, plan = _setup(tmp_path, mode=mode)
    texts, labels = _partition()
    before = _parameters(model)

    # Execute
    result = local_dp_round(
        model, texts, labels, tokenizer=tokenizer, plan=plan, ledger=ledger,
        private_fingerprint=partition_fingerprint(texts, labels), run_id="run-1", round_index=0,
    )

    # Assert
    after = _parameters(model)
    assert not result.is_mock
    assert result.names == tuple(before) and "bert.embeddings.position_embeddings.weight" in result.names
    for name in result.names:
        torch.testing.assert_close(result.delta[name], after[name] - before[name])
    assert float(result.delta["bert.embeddings.position_embeddings.weight"].abs().sum()) > 0
    assert result.flat_delta().shape == (sum(t.numel() for t in before.values()),)
    assert result.event is not None and result.event.history_entry() == (1.0, 16 / N, 2)
    assert [r.round_index for r in ledger.records()] == [0]
    assert ledger.spent() == epsilon_of([(1.0, 16 / N, 2)], delta=1e-3, accountant="rdp")
    assert not model._forward_pre_hooks and not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_mock_run_neither_trains_nor_spends(tmp_path: Path) -> None:
    # Prepare: syft's second execution hands the function the mock partition
    model, tokenizer, ledger, plan = _setup(tmp_path)
    texts, labels = _partition()
    mock_texts, mock_labels = [t.upper() for t in texts[:40]], labels[:40]
    before = _parameters(model)

    # Execute
    result = local_dp_round(
        model, mock_texts, mock_labels, tokenizer=tokenizer, plan=plan, ledger=ledger,
        private_fingerprint=partition_fingerprint(texts, labels), run_id="run-1", round_index=0,
    )

    # Assert
    assert result.is_mock and result.event is None and result.ledger_record is None
    assert result.shapes == tuple(tuple(t.shape) for t in before.values())
    assert float(result.flat_delta().abs().sum()) == 0.0
    assert ledger.records() == []
    for name, value in _parameters(model).items():
        assert torch.equal(value, before[name])


def test_round_over_budget_is_refused_before_training(tmp_path: Path) -> None:
    # Prepare: 2 steps at sigma=1, q=0.13 cost epsilon ~1.9 (RDP); the budget is 1.0
    model, tokenizer, ledger, _ = _setup(tmp_path, epsilon=100.0)
    BudgetBook(tmp_path).set("imdb", PrivacyBudget(epsilon=1.0, delta=1e-3), n_records=N, replace=True)
    plan = CalibratedPlan.from_dict(_setup(tmp_path / "other")[3].to_dict())
    texts, labels = _partition()
    before = _parameters(model)

    # Execute / Assert
    with pytest.raises(BudgetExceededError, match=r"site 'site-a' refuses .* over the budget epsilon=1 "):
        local_dp_round(
            model, texts, labels, tokenizer=tokenizer, plan=plan, ledger=ledger,
            private_fingerprint=partition_fingerprint(texts, labels), run_id="run-1", round_index=0,
        )
    assert ledger.records() == []
    for name, value in _parameters(model).items():
        assert torch.equal(value, before[name])


def test_partition_of_another_size_than_calibrated_is_refused(tmp_path: Path) -> None:
    model, tokenizer, ledger, plan = _setup(tmp_path)
    texts, labels = _partition()
    with pytest.raises(DPPlanError, match=r"calibrated for n_records=120, the partition has 100"):
        local_dp_round(
            model, texts[:100], labels[:100], tokenizer=tokenizer, plan=plan, ledger=ledger,
            private_fingerprint=partition_fingerprint(texts[:100], labels[:100]), run_id="run-1", round_index=0,
        )


def test_lora_round_returns_only_adapter_and_head_deltas(tmp_path: Path) -> None:
    # Prepare
    model, tokenizer, ledger, plan = _setup(tmp_path, kind="lora")
    texts, labels = _partition()

    # Execute
    result = local_dp_round(
        model, texts, labels, tokenizer=tokenizer, plan=plan, ledger=ledger,
        private_fingerprint=partition_fingerprint(texts, labels), run_id="run-1", round_index=0,
    )

    # Assert
    assert result.names and all(("lora_" in n) or ("modules_to_save" in n) for n in result.names)
    assert any("classifier" in n for n in result.names)


def test_calibration_takes_the_larger_noise_of_target_and_budget(tmp_path: Path) -> None:
    # Prepare: a generous target (50) and a budget of 4: the budget decides
    BudgetBook(tmp_path).set("imdb", PrivacyBudget(epsilon=4.0, delta=1e-5), n_records=10_000)
    ledger = PrivacyLedger(tmp_path, "imdb", ALICE, site="site-a", accountant="rdp")
    common = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 100, "local_steps": 50, "rounds": 4, "accountant": "rdp"}

    # Execute
    budget_bound = calibrate_plan(DPPlan(**common, target_epsilon=50.0), n_records=10_000, ledger=ledger)
    target_bound = calibrate_plan(DPPlan(**common, target_epsilon=1.0), n_records=10_000, ledger=ledger)

    # Assert
    assert 4.0 - 0.01 <= budget_bound.projected_epsilon <= 4.0
    assert 1.0 - 0.01 <= target_bound.run_epsilon <= 1.0
    assert target_bound.noise_multiplier > budget_bound.noise_multiplier
    assert budget_bound.sample_rate == 0.01


def test_failure_mid_round_leaves_no_unaccounted_trace_in_the_model(tmp_path: Path, monkeypatch) -> None:
    # Prepare: the fourth physical batch fails, after at least one noisy step was taken
    import policies.dp.engine as dp

    model, tokenizer, ledger, plan = _setup(tmp_path, mode="hooks")
    texts, labels = _partition()
    before = _parameters(model)
    calls = {"n": 0}
    original = dp._physical_step

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(dp, "_physical_step", failing_step)

    # Execute
    with pytest.raises(RuntimeError, match="simulated device failure"):
        local_dp_round(
            model, texts, labels, tokenizer=tokenizer, plan=plan, ledger=ledger,
            private_fingerprint=partition_fingerprint(texts, labels), run_id="run-1", round_index=0,
        )

    # Assert: parameters restored, no un-noised gradient sums or captured inputs left, nothing spent
    assert ledger.records() == []
    for name, value in _parameters(model).items():
        assert torch.equal(value, before[name])
    for parameter in model.parameters():
        assert parameter.grad is None
        assert not hasattr(parameter, "summed_grad") and not hasattr(parameter, "grad_sample")
    assert not any(hasattr(module, "activations") for module in model.modules())


def test_private_round_truncates_as_the_plan_says(tmp_path: Path, monkeypatch) -> None:
    # Prepare: a plan that keeps the last 6 tokens of a long text, and a spy on the tokenization
    model, tokenizer, ledger, plan = _setup(tmp_path)
    plan = dataclasses.replace(plan, plan=dataclasses.replace(plan.plan, tail_tokens=6))
    texts, labels = _partition()
    seen: list[tuple[int, int, int]] = []
    real = tokens_module.tokenize

    def spy(tokenizer, texts, *, max_length, tail_tokens=0, padding=True):
        seen.append((len(texts), max_length, tail_tokens))
        return real(tokenizer, texts, max_length=max_length, tail_tokens=tail_tokens, padding=padding)

    monkeypatch.setattr(tokens_module, "tokenize", spy)

    # Execute
    local_dp_round(model, texts, labels, tokenizer=tokenizer, plan=plan, ledger=ledger,
                   private_fingerprint=partition_fingerprint(texts, labels), run_id="run-1", round_index=0)

    # Assert
    assert seen == [(N, 24, 6)]


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_round_releases_the_mean_of_its_last_iterates_when_the_plan_asks(tmp_path: Path, monkeypatch, mode: str) -> None:
    # Prepare: 5 local steps, the last 3 averaged; a spy keeps every iterate the averaging is offered
    model, tokenizer, ledger, plan = _setup(tmp_path, mode=mode)
    plan = dataclasses.replace(plan, plan=dataclasses.replace(plan.plan, local_steps=5, average_last_steps=3))
    texts, labels = _partition()
    before = _parameters(model)
    iterates: list[tuple[int, dict[str, torch.Tensor]]] = []
    real = engine_module._TailAverage.after_step

    def spy(self, step: int) -> None:
        iterates.append((step, _parameters(model)))
        real(self, step)

    monkeypatch.setattr(engine_module._TailAverage, "after_step", spy)

    # Execute
    result = local_dp_round(
        model, texts, labels, tokenizer=tokenizer, plan=plan, ledger=ledger,
        private_fingerprint=partition_fingerprint(texts, labels), run_id="run-1", round_index=0,
    )

    # Assert: one iterate per logical step; the model and the delta are the mean of the last three
    assert [step for step, _ in iterates] == [1, 2, 3, 4, 5]
    after = _parameters(model)
    for name in result.names:
        mean = torch.stack([values[name] for _, values in iterates[-3:]]).double().mean(0).float()
        torch.testing.assert_close(after[name], mean)
        torch.testing.assert_close(result.delta[name], mean - before[name])
    last = iterates[-1][1]
    assert any(not torch.allclose(after[name], last[name]) for name in result.names)
    assert [record.steps for record in ledger.records()] == [5]
