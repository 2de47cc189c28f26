"""Two `fedsite serve` processes: a site SIGKILLed after the other released its masked input loses the round.

With two sites and the threshold at two, the round cannot finish without the killed site, and the site
that released refuses any new session of it: the round is recorded lost (who spent, where, why), the
killed site is restarted on its data dir, and the run goes on with the next round and finishes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from datasites.admin import add_researcher, connect_admin, pin_each_other, upload_partition
from datasites.partition import partition_indices
from datasites.review_queue import approve_request, list_requests
from datasites.sitedir import SiteDir
from models import build_from_spec
from policies.audit import AuditLog
from policies.budget import PrivacyBudget
from policies.ledger import PrivacyLedger
from policies.submission import function_name
from policies.syft_client import login
from researcher.fedavg import flatten_trainable
from researcher.federation import FederatedRound, SiteHandle, make_plan, submit
from researcher.report import LostRound, RunReport
from researcher.trainer import FederatedTrainer, TrainerSettings
from tests.conftest import ADMIN_PASSWORD, IMDB_DIR, RESEARCHER_PASSWORD
from tests.e2e.conftest import ServedSite, free_port
from tests.e2e.kill import kill9

pytestmark = pytest.mark.e2e

RESEARCHER = "rita@uni.org"
NAMES = ("site-a", "site-b")
REVIEWS_PER_SITE = 80
SPEC = {"name": None, "tiny": {"hidden_size": 16, "layers": 1, "heads": 2, "max_length": 32},
        "trainable": {"kind": "lora", "lora_rank": 2}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 1, "rounds": 3,
      "target_epsilon": 2.0, "max_length": 32, "max_physical_batch_size": 16}
MASKED_WAIT_S = 120  # how long to wait for site-a's masked input of the round site-b dies in


def _onboard(served: ServedSite, reviews: pd.DataFrame) -> tuple[Any, SiteHandle, str]:
    site = SiteDir(served.data_dir)
    admin = connect_admin(site, password=ADMIN_PASSWORD)
    upload_partition(admin, site, dataset="imdb", reviews=reviews, budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
    researcher_id = add_researcher(admin, name="Rita", email=RESEARCHER, password=RESEARCHER_PASSWORD)
    client = login("http://127.0.0.1", port=served.port, email=RESEARCHER, password=RESEARCHER_PASSWORD)
    return admin, SiteHandle(name=served.name, client=client, identity_key=site.identity_public_hex()), researcher_id


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[dict[str, ServedSite]]:
    sites = {name: ServedSite(name=name, data_dir=tmp_path / name, port=free_port(), log=tmp_path / f"{name}.log",
                              admin_password=ADMIN_PASSWORD) for name in NAMES}
    try:
        for site in sites.values():
            site.start()
        for site in sites.values():
            site.wait_ready()
        yield sites
    finally:
        for site in sites.values():
            kill9(site)


def _wait_until_masked(site: ServedSite, run_id: str, round_index: int) -> None:
    """Return once ``site`` has saved its state after releasing its masked input for ``round_index``."""
    deadline = time.monotonic() + MASKED_WAIT_S
    while time.monotonic() < deadline:
        for path in (site.data_dir / "runs").glob(f"*/{run_id}/round-{round_index}-attempt-*.state"):
            if json.loads(path.read_text())["stage"] == "input-masked":
                return
        time.sleep(0.05)
    raise AssertionError(f"{site.name} never released its masked input of round {round_index}")


def _kill_before_its_masked_input(monkeypatch: pytest.MonkeyPatch, served: dict[str, ServedSite], run_id: str,
                                  round_index: int) -> None:
    """SIGKILL site-b once site-a has released round ``round_index``, just before site-b's own masked input."""
    original = FederatedRound._call

    def call(self: FederatedRound, site: SiteHandle, stage: str, extra: Any) -> dict[str, Any] | None:
        if (self.round_index, stage, site.name) == (round_index, "mask_input", "site-b"):
            _wait_until_masked(served["site-a"], run_id, round_index)
            kill9(served["site-b"])
        return original(self, site, stage, extra)

    monkeypatch.setattr(FederatedRound, "_call", call)


