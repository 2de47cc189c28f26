"""What a site's admin does: onboard researchers, upload the partition with its mock twin and budget.

Every operation validates all of its input first and changes state only after, so a refused call
leaves the site as it was.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from datasites.data import validate_reviews
from datasites.errors import FedsiteError
from datasites.mock import MockShape, check_mock_epsilon, dp_mock_shape, make_mock_twin, public_mock_shape
from datasites.secrets import check_password_strength
from datasites.server import quiet
from datasites.sitedir import SiteDir
from policies.budget import BudgetBook, BudgetError, PrivacyBudget
from policies.contracts import ASSET
from policies.fingerprint import partition_fingerprint
from policies.identity import key_fingerprint
from policies.peers import PeerPins, PinnedFederation
from policies.syft_client import SiteConnectionError
from policies.syft_client import login as client_login

PRIVATE_ASSET = ASSET  # policies.contracts: the name both sides use
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.IGNORECASE)
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


_WILDCARD_OR_V6 = {"", "0.0.0.0", "::", "::1"}  # not an address to connect to, or one syft's URLs cannot hold


def connect_admin(site: SiteDir, *, password: str, ca: str | Path | None = None) -> Any:
    """Log in as the admin of the site served from ``site``, where `fedsite serve` listens (serve.json).

    A site serving HTTPS is reached over https, its certificate verified against ``ca`` (the PEM bundle of
    the CA that signed it; ``fedsite admin ... --ca``) or, without one, the default trust store. A site
    listening on every address (0.0.0.0, ::) or on ::1 is reached at ``localhost``, which its certificate
    must then name.
    """
    meta = site.meta()
    serving = site.serving()
    if serving is None:
        raise FedsiteError(
            f"site {meta.name!r} is not running: start it with `fedsite serve --data-dir {site.path}`"
        )
    scheme = str(serving.get("scheme", "http"))
    host = "localhost" if str(serving["host"]) in _WILDCARD_OR_V6 else str(serving["host"])
    if ca is not None and scheme != "https":
        raise FedsiteError(f"--ca verifies an https site, and site {meta.name!r} serves plain http: drop --ca, or "
                           "serve it with --tls-cert/--tls-key")
    try:
        return client_login(f"{scheme}://{host}", port=int(serving["port"]), email=meta.admin_email,
                            password=password, ca=ca)
    except SiteConnectionError as exc:
        raise FedsiteError(str(exc)) from None


def add_researcher(client: Any, *, name: str, email: str, password: str) -> str:
    """Create a data-scientist account (signup is closed: only the admin adds researchers); returns its
    immutable id, the key of its approvals, ledgers and audit records (policies.identity)."""
    if not name.strip():
        raise FedsiteError("researcher name is empty: pass --name 'Full Name'")
    if not _EMAIL.match(email):
        raise FedsiteError(f"researcher email {email!r} is not an email address: pass --email name@example.org")
    check_password_strength(password, what="researcher password")
    with quiet():
        from syft.service.user.user_roles import ServiceRole

        existing = {user.email.lower() for user in client.users.get_all()}
        if email.lower() in existing:  # e-mail is case-insensitive: Rita@ and rita@ are one person
            raise FedsiteError(f"a user {email} already exists on this site: nothing changed")
        client.users.create(name=name, email=email, password=password, password_verify=password,
                            role=ServiceRole.DATA_SCIENTIST)
        # syft lower-cases the domain (Rita@Uni.ORG is stored as Rita@uni.org): match as the check above does
        created = next(user for user in client.users.get_all() if user.email.lower() == email.lower())
    return str(created.id.no_dash)


@dataclass(frozen=True)
class UploadReport:
    dataset: str
    n_records: int  # private records uploaded
    n_mock: int  # rows of the mock twin researchers see
    positive_fraction: float  # of the private records (the admin's console only)
    budget: PrivacyBudget
    fingerprint: str
    mock: MockShape  # the mock's size and label balance and their source (public defaults or DP counts)


def upload_partition(
    client: Any,
    site: SiteDir,
    *,
    dataset: str,
    reviews: pd.DataFrame,
    budget: PrivacyBudget,
    mock_seed: int = 0,
    mock_epsilon: float | None = None,
    description: str = "",
) -> UploadReport:
    """Upload ``reviews`` as the private asset of a new syft Dataset, with its mock twin and budget.

    The mock's size and label balance are public defaults (``datasites.mock.public_mock_shape``) unless
    ``mock_epsilon`` is given: then they come from the private label counts released with that epsilon
    (``dp_mock_shape``), a one-off release that adds to every researcher's training epsilon. The
    source is recorded with the dataset's facts (``mock``) for the admin's review.
    """
    if not _DATASET.match(dataset):
        raise FedsiteError(f"dataset name {dataset!r} is invalid: use letters, digits, '-', '_' or '.'")
    private = validate_reviews(reviews, origin=f"dataset {dataset!r}")
    try:
        budget.check_records(len(private))
    except BudgetError as exc:
        raise FedsiteError(str(exc)) from None
    if mock_epsilon is not None:
        check_mock_epsilon(mock_epsilon)
    with quiet():
        names = {d.name for d in client.datasets.get_all()}
    if dataset in names:
        raise FedsiteError(f"dataset {dataset!r} already exists on this site: choose another --dataset name")
    shape = public_mock_shape() if mock_epsilon is None else dp_mock_shape(private["label"], epsilon=mock_epsilon)
    mock = make_mock_twin(private, seed=mock_seed, shape=shape)
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
        "mock": shape.to_record(),
        "uploaded": datetime.now(UTC).isoformat(),
    })
    BudgetBook(site.path).set(dataset, budget, n_records=len(private), replace=True)
    return UploadReport(dataset, len(private), len(mock), float(private["label"].mean()), budget, fingerprint, shape)


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


def render_peers(pins: PinnedFederation) -> str:
    """The table of ``fedsite admin peers``: this site, each pinned peer with its key fingerprint, the minimum."""
    lines = [f"site {pins.own_name} (this site)  key {key_fingerprint(pins.own_key)}  {pins.own_key}"]
    if not pins.peers:
        lines.append("no peers pinned: every plan is refused until you pin the other sites "
                     "(`fedsite admin peers add NAME KEY`)")
    lines += [f"pinned {name:<20} key {key_fingerprint(key)}  {key}" for name, key in sorted(pins.peers.items())]
    lines.append(f"minimum secure-sum threshold: {pins.min_threshold}")
    return "\n".join(lines)


def pin_each_other(sites: Sequence[SiteDir]) -> None:
    """Every site pins every other one's identity key: what the admins do one by one with ``fedsite admin
    peers add`` after comparing keys out of band. For demos and tests that run all the sites themselves."""
    keys = {site.meta().name: site.identity_public_hex() for site in sites}
    for site in sites:
        pins = PeerPins(site.path, own_name=site.meta().name)
        pinned = pins.load().peers
        for name, key in keys.items():
            if name != site.meta().name and pinned.get(name) != key:
                pins.add(name, key)
