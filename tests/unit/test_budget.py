from __future__ import annotations

from pathlib import Path

import pytest

from policies.budget import BudgetBook, BudgetError, PrivacyBudget

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("epsilon", "delta", "message"),
    [
        (0.0, 1e-5, r"epsilon must be finite and > 0, got 0.0"),
        (-1.0, 1e-5, r"epsilon must be finite and > 0, got -1.0"),
        (float("inf"), 1e-5, r"epsilon must be finite and > 0, got inf"),
        (8.0, 0.0, r"delta must be in \(0, 1\), got 0.0"),
        (8.0, 1.5, r"delta must be in \(0, 1\), got 1.5"),
        (True, 1e-5, r"epsilon must be a number, got True"),
    ],
)
def test_invalid_budgets_name_the_parameter(epsilon: float, delta: float, message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        PrivacyBudget(epsilon=epsilon, delta=delta)


def test_delta_must_be_below_one_over_n(tmp_path: Path) -> None:
    book = BudgetBook(tmp_path)

    with pytest.raises(BudgetError, match=r"delta=0.001 is not below 1/n_records=0.001 for 1000 records"):
        book.set("imdb", PrivacyBudget(epsilon=8, delta=1e-3), n_records=1000)
    assert book.all() == {}


def test_budgets_survive_a_new_book_object(tmp_path: Path) -> None:
    BudgetBook(tmp_path).set("imdb", PrivacyBudget(epsilon=8, delta=1e-5), n_records=8000)

    assert BudgetBook(tmp_path).get("imdb") == PrivacyBudget(epsilon=8, delta=1e-5)


def test_changing_a_budget_needs_replace(tmp_path: Path) -> None:
    book = BudgetBook(tmp_path)
    book.set("imdb", PrivacyBudget(epsilon=8, delta=1e-5), n_records=8000)

    with pytest.raises(BudgetError, match=r"already has budget .*pass replace=True"):
        book.set("imdb", PrivacyBudget(epsilon=80, delta=1e-5), n_records=8000)
    book.set("imdb", PrivacyBudget(epsilon=3, delta=1e-5), n_records=8000, replace=True)
    assert book.get("imdb").epsilon == 3


def test_unknown_dataset_names_the_known_ones(tmp_path: Path) -> None:
    BudgetBook(tmp_path).set("imdb", PrivacyBudget(epsilon=8, delta=1e-5), n_records=8000)

    with pytest.raises(BudgetError, match=r"no privacy budget for dataset 'sst2' \(budgets exist for: imdb\)"):
        BudgetBook(tmp_path).get("sst2")
