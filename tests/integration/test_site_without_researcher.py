"""A site runs a whole federated round with the researcher's package unimportable: the trusted side needs only
``policies``, ``datasites`` and ``models`` at run time (DESIGN.md, "Packages").

The sites are in-process, so the researcher's side of the round (``researcher.federation``) runs in this
process too; the block covers every call a site makes into syft's execution of the approved function (and
the admin's dry run): for its duration every ``researcher`` module is out of ``sys.modules`` and a meta-path
finder refuses, and records, any import of one.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest

import datasites.guard
import policies.approvals
from datasites.admin import add_researcher, pin_each_other, upload_partition
from datasites.partition import partition_indices
from datasites.review_queue import approve_request, list_requests, review_request
from datasites.server import launch_in_process
from models import build_from_spec
from policies.budget import PrivacyBudget
from policies.federated_plan import FederatedPlan
from policies.ledger import PrivacyLedger
from researcher.fedavg import flatten_trainable
from researcher.federation import SiteHandle, make_plan, run_round, submit
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESEARCHER = "rita@uni.org"
NAMES = ("site-a", "site-b")
SPEC = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
        "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 1,
      "target_epsilon": 3.0, "max_length": 64, "max_physical_batch_size": 16}


def _is_researcher(name: str) -> bool:
    return name == "researcher" or name.startswith("researcher.")


class ResearcherBlock(importlib.abc.MetaPathFinder):
    """While any site call is in progress, ``researcher`` cannot be imported; every attempt is recorded.

    Site calls run concurrently (one thread per site), so the block is counted: the first call to enter
    takes the researcher's modules out of ``sys.modules``, the last to leave puts them back.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.site_calls = 0
        self.attempts: list[str] = []
        self.hidden: dict[str, ModuleType] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        if self.depth and _is_researcher(fullname):
            self.attempts.append(fullname)
            raise ImportError(f"{fullname} is blocked: a site call must not import the researcher's package")
        return None

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        with self.lock:
            self.site_calls += 1
            self.depth += 1
            if self.depth == 1:
                self.hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_researcher(name)}
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    sys.modules.update(self.hidden)
                    self.hidden = {}


@pytest.fixture()
def block(monkeypatch: pytest.MonkeyPatch) -> Iterator[ResearcherBlock]:
    """Wrap ``authorised``, which every site execution (the guard's) and every dry run enters first."""
    finder = ResearcherBlock()
    original = policies.approvals.authorised

    @contextlib.contextmanager
    def blocked(execution: Any) -> Iterator[None]:
        with finder.blocking(), original(execution):
            yield

    monkeypatch.setattr(datasites.guard, "authorised", blocked)
    monkeypatch.setattr(policies.approvals, "authorised", blocked)
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)


def test_a_site_runs_a_round_with_the_researcher_package_unimportable(
    tmp_path: Path, imdb_train: pd.DataFrame, block: ResearcherBlock,
) -> None:
    # Prepare: two in-process sites, each with a partition, the researcher's account and the other's pin
    parts = partition_indices(imdb_train["label"].to_numpy(), n_sites=60, seed=1)
    sites, admins, handles, ids = {}, {}, [], {}
    try:
        for index, name in enumerate(NAMES):
            site = launch_in_process(tmp_path / name, admin_password=ADMIN_PASSWORD, name=name)
            admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)
            upload_partition(admin, site.site, dataset="imdb", reviews=imdb_train.iloc[parts[index][:96]],
                             budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
            ids[name] = add_researcher(admin, name="Rita", email=RESEARCHER, password=RESEARCHER_PASSWORD)
            sites[name], admins[name] = site, admin
            handles.append(SiteHandle(name=name, client=site.login(email=RESEARCHER, password=RESEARCHER_PASSWORD),
                                      identity_key=site.site.identity_public_hex()))
        pin_each_other([site.site for site in sites.values()])
        vector, _ = flatten_trainable(build_from_spec(SPEC)[0])
        raw = make_plan(sites=handles, model=SPEC, dp=DP, vector_length=len(vector), clip=0.5)

        # Execute: submit, the admin's review (its dry run is a site call), approval, one round
        reports = []
        for handle in handles:
            submit(handle, raw, tmp_path / "functions")
        for name, site in sites.items():
            pending = next(r.request_id for r in list_requests(admins[name]) if r.status == "pending")
            reports.append(review_request(admins[name], site.site, pending))
            approve_request(admins[name], site.site, pending, admin=site.meta.admin_email)
        outcome = run_round(handles, FederatedPlan.parse(raw), 0, vector.astype(np.float32))

        # Assert: every site call ran blocked and none tried the researcher's package; the round trained,
        # spent and released at both sites; the researcher's package is back for this process
        assert block.attempts == []
        assert block.site_calls >= 2 * 5 + 2  # five stages at two sites, and two dry runs
        assert all(report.dry_run is not None and report.problems == () for report in reports)
        assert outcome.participants == NAMES
        assert 0 < np.abs(outcome.average).max() <= 0.5
        for name, site in sites.items():
            ledger = PrivacyLedger(site.site.path, "imdb", ids[name], site=name)
            assert [record.round_index for record in ledger.records()] == [0]
        assert "researcher.federation" in sys.modules
    finally:
        for site in sites.values():
            site.stop()
