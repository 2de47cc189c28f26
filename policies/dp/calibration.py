"""A plan the site approved: the noise multiplier fixed for a partition and a ledger (``calibrate_plan``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from policies.accounting import (
    AccountingError,
    PrivacyEvent,
    calibrate_noise_multiplier,
    check_noise_multiplier,
    epsilon_of,
)
from policies.dp.plan import DPPlan, DPPlanError
from policies.ledger import BudgetExceededError, PrivacyLedger


@dataclass(frozen=True, kw_only=True)
class CalibratedPlan:
    """A plan the site approved for a partition of ``n_records``: the noise is now fixed for the whole run."""

    plan: DPPlan
    n_records: int  # size of the private partition it was calibrated for
    noise_multiplier: float  # sigma used in every step of every round
    sample_rate: float  # q = expected_batch_size / n_records
    run_epsilon: float  # epsilon of this run alone (rounds * local_steps steps) at plan.delta
    projected_epsilon: float  # epsilon of the ledger's history composed with this whole run, at the budget's delta
    budget_epsilon: float  # the budget it was checked against

    def __post_init__(self) -> None:
        self.plan.check_records(self.n_records)
        try:
            check_noise_multiplier(self.noise_multiplier)
        except AccountingError as exc:
            raise DPPlanError(str(exc)) from exc
        expected = self.plan.expected_batch_size / self.n_records
        if not math.isclose(self.sample_rate, expected, rel_tol=1e-12):
            raise DPPlanError(f"sample_rate={self.sample_rate!r} is not expected_batch_size / n_records = {expected!r}")

    def event(self, *, run_id: str, round_index: int) -> PrivacyEvent:
        """The privacy event of one round of this plan."""
        return PrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.plan.local_steps,
            run_id=run_id,
            round_index=round_index,
        )

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["plan"] = self.plan.to_dict()
        return document

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> CalibratedPlan:
        values = dict(raw)
        values["plan"] = DPPlan.from_dict(values.get("plan", {}))
        return CalibratedPlan(**values)


def calibrate_plan(plan: DPPlan, *, n_records: int, ledger: PrivacyLedger) -> CalibratedPlan:
    """Fix the noise multiplier of ``plan`` for a site's partition and ledger (at approval time).

    sigma is the larger of (a) the researcher's ask: the run alone reaches ``plan.target_epsilon`` at
    ``plan.delta`` over ``rounds * local_steps`` steps, and (b) the site's budget: the ledger's history
    composed with the whole run stays within the budget at the budget's delta. With an explicit
    ``plan.noise_multiplier`` only (b) is checked, and a plan that does not fit is refused.
    """
    plan.check_records(n_records)
    if plan.accountant != ledger.accountant:
        raise DPPlanError(f"plan accountant={plan.accountant!r} differs from the ledger's {ledger.accountant!r}")
    budget = ledger.budget
    sample_rate = plan.expected_batch_size / n_records
    steps = plan.total_steps
    history = ledger.history()
    try:
        if plan.noise_multiplier is not None:
            sigma = float(plan.noise_multiplier)
        else:
            sigma = calibrate_noise_multiplier(
                target_epsilon=float(plan.target_epsilon or 0.0),
                delta=plan.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=plan.accountant,
            )
            budget_sigma = calibrate_noise_multiplier(
                target_epsilon=budget.epsilon,
                delta=budget.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=plan.accountant,
                prior=history,
            )
            sigma = max(sigma, budget_sigma)
    except AccountingError as exc:
        raise BudgetExceededError(f"site {ledger.site!r}: {exc}") from exc
    projected = epsilon_of([*history, (sigma, sample_rate, steps)], delta=budget.delta, accountant=plan.accountant)
    if projected > budget.epsilon:
        raise BudgetExceededError(
            f"site {ledger.site!r} refuses the plan for dataset {ledger.dataset!r} and researcher {ledger.researcher!r}: "
            f"{steps} steps at noise_multiplier={sigma:g}, sample_rate={sample_rate:g} would reach "
            f"epsilon={projected:.4f} (delta={budget.delta:g}), over the budget epsilon={budget.epsilon:g}"
        )
    run_epsilon = epsilon_of([(sigma, sample_rate, steps)], delta=plan.delta, accountant=plan.accountant)
    return CalibratedPlan(
        plan=plan,
        n_records=n_records,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        run_epsilon=run_epsilon,
        projected_epsilon=projected,
        budget_epsilon=budget.epsilon,
    )
