"""What a site's admin does: onboard researchers, upload the partition with its mock twin and budget.

Every operation validates all of its input first and changes state only after, so a refused call
leaves the site as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from datasites.data import validate_reviews
from datasites.errors import FedsiteError
from datasites.mock import make_mock_twin
from datasites.secrets import check_password_strength
from datasites.server import login, quiet
from datasites.sitedir import SiteDir
from policies.budget import BudgetBook, BudgetError, PrivacyBudget
from policies.fingerprint import partition_fingerprint

PRIVATE_ASSET = "reviews"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.IGNORECASE)
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def connect_admin(site: SiteDir, *, password: str) -> Any:
    """Log in as the admin of the site served from ``site`` (over HTTP, where `fedsite serve` listens)."""
    meta = site.meta()
    serving = site.serving()
    if serving is None:
        raise FedsiteError(
            f"site {meta.name!r} is not running: start it with `fedsite serve --data-dir {site.path}`"
        )
    return login(f"http://{serving['host']}", port=int(serving["port"]), email=meta.admin_email, password=password)


def add_researcher(client: Any, *, name: str, email: str, password: str) -> None:
    """Create a data-scientist account (signup is closed: only the admin adds researchers)."""
    if not name.strip():
        raise FedsiteError("researcher name is empty: pass --name 'Full Name'")
    if not _EMAIL.match(email):
        raise FedsiteError(f"researcher email {email!r} is not an email address: pass --email name@example.org")
    check_password_strength(password, what="researcher password")
    with quiet():
        from syft.service.user.user_roles import ServiceRole

        existing = {user.email for user in client.users.get_all()}
        if email in existing:
            raise FedsiteError(f"a user {email} already exists on this site: nothing changed")
        client.users.create(name=name, email=email, password=password, password_verify=password,
                            role=ServiceRole.DATA_SCIENTIST)


@dataclass(frozen=True)
class UploadReport:
    dataset: str
    n_records: int
    n_mock: int
    positive_fraction: float
    budget: PrivacyBudget
    fingerprint: str


def upload_partition(
    client: Any,
    site: SiteDir,
    *,
    dataset: str,
    reviews: pd.DataFrame,
    budget: PrivacyBudget,
    mock_seed: int = 0,
    description: str = "",
) -> UploadReport:
    """Upload ``reviews`` as the private asset of a new syft Dataset, with its mock twin and budget."""
    if not _DATASET.match(dataset):
        raise FedsiteError(f"dataset name {dataset!r} is invalid: use letters, digits, '-', '_' or '.'")
    private = validate_reviews(reviews, origin=f"dataset {dataset!r}")
    try:
        budget.check_records(len(private))
    except BudgetError as exc:
        raise FedsiteError(str(exc)) from None
    with quiet():
        names = {d.name for d in client.datasets.get_all()}
    if dataset in names:
        raise FedsiteError(f"dataset {dataset!r} already exists on this site: choose another --dataset name")
    mock = make_mock_twin(private, seed=mock_seed)
    fingerprint = partition_fingerprint(private["text"], private["label"])
    with quiet():
        import syft as sy

        bundle = sy.Dataset(name=dataset, description=description or f"IMDB reviews held by {site.meta().name}")
        bundle.add_asset(sy.Asset(name=PRIVATE_ASSET, data=private, mock=mock,
                                  description="text: review (str); label: 0 negative, 1 positive"))
        client.upload_dataset(bundle)
    site.record_dataset(dataset, {
        "fingerprint": fingerprint,
        "n_records": len(private),
        "positives": int(private["label"].sum()),
        "asset": PRIVATE_ASSET,
        "uploaded": datetime.now(UTC).isoformat(),
    })
    BudgetBook(site.path).set(dataset, budget, n_records=len(private), replace=True)
    return UploadReport(dataset, len(private), len(mock), float(private["label"].mean()), budget, fingerprint)


def render_budgets(site: SiteDir) -> str:
    """The budget table of ``fedsite admin budget``."""
    budgets = BudgetBook(site.path).all()
    if not budgets:
        return f"site {site.meta().name}: no datasets with a budget yet (set one with `fedsite admin upload`)"
    lines = [f"site {site.meta().name}", "dataset                  epsilon      delta    records"]
    for name, budget in budgets.items():
        records = site.dataset_facts(name)["n_records"]
        lines.append(f"{name:<22} {budget.epsilon:>9g} {budget.delta:>10.2g} {records:>10}")
    return "\n".join(lines)
