"""Per-dataset privacy budgets, set by the site's admin and stored durably in the site's data dir.

The budget is the (epsilon, delta) that each researcher's ledger for that dataset may spend in
total (record-level DP over a whole run; see DESIGN.md, "Privacy"). It is kept in
``<data-dir>/budgets.json``, replaced atomically, so a crash never leaves half a budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from policies.durable import read_json, write_json_atomic

BUDGETS_FILE = "budgets.json"


class BudgetError(ValueError):
    """A privacy budget is invalid or missing."""


@dataclass(frozen=True)
class PrivacyBudget:
    """Total record-level (epsilon, delta)-DP a dataset allows each researcher."""

    epsilon: float  # total epsilon over every run of one researcher on this dataset; > 0
    delta: float  # total delta; 0 < delta < 1/n_records (checked against the dataset at upload)

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, int | float):
            raise BudgetError(f"epsilon must be a number, got {self.epsilon!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, int | float):
            raise BudgetError(f"delta must be a number, got {self.delta!r}")
        if not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise BudgetError(f"epsilon must be finite and > 0, got {self.epsilon}: pass e.g. --epsilon 8")
        if not math.isfinite(self.delta) or not 0 < self.delta < 1:
            raise BudgetError(f"delta must be in (0, 1), got {self.delta}: pass e.g. --delta 1e-5")

    def check_records(self, n_records: int) -> None:
        """Refuse a delta that is not well below 1/n (a delta >= 1/n allows releasing a record)."""
        if self.delta >= 1.0 / n_records:
            raise BudgetError(
                f"delta={self.delta:g} is not below 1/n_records={1.0 / n_records:g} for {n_records} records: "
                f"choose delta <= {0.1 / n_records:.1g}"
            )


class BudgetBook:
    """The budgets of one site, keyed by dataset name."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / BUDGETS_FILE

    def _load(self) -> dict[str, PrivacyBudget]:
        if not self.path.exists():
            return {}
        raw = read_json(self.path)
        return {name: PrivacyBudget(**fields) for name, fields in raw.items()}

    def all(self) -> dict[str, PrivacyBudget]:
        return self._load()

    def get(self, dataset: str) -> PrivacyBudget:
        budgets = self._load()
        if dataset not in budgets:
            known = ", ".join(sorted(budgets)) or "none"
            raise BudgetError(
                f"no privacy budget for dataset {dataset!r} (budgets exist for: {known}): "
                "set one with `fedsite admin upload ... --epsilon E --delta D`"
            )
        return budgets[dataset]

    def set(self, dataset: str, budget: PrivacyBudget, *, n_records: int, replace: bool = False) -> None:
        """Record ``budget`` for ``dataset``; validated before anything is written."""
        if not dataset:
            raise BudgetError("dataset name must not be empty")
        budget.check_records(n_records)
        budgets = self._load()
        if dataset in budgets and not replace and budgets[dataset] != budget:
            raise BudgetError(
                f"dataset {dataset!r} already has budget {budgets[dataset]}: pass replace=True "
                "(CLI: --replace-budget) to change it"
            )
        budgets[dataset] = budget
        write_json_atomic(self.path, {name: asdict(b) for name, b in sorted(budgets.items())})