def test_a_site_killed_after_another_released_loses_the_round_and_the_run_finishes(
    served: dict[str, ServedSite], imdb_train: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: two sites, the threshold at two; both admins approve a three-round plan
    parts = partition_indices(imdb_train["label"].to_numpy(), n_sites=60, seed=0)
    onboarded = {name: _onboard(served[name], imdb_train.iloc[parts[i][:REVIEWS_PER_SITE]].reset_index(drop=True))
                 for i, name in enumerate(NAMES)}
    admins = {name: admin for name, (admin, _, _) in onboarded.items()}
    handles = [handle for _, handle, _ in onboarded.values()]
    pin_each_other([SiteDir(site.data_dir) for site in served.values()])
    model, _ = build_from_spec(SPEC)
    plan = make_plan(sites=handles, model=SPEC, dp=DP, vector_length=len(flatten_trainable(model)[0]), clip=0.5)
    run_id = plan["run_id"]
    for handle in handles:
        submit(handle, plan, tmp_path / "functions")
        site = SiteDir(served[handle.name].data_dir)
        pending = next(r.request_id for r in list_requests(admins[handle.name])
                       if r.function == function_name(run_id) and r.status == "pending")
        approve_request(admins[handle.name], site, pending, admin=site.meta().admin_email)
    settings = TrainerSettings(run_dir=tmp_path / "run", imdb_source=str(IMDB_DIR), test_size=40, progress=False)
    _kill_before_its_masked_input(monkeypatch, served, run_id, 1)

    # Execute: round 0; round 1, in which site-b dies; site-b restarts on its data dir; a new researcher
    # process resumes from run_dir and finishes the run
    started = time.monotonic()
    trainer = FederatedTrainer(handles, plan, settings)
    trainer.run_one_round(0)
    lost = trainer.run_one_round(1)
    served["site-b"].start()
    served["site-b"].wait_ready()
    handles[1].client = login("http://127.0.0.1", port=served["site-b"].port, email=RESEARCHER,
                              password=RESEARCHER_PASSWORD)
    resumed = FederatedTrainer(handles, plan, settings)
    report = resumed.run()
    seconds = time.monotonic() - started

    # Assert: round 1 is lost at site-b's masked input; site-a spent on it and said how much
    assert isinstance(lost, LostRound), lost
    assert (lost.round_index, lost.stage, lost.released, lost.unconfirmed) == (1, "mask_input", ("site-a",), ("site-b",))
    assert set(lost.epsilon_spent) == {"site-a"} and set(lost.drop_reasons) == {"site-b"}
    assert lost.drop_reasons["site-b"].startswith("mask_input: "), lost.drop_reasons
    # the run went on from round 0's model: round 2 with both sites, round 1 never applied
    assert resumed.next_round == 3
    assert [(r.round_index, r.participants) for r in report.rounds] == [(0, NAMES), (2, NAMES)]
    saved = RunReport.load_json(tmp_path / "run" / "report.json")
    assert saved.lost_rounds == (lost,) and saved.rounds == report.rounds
    assert (tmp_path / "run" / "report.png").stat().st_size > 0
    # the ledgers: site-a paid for rounds 0, 1 and 2, site-b (killed before its masked input) for 0 and 2
    spent = {name: [r for r in PrivacyLedger(SiteDir(served[name].data_dir).path, "imdb", onboarded[name][2], site=name).records()
                    if r.run_id == run_id] for name in NAMES}
    assert [r.round_index for r in spent["site-a"]] == [0, 1, 2]
    assert [r.round_index for r in spent["site-b"]] == [0, 2]
    assert lost.epsilon_spent["site-a"] == round(spent["site-a"][1].epsilon_after, 2)
    assert report.rounds[-1].epsilon_spent["site-a"] > report.rounds[-1].epsilon_spent["site-b"]
    for name in NAMES:
        AuditLog(SiteDir(served[name].data_dir).path).verify()
    print(f"lost-round e2e: three rounds with a kill and a restart in {seconds:.1f} s")
