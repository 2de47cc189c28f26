"""Three in-process datasites: a round lost after a release is recorded, and the run goes on and finishes.

A site that released its masked input for a round has spent on it and refuses any new session of it,
so such a round can never be retried. Two ways to lose one are played with real sites: a site refuses
mid-round after every site released (its admin withdrew a pin), and the researcher's process dies after
one site released. Either way the report records the lost round and who spent, the global model stays
as it was, and the next round is accepted by every site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from datasites.admin import add_researcher, pin_each_other, upload_partition
from datasites.partition import partition_indices
from datasites.review_queue import approve_request, list_requests
from datasites.server import InProcessSite, launch_in_process
from models import build_from_spec
from policies.budget import PrivacyBudget
from policies.contracts import encode_vector
from policies.federated_plan import FederatedPlan
from policies.ledger import PrivacyLedger
from policies.peers import PeerPins
from policies.secagg import AdvertiseKeys, ShareKeys
from policies.submission import function_name
from researcher.checkpoints import load_latest
from researcher.fedavg import flatten_trainable
from researcher.federation import FederatedRound, SiteHandle, make_plan, submit
from researcher.report import LostRound, RunReport
from researcher.trainer import FederatedTrainer, TrainerSettings
from tests.conftest import ADMIN_PASSWORD, IMDB_DIR, RESEARCHER_PASSWORD

pytestmark = pytest.mark.integration

RESEARCHER = "rita@uni.org"
NAMES = ("site-a", "site-b", "site-c")
SPEC = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
        "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 3,
      "target_epsilon": 2.0, "max_length": 64, "max_physical_batch_size": 16}


@dataclass
class Federation:
    sites: dict[str, InProcessSite]
    admins: dict[str, Any]
    handles: list[SiteHandle]
    workdir: Path
    vector_length: int
    researcher_ids: dict[str, str]

    def approved_plan(self, **overrides: Any) -> dict[str, Any]:
        """A plan submitted at every site and approved by each admin."""
        dp = {**DP, **overrides.pop("dp", {})}
        raw = make_plan(sites=self.handles, model=SPEC, dp=dp, vector_length=self.vector_length, clip=0.5, **overrides)
        for handle in self.handles:
            submit(handle, raw, self.workdir / "functions")
        for name, site in self.sites.items():
            pending = next(r.request_id for r in list_requests(self.admins[name])
                           if r.status == "pending" and r.function == function_name(raw.run_id))
            approve_request(self.admins[name], site.site, pending, admin=site.meta.admin_email)
        return raw

    def ledger(self, name: str) -> PrivacyLedger:
        return PrivacyLedger(self.sites[name].site.path, "imdb", self.researcher_ids[name], site=name)

    def spent_rounds(self, name: str, run_id: str) -> list[int]:
        return [record.round_index for record in self.ledger(name).records() if record.run_id == run_id]

    def trainer(self, raw: Mapping[str, Any], run_dir: Path) -> FederatedTrainer:
        settings = TrainerSettings(run_dir=run_dir, imdb_source=str(IMDB_DIR), test_size=40, progress=False)
        return FederatedTrainer(self.handles, raw, settings)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, imdb_train: pd.DataFrame) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("lost-round")
    parts = partition_indices(imdb_train["label"].to_numpy(), n_sites=60, seed=0)
    sites, admins, handles, ids = {}, {}, [], {}
    for index, name in enumerate(NAMES):
        site = launch_in_process(root / name, admin_password=ADMIN_PASSWORD, name=name)
        admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)
        upload_partition(admin, site.site, dataset="imdb", reviews=imdb_train.iloc[parts[index][:120]],
                         budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
        ids[name] = add_researcher(admin, name="Rita", email=RESEARCHER, password=RESEARCHER_PASSWORD)
        sites[name], admins[name] = site, admin
        handles.append(SiteHandle(name=name, client=site.login(email=RESEARCHER, password=RESEARCHER_PASSWORD),
                                  identity_key=site.site.identity_public_hex()))
    pin_each_other([site.site for site in sites.values()])
    model, _ = build_from_spec(SPEC)
    yield Federation(sites, admins, handles, root, len(flatten_trainable(model)[0]), ids)
    for site in sites.values():
        site.stop()


def _after_stage(monkeypatch: pytest.MonkeyPatch, round_index: int, stage: str, act: Callable[[], None]) -> None:
    """Run ``act`` once, right after the researcher's ``stage`` call of ``round_index`` returns."""
    original = FederatedRound._stage

    def stage_then_act(self: FederatedRound, name: str, *args: Any) -> dict[str, Any]:
        replies = original(self, name, *args)
        if (self.round_index, name) == (round_index, stage):
            act()
        return replies

    monkeypatch.setattr(FederatedRound, "_stage", stage_then_act)


