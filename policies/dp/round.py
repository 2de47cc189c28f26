"""One federated round at a site: check, train under DP-SGD, spend in the ledger, return the delta.

See ``local_dp_round`` and the package docstring (``policies.dp``) for the order of the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from models.spec import ModelConfigError
from models.tokens import encode_texts
from policies.accounting import HistoryEntry, PrivacyEvent
from policies.dp.calibration import CalibratedPlan
from policies.dp.engine import _dp_training, _run_steps, _TailAverage
from policies.dp.layers import check_trainable_layers, trainable_parameters
from policies.dp.plan import DPPlanError
from policies.fingerprint import partition_fingerprint
from policies.ledger import LedgerRecord, PrivacyLedger


@dataclass(frozen=True)
class LocalRoundResult:
    """What one round at one site produced; nothing in it has left the site yet.

    ``delta`` maps each trainable parameter name (as in ``model.named_parameters()``) to
    trained - initial, float32 on CPU, in ``names`` order. For syft's mock execution it is all zeros,
    ``is_mock`` is True and ``event``/``ledger_record`` are None. ``mean_loss`` and ``n_examples``
    are computed from private data without noise: keep them inside the site or release them only
    through the secure sum (DESIGN.md, "Privacy").
    """

    names: tuple[str, ...]
    delta: dict[str, torch.Tensor]
    event: PrivacyEvent | None
    ledger_record: LedgerRecord | None
    n_examples: int
    mean_loss: float
    is_mock: bool

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(self.delta[name].shape) for name in self.names)

    def flat_delta(self) -> torch.Tensor:
        """All deltas concatenated in ``names`` order: float32 [sum of numels]."""
        return torch.cat([self.delta[name].reshape(-1) for name in self.names])


def _restore(named: list[tuple[str, nn.Parameter]], initial: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in named:
            parameter.copy_(initial[name])


def _mock_result(named: list[tuple[str, nn.Parameter]]) -> LocalRoundResult:
    delta = {name: torch.zeros(parameter.shape, dtype=torch.float32) for name, parameter in named}
    return LocalRoundResult(
        names=tuple(delta), delta=delta, event=None, ledger_record=None, n_examples=0, mean_loss=0.0, is_mock=True
    )


def train_dp_sgd(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    plan: CalibratedPlan,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, list[HistoryEntry]]:
    """``plan.plan.local_steps`` DP-SGD steps on ``dataset`` (no fingerprint, no ledger: the caller's job).

    With ``plan.plan.average_last_steps`` = k > 0 the model ends as the mean of its last k iterates.

    Returns the mean training loss (site-internal, not DP) and the history Opacus's accountant saw.
    Used by ``local_dp_round`` and by the centralised benchmarks, so both run the same code.
    """
    p = plan.plan
    training = _dp_training(
        model,
        dataset,
        noise_multiplier=plan.noise_multiplier,
        clip_norm=p.clip_norm,
        sample_rate=plan.sample_rate,
        expected_batch_size=p.expected_batch_size,
        clipping_mode=p.clipping_mode,
        optimizer_name=p.optimizer,
        learning_rate=p.learning_rate,
        accountant=p.accountant,
        secure_mode=p.secure_mode,
        device=device,
    )
    try:
        mean_loss = _run_steps(
            training,
            steps=p.local_steps,
            max_physical_batch_size=p.max_physical_batch_size,
            clipping_mode=p.clipping_mode,
            device=device,
            amp_dtype=amp_dtype,
            tail=_TailAverage(trainable_parameters(model), steps=p.local_steps, count=p.average_last_steps)
            if p.average_last_steps else None,
        )
        return mean_loss, list(training.accountant.history)
    finally:
        training.close()


def local_dp_round(
    model: nn.Module,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    tokenizer: Any,
    plan: CalibratedPlan,
    ledger: PrivacyLedger,
    private_fingerprint: str,
    run_id: str,
    round_index: int,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> LocalRoundResult:
    """One round of DP-SGD at a site: train ``model`` in place and return the delta of its trainable parameters.

    ``private_fingerprint`` is the ``partition_fingerprint`` the site recorded for its private
    partition; data that does not match it is syft's mock run, which neither trains nor spends.
    ``amp_dtype`` (e.g. torch.bfloat16) only changes arithmetic precision, never the privacy.
    Raises DPPlanError / UnsupportedLayerError / BudgetExceededError before any training.
    """
    if not isinstance(plan, CalibratedPlan):
        raise DPPlanError(f"plan must be a CalibratedPlan approved by the site, got {type(plan).__name__}")
    device = torch.device(device)
    check_trainable_layers(model, clipping_mode=plan.plan.clipping_mode)
    named = trainable_parameters(model)
    if len(texts) != len(labels):
        raise DPPlanError(f"texts and labels differ in length: {len(texts)} != {len(labels)}")
    if partition_fingerprint(texts, labels) != private_fingerprint:
        return _mock_result(named)
    if len(texts) != plan.n_records:
        raise DPPlanError(f"plan was calibrated for n_records={plan.n_records}, the partition has {len(texts)}")
    if plan.plan.accountant != ledger.accountant:
        raise DPPlanError(f"plan accountant={plan.plan.accountant!r} differs from the ledger's {ledger.accountant!r}")
    event = plan.event(run_id=run_id, round_index=round_index)
    ledger.check_spend(event)

    try:
        dataset = encode_texts(tokenizer, texts, labels, max_length=plan.plan.max_length,
                               tail_tokens=plan.plan.tail_tokens)
    except ModelConfigError as exc:  # a truncation the tokenizer's special tokens leave no room for
        raise DPPlanError(str(exc)) from exc
    model.to(device)
    initial = {name: parameter.detach().clone() for name, parameter in named}
    try:
        mean_loss, seen = train_dp_sgd(model, dataset, plan=plan, device=device, amp_dtype=amp_dtype)
    except BaseException:
        # Steps that ran are not in the ledger: leave nothing of them in the caller's model.
        _restore(named, initial)
        raise
    if seen != [event.history_entry()]:
        _restore(named, initial)
        raise RuntimeError(f"Opacus accounted {seen}, the round was planned as {event.history_entry()}: nothing released")
    delta = {name: (parameter.detach() - initial[name]).float().cpu() for name, parameter in named}
    try:
        record = ledger.spend(event)
    except BaseException:
        _restore(named, initial)
        raise
    return LocalRoundResult(
        names=tuple(delta),
        delta=delta,
        event=event,
        ledger_record=record,
        n_examples=len(texts),
        mean_loss=mean_loss,
        is_mock=False,
    )