def test_a_refusal_after_every_site_released_loses_the_round_and_the_run_finishes(
    federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: every site is needed (threshold 3); in round 1, once all three released their masked input,
    # site-c's admin withdraws the pin of site-a, so site-c refuses the consistency check
    raw = federation.approved_plan(threshold=3)
    run_id = raw.run_id
    pins = PeerPins(federation.sites["site-c"].site.path, own_name="site-c")
    key_a = pins.load().peers["site-a"]
    _after_stage(monkeypatch, 1, "mask_input", lambda: pins.remove("site-a"))
    trainer = federation.trainer(raw, tmp_path / "run")
    before = {name: federation.ledger(name).spent() for name in NAMES}  # other tests' runs may have spent first

    # Execute: rounds 0 and 1; the admin pins site-a again (also if the round raised); a new process resumes
    trainer.run_one_round(0)
    after_round_0 = flatten_trainable(trainer.model)[0]
    try:
        lost = trainer.run_one_round(1)
    finally:
        pins.add("site-a", key_a)
    resumed = federation.trainer(raw, tmp_path / "run")
    next_round, restored = resumed.next_round, flatten_trainable(resumed.model)[0]
    report = resumed.run()

    # Assert: round 1 is recorded lost with who spent (as each site reported it), where and why
    assert isinstance(lost, LostRound)
    assert (lost.round_index, lost.stage, lost.released, lost.unconfirmed) == (1, "consistency_check", NAMES, ())
    assert lost.reason.startswith("site-c: roster entry site-a"), lost.reason
    assert set(lost.epsilon_spent) == set(NAMES)
    assert all(before[name] < e < before[name] + 2.0 for name, e in lost.epsilon_spent.items()), (before, lost)
    # the lost update was never applied: the model and its checkpoint are round 0's, and the run resumes at 2
    assert np.array_equal(flatten_trainable(trainer.model)[0], after_round_0)
    assert np.array_equal(restored, after_round_0) and next_round == 2
    checkpoint = load_latest(tmp_path / "run")
    assert checkpoint is not None and checkpoint.round_index == 2
    assert [r.round_index for r in report.rounds] == [0, 2] and report.lost_rounds == (lost,)
    assert report.rounds[1].participants == NAMES
    assert RunReport.load_json(tmp_path / "run" / "report.json").lost_rounds == (lost,)
    assert (tmp_path / "run" / "report.png").stat().st_size > 0
    # every site paid for the lost round before its output left, and accepted the next one
    for name in NAMES:
        assert federation.spent_rounds(name, run_id) == [0, 1, 2]
    assert report.rounds[1].epsilon_spent["site-a"] > lost.epsilon_spent["site-a"]


def test_a_researcher_that_dies_after_a_release_finds_the_round_lost_when_it_resumes(
    federation: Federation, tmp_path: Path,
) -> None:
    # Prepare: the trainer claims round 0's attempts; its session gets site-a's masked input, then the
    # researcher's process dies (the session object is simply dropped)
    raw = federation.approved_plan(dp={"rounds": 2, "target_epsilon": 1.0})
    run_id, plan = raw.run_id, FederatedPlan.parse(raw)
    first = federation.trainer(raw, tmp_path / "run")
    session = FederatedRound(federation.handles, plan, 0, first._claim_attempts(0))
    agg = session.aggregator
    for reply in session._stage("advertise_keys", NAMES, lambda _: {}).values():
        agg.receive_advertise_keys(AdvertiseKeys.from_wire(reply.message))
    keys = agg.close_advertise_keys().to_wire()
    for reply in session._stage("share_keys", NAMES, lambda _: {"round_keys": keys}).values():
        agg.receive_share_keys(ShareKeys.from_wire(reply.message))
    inboxes = {name: inbox.to_wire() for name, inbox in agg.close_share_keys().items()}
    model = encode_vector(np.asarray(flatten_trainable(first.model)[0], dtype=np.float32))
    session._stage("mask_input", ["site-a"], lambda name: {"incoming": inboxes[name], "global_model": model})

    # Execute: a new researcher process on the same run_dir
    report = federation.trainer(raw, tmp_path / "run").run()

    # Assert: site-a refused a new session of round 0, which is therefore lost; round 1 ran everywhere
    assert [(r.round_index, r.stage, r.released, dict(r.epsilon_spent)) for r in report.lost_rounds] == \
        [(0, "advertise_keys", ("site-a",), {})]
    assert report.lost_rounds[0].reason == "site-a: round 0 already ran here: a replayed round is refused"
    assert [(r.round_index, r.participants) for r in report.rounds] == [(1, NAMES)]
    assert federation.spent_rounds("site-a", run_id) == [0, 1]
    assert federation.spent_rounds("site-b", run_id) == federation.spent_rounds("site-c", run_id) == [1]
    assert federation.trainer(raw, tmp_path / "run").next_round == 2  # nothing left to run
