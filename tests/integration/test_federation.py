"""Three in-process datasites: submit, review, approve, DP rounds through the secure sum, and the attacks."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from datasites.admin import add_researcher, pin_each_other, upload_partition
from datasites.errors import FedsiteError
from datasites.partition import partition_indices
from datasites.review_queue import approve_request, deny_request, list_requests, review_request
from datasites.server import InProcessSite, launch_in_process
from models import build_from_spec
from policies import site_runtime
from policies.accounting import epsilon_of
from policies.audit import AuditLog
from policies.budget import BudgetBook, PrivacyBudget
from policies.contracts import StageMessage, encode_vector
from policies.dp import local_dp_round
from policies.federated_plan import FederatedPlan
from policies.ledger import PrivacyLedger
from policies.secagg import AdvertiseKeys, MaskedInput, ShareKeys, SignedSurvivors
from policies.submission import SubmissionError, function_name
from researcher.checkpoints import load_latest, restore_into
from researcher.evaluation import evaluate, load_test_subset, predict_logits
from researcher.fedavg import flatten_trainable
from researcher.federation import (
    FederatedRound,
    SiteHandle,
    SiteRefusedError,
    dry_run_on_mock,
    make_plan,
    run_round,
    submit,
)
from researcher.report import RunReport
from researcher.trainer import FederatedTrainer, TrainerSettings
from tests.conftest import ADMIN_PASSWORD, IMDB_DIR, RESEARCHER_PASSWORD

pytestmark = pytest.mark.integration

RESEARCHER = "rita@uni.org"
NAMES = ("site-a", "site-b", "site-c")
SPEC = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
        "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 2,
      "target_epsilon": 3.0, "max_length": 64, "max_physical_batch_size": 16}


@dataclass
class Federation:
    sites: dict[str, InProcessSite]
    admins: dict[str, Any]
    handles: list[SiteHandle]
    workdir: Path
    vector: np.ndarray
    researcher_ids: dict[str, str]  # site -> the researcher's immutable id there (each site makes its own account)

    def plan(self, **overrides: Any) -> dict[str, Any]:
        dp = {**DP, **overrides.pop("dp", {})}
        return make_plan(sites=self.handles, model=SPEC, dp=dp, vector_length=len(self.vector), clip=0.5, **overrides)

    def submit_all(self, plan: dict[str, Any]) -> None:
        for handle in self.handles:
            submit(handle, plan, self.workdir / "functions")

    def pending(self, name: str, plan: dict[str, Any]) -> str:
        """The pending request of ``plan``'s run at site ``name`` (other tests may leave requests of theirs)."""
        function = function_name(plan.run_id)
        return next(r.request_id for r in list_requests(self.admins[name])
                    if r.status == "pending" and r.function == function)

    def approve_all(self, plan: dict[str, Any]) -> None:
        for name, site in self.sites.items():
            approve_request(self.admins[name], site.site, self.pending(name, plan), admin=site.meta.admin_email)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, imdb_train: pd.DataFrame) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    parts = partition_indices(imdb_train["label"].to_numpy(), n_sites=60, seed=0)
    sites, admins, handles, ids = {}, {}, [], {}
    for index, name in enumerate(NAMES):
        # "cpu:0" is the CPU named the way a GPU is: the rounds must train on the device the site was given
        site = launch_in_process(root / name, admin_password=ADMIN_PASSWORD, name=name, device="cpu:0")
        admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)
        upload_partition(admin, site.site, dataset="imdb", reviews=imdb_train.iloc[parts[index][:160]],
                         budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
        ids[name] = add_researcher(admin, name="Rita", email=RESEARCHER, password=RESEARCHER_PASSWORD)
        sites[name], admins[name] = site, admin
        handles.append(SiteHandle(name=name, client=site.login(email=RESEARCHER, password=RESEARCHER_PASSWORD),
                                  identity_key=site.site.identity_public_hex()))
    pin_each_other([site.site for site in sites.values()])
    model, _ = build_from_spec(SPEC)
    vector, _ = flatten_trainable(model)
    yield Federation(sites, admins, handles, root, vector, ids)
    for site in sites.values():
        site.stop()


@pytest.fixture(scope="module")
def approved(federation: Federation) -> FederatedPlan:
    raw = federation.plan()
    federation.submit_all(raw)
    federation.approve_all(raw)
    return FederatedPlan.parse(raw)


def test_review_shows_code_plan_privacy_and_dry_run(federation: Federation) -> None:
    raw = federation.plan()
    submit(federation.handles[0], raw, federation.workdir / "functions")

    report = review_request(federation.admins["site-a"], federation.sites["site-a"].site,
                            federation.pending("site-a", raw))

    assert report.problems == ()
    assert report.code_review.verdict == "clean"
    assert report.calibrated is not None and report.calibrated.run_epsilon == pytest.approx(3.0, abs=0.05)
    assert report.dry_run is not None and report.dry_run.trainable_parameters == len(federation.vector)
    text = report.render_text()
    assert "def fedsite_run_" in text and "projected" in text and "no problems" in text


def test_researcher_dry_runs_the_exact_function_on_a_mock(federation: Federation) -> None:
    result = dry_run_on_mock(federation.handles[2], federation.plan())

    assert result.trainable_parameters == len(federation.vector)
    assert result.mock_rows == 64


def test_two_rounds_train_and_spend_on_every_site(federation: Federation, approved: FederatedPlan,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    devices = []

    def recording_round(*args: Any, **kwargs: Any) -> Any:
        devices.append(kwargs["device"])
        return local_dp_round(*args, **kwargs)

    monkeypatch.setattr(site_runtime, "local_dp_round", recording_round)
    events_before = {name: len(AuditLog(site.site.path).events()) for name, site in federation.sites.items()}
    vector = federation.vector.astype(np.float32)
    outcomes = []
    for round_index in range(2):
        outcome = run_round(federation.handles, approved, round_index, vector)
        vector = (vector + outcome.average).astype(np.float32)
        outcomes.append(outcome)

    assert [o.participants for o in outcomes] == [NAMES, NAMES]
    assert devices == ["cpu:0"] * 6  # three sites, two rounds, each on the device its owner launched it with
    assert all(0 < np.abs(o.average).max() <= 0.5 for o in outcomes)
    for name, site in federation.sites.items():
        # Other tests of this module spend at the same sites, before or after: look at this run's records only
        ledger = PrivacyLedger(site.site.path, "imdb", federation.researcher_ids[name], site=name)
        records = [r for r in ledger.records() if r.run_id == approved.run_id]
        assert [r.round_index for r in records] == [0, 1]
        this_run = epsilon_of([r.history_entry() for r in records], delta=1e-5, accountant=ledger.accountant)
        assert this_run == pytest.approx(3.0, abs=0.1)
        kinds = [event.kind for event in AuditLog(site.site.path).events()[events_before[name]:]]
        assert kinds.count("privacy_spent") == 2 and kinds.count("output_released") == 2
        assert kinds.index("privacy_spent") < kinds.index("output_released")


def test_an_extra_round_is_refused(federation: Federation, approved: FederatedPlan) -> None:
    with pytest.raises(SiteRefusedError, match=r"site-a: round 2 is beyond the 2 approved rounds"):
        run_round(federation.handles, approved, 2, federation.vector)


def test_a_replayed_round_is_refused(federation: Federation) -> None:
    # Prepare: a run of its own whose round 0 has run (other tests' runs may or may not have run yet)
    raw = federation.plan(dp={"rounds": 1, "target_epsilon": 0.5})
    federation.submit_all(raw)
    federation.approve_all(raw)
    plan = FederatedPlan.parse(raw)
    run_round(federation.handles, plan, 0, federation.vector)

    # Execute / Assert: round 0 again, as a new session (attempt 5), is refused
    with pytest.raises(SiteRefusedError, match=r"site-a: round 0 already ran here: a replayed round is refused"):
        run_round(federation.handles, plan, 0, federation.vector, first_attempt=5)


def test_a_fake_dropout_claim_cannot_unmask_a_live_site(federation: Federation) -> None:
    raw = federation.plan(dp={"rounds": 1})
    federation.submit_all(raw)
    federation.approve_all(raw)
    plan = FederatedPlan.parse(raw)
    attack = FederatedRound(federation.handles, plan, 0, 0)
    agg = attack.aggregator
    vector = federation.vector.astype(np.float32)
    for reply in attack._stage("advertise_keys", NAMES, lambda _: {}).values():
        agg.receive_advertise_keys(AdvertiseKeys.from_wire(reply.message))
    keys = agg.close_advertise_keys().to_wire()
    for reply in attack._stage("share_keys", NAMES, lambda _: {"round_keys": keys}).values():
        agg.receive_share_keys(ShareKeys.from_wire(reply.message))
    inboxes = {n: i.to_wire() for n, i in agg.close_share_keys().items()}
    replies = attack._stage("mask_input", NAMES, lambda n: {"incoming": inboxes[n], "global_model": encode_vector(vector)})
    for reply in replies.values():
        agg.receive_masked_input(MaskedInput.from_wire(reply.message))
    survivors = agg.close_masked_input().to_wire()
    signatures = attack._stage("consistency_check", NAMES, lambda _: {"survivors": survivors})
    # The aggregator now claims site-c dropped, to get the shares of c's pairwise mask key as well.
    forged = SignedSurvivors(session_id=plan.session_id(0, 0), survivors=("site-a", "site-b"), signatures=())

    with pytest.raises(SiteRefusedError, match=r"^site-a: SignedSurvivors.survivors differs from the survivor list this site signed"):
        attack._call(federation.handles[0], "unmask", {"signed": forged.to_wire()})
    assert len(signatures) == 3


def test_changed_code_and_forged_roster_are_refused_at_review(federation: Federation) -> None:
    raw = federation.plan().to_dict()
    raw["roster"][0][1] = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()  # an impostor's key
    forged = FederatedPlan.parse(raw)
    submit(federation.handles[0], forged, federation.workdir / "functions")

    report = review_request(federation.admins["site-a"], federation.sites["site-a"].site,
                            federation.pending("site-a", forged),
                            with_dry_run=False)

    assert any(p.startswith("roster entry site-a carries key") and "KEY DIFFERS from this site's" in p
               for p in report.problems)
    assert [entry.status for entry in report.roster][1:] == ["pinned", "pinned"]
    with pytest.raises(FedsiteError, match=r"cannot be approved: roster entry site-a carries key"):
        approve_request(federation.admins["site-a"], federation.sites["site-a"].site,
                        federation.pending("site-a", forged),
                        admin="admin")


def test_an_over_budget_plan_is_refused_at_review(federation: Federation) -> None:
    greedy = federation.plan(dp={"target_epsilon": None, "noise_multiplier": 0.3, "rounds": 50})
    submit(federation.handles[1], greedy, federation.workdir / "functions")

    report = review_request(federation.admins["site-b"], federation.sites["site-b"].site,
                            federation.pending("site-b", greedy),
                            with_dry_run=False)

    assert any(p.startswith("privacy: site 'site-b' refuses the plan") and "over the budget epsilon=8" in p
               for p in report.problems)


def test_the_researcher_resumes_after_its_process_dies(federation: Federation, tmp_path: Path) -> None:
    raw = federation.plan(dp={"rounds": 2})
    federation.submit_all(raw)
    federation.approve_all(raw)
    settings = TrainerSettings(run_dir=tmp_path / "run", imdb_source=str(IMDB_DIR), test_size=40, progress=False)
    first = FederatedTrainer(federation.handles, raw, settings)
    first.run_one_round(0)

    second = FederatedTrainer(federation.handles, raw, settings)  # a new process on the same run_dir
    restored = flatten_trainable(second.model)[0]
    report = second.run()

    assert np.array_equal(restored, flatten_trainable(first.model)[0])
    assert [r.round_index for r in report.rounds] == [0, 1]
    assert (tmp_path / "run" / "report.png").stat().st_size > 0


def test_the_trainer_calibrates_the_bias_on_public_texts(federation: Federation, tmp_path: Path) -> None:
    # Prepare: a one-round plan, and public reviews (a few of them among the evaluated ones)
    raw = federation.plan(dp={"rounds": 1, "target_epsilon": 1.0})
    federation.submit_all(raw)
    federation.approve_all(raw)
    evaluated = load_test_subset(IMDB_DIR, 40, 0)
    public = [*load_test_subset(IMDB_DIR, 60, 5)["text"], *evaluated["text"][:3]]
    settings = TrainerSettings(run_dir=tmp_path / "run", imdb_source=str(IMDB_DIR), test_size=40, progress=False,
                               calibration_texts=tuple(public))

    # Execute
    trainer = FederatedTrainer(federation.handles, raw, settings)
    record = trainer.run().rounds[0]

    # Assert: the checkpointed model is the calibrated one, scored as the report says, and it splits the
    # public texts that are not evaluated at the prior
    assert len(trainer.calibration_texts) == len(set(public) - set(evaluated["text"]))
    model, tokenizer = build_from_spec(raw.model)
    checkpoint = load_latest(tmp_path / "run")
    assert checkpoint is not None and checkpoint.round_index == 0
    restore_into(model, checkpoint)
    score = evaluate(model, tokenizer, evaluated["text"].tolist(), evaluated["label"].tolist(), max_length=64)
    assert record.accuracy == score.accuracy
    assert record.mean_loss == pytest.approx(score.mean_loss, rel=1e-4)
    logits = predict_logits(model, tokenizer, trainer.calibration_texts, max_length=64)
    assert float((logits[:, 1] > logits[:, 0]).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert record.uncalibrated_accuracy is not None and record.calibration_shift is not None
    saved = RunReport.load_json(tmp_path / "run" / "report.json").rounds[0]
    assert saved.calibration_shift == record.calibration_shift


def test_budget_lowered_after_approval_stops_the_next_round(federation: Federation) -> None:
    raw = federation.plan(dp={"rounds": 2})
    federation.submit_all(raw)
    federation.approve_all(raw)
    site_b = federation.sites["site-b"].site
    ledger = PrivacyLedger(site_b.path, "imdb", federation.researcher_ids["site-b"], site="site-b")
    lowered, budget = round(ledger.spent() + 0.01, 2), ledger.budget
    budgets = BudgetBook(site_b.path)
    budgets.set("imdb", PrivacyBudget(epsilon=lowered, delta=1e-5), n_records=160, replace=True)

    try:
        with pytest.raises(SiteRefusedError,
                           match=rf"site-b: budget exhausted: epsilon would be \d+\.\d\d > {lowered:g}$"):
            run_round(federation.handles, FederatedPlan.parse(raw), 0, federation.vector)
    finally:  # the module's other tests train at site-b too, before or after this one
        budgets.set("imdb", budget, n_records=160, replace=True)


def test_a_code_request_that_fails_server_side_says_whose_log_has_the_traceback(
    federation: Federation, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: site-b's code service fails on a bug, not a refusal
    site, handle, admin = federation.sites["site-b"], federation.handles[1], federation.admins["site-b"]
    before = len(list_requests(admin))

    def broken_request(context: Any, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'PRIVATE_DETAIL'")

    monkeypatch.setattr(site.worker.services.user_code, "request_code_execution", broken_request)

    # Execute
    with caplog.at_level(logging.ERROR, logger="fedsite.site"), pytest.raises(SubmissionError) as failed:
        submit(handle, federation.plan(), federation.workdir / "functions")

    # Assert: the researcher is told which site failed, how, and who has the traceback; the site logged it
    assert str(failed.value) == (
        "site-b did not take the code request: site-b failed server side with AttributeError (syft shows a "
        "researcher only its type); the traceback is in site-b's log (logger fedsite.site, level ERROR): ask its "
        "admin for it"
    )
    assert "PRIVATE_DETAIL" not in str(failed.value)
    (logged,) = [r for r in caplog.records if r.name == "fedsite.site"]
    assert logged.getMessage().startswith("site-b: a syft service call failed with AttributeError")
    assert len(list_requests(admin)) == before


def test_a_run_id_names_exactly_one_function_at_a_site(federation: Federation) -> None:
    admin, handle = federation.admins["site-c"], federation.handles[2]
    raw = federation.plan()
    before = len(list_requests(admin))
    submit(handle, raw, federation.workdir / "functions")
    submit(handle, raw, federation.workdir / "functions")  # the same request again is not a second request
    assert len(list_requests(admin)) == before + 1

    changed = dataclasses.replace(raw, dp=dataclasses.replace(raw.dp, learning_rate=0.5))
    with pytest.raises(SubmissionError, match=rf"site-c already has a request for run {raw.run_id} .* new plan"):
        submit(handle, changed, federation.workdir / "functions")
    assert len(list_requests(admin)) == before + 1
    deny_request(admin, federation.sites["site-c"].site, federation.pending("site-c", raw), reason="test", admin="x")


def test_a_roster_of_researcher_made_sites_is_refused_at_review_and_at_every_stage(federation: Federation) -> None:
    # Prepare: the real site-a and two "sites" whose keys the researcher holds: with t = 2 their shares would
    # unmask site-a's single update. site-a's admin has pinned only site-b and site-c.
    from policies.peers import PeerPins

    fakes = [SiteHandle(name=name, client=federation.handles[0].client,
                        identity_key=Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex())
             for name in ("site-x", "site-y")]
    raw = make_plan(sites=[federation.handles[0], *fakes], model=SPEC, dp=DP, vector_length=len(federation.vector),
                    clip=0.5, threshold=2)
    submit(federation.handles[0], raw, federation.workdir / "functions")
    site_a, admin_a = federation.sites["site-a"], federation.admins["site-a"]

    # Execute: the review, an approval, and (with the plan recorded as approved by hand) a round's first stage
    report = review_request(admin_a, site_a.site, federation.pending("site-a", raw), with_dry_run=False)
    with pytest.raises(FedsiteError, match=r"cannot be approved: roster entry site-x \(key [0-9a-f]{16}\) is not pinned"):
        approve_request(admin_a, site_a.site, federation.pending("site-a", raw), admin="admin")
    deny_request(admin_a, site_a.site, federation.pending("site-a", raw), reason="unpinned roster", admin="admin")
    honest = federation.plan(dp={"rounds": 1})
    federation.submit_all(honest)
    federation.approve_all(honest)
    PeerPins(site_a.site.path, own_name="site-a").remove("site-c")  # the admin stops trusting site-c mid-run
    try:
        with pytest.raises(SiteRefusedError, match=r"^site-a: roster entry site-c \(key [0-9a-f]{16}\) is not pinned"):
            run_round(federation.handles, FederatedPlan.parse(honest), 0, federation.vector)
    finally:
        PeerPins(site_a.site.path, own_name="site-a").add("site-c", federation.handles[2].identity_key)

    # Assert
    assert [(e.site_id, e.status) for e in report.roster] == [("site-a", "this site"), ("site-x", "NOT PINNED"),
                                                              ("site-y", "NOT PINNED")]
    assert [p.split(" (key")[0] for p in report.problems] == ["roster entry site-x", "roster entry site-y"]
    text = report.render_text()
    assert "site-x               key" in text and "NOT PINNED" in text


def test_a_round_releases_no_timing_and_only_one_attempt_trains(federation: Federation) -> None:
    # Prepare: a one-round plan, keys shared by two concurrent sessions (attempts 0 and 1) of round 0
    raw = federation.plan(dp={"rounds": 1})
    federation.submit_all(raw)
    federation.approve_all(raw)
    plan = FederatedPlan.parse(raw)
    vector = encode_vector(federation.vector.astype(np.float32))
    sessions = [FederatedRound(federation.handles, plan, 0, attempt) for attempt in (0, 1)]
    inboxes = []
    for session in sessions:
        agg = session.aggregator
        for reply in session._stage("advertise_keys", NAMES, lambda _: {}).values():
            agg.receive_advertise_keys(AdvertiseKeys.from_wire(reply.message))
        keys = agg.close_advertise_keys().to_wire()
        for reply in session._stage("share_keys", NAMES, lambda _, keys=keys: {"round_keys": keys}).values():
            agg.receive_share_keys(ShareKeys.from_wire(reply.message))
        inboxes.append({n: i.to_wire() for n, i in agg.close_share_keys().items()})

    # Execute: both attempts' mask_input at site-a at once
    def mask(index: int) -> Any:
        try:
            return sessions[index]._call(federation.handles[0], "mask_input",
                                         {"incoming": inboxes[index]["site-a"], "global_model": vector})
        except SiteRefusedError as refused:
            return refused

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(mask, (0, 1)))

    # Assert: one masked update, one refusal; the reply carries the message and the researcher's epsilon only
    # (policies.contracts refuses a reply with any other field, e.g. a timing: the site would count as dropped)
    replies = [a for a in answers if isinstance(a, StageMessage)]
    refusals = [str(a) for a in answers if isinstance(a, SiteRefusedError)]
    assert len(replies) == 1 and isinstance(replies[0].epsilon_spent, float), answers
    assert len(refusals) == 1 and re.match(r"^site-a: (another attempt of round 0 is training here|round 0 already "
                                           r"ran here: a replayed round is refused)", refusals[0]), refusals
    ledger = PrivacyLedger(federation.sites["site-a"].site.path, "imdb", federation.researcher_ids["site-a"],
                           site="site-a")
    assert [r.round_index for r in ledger.records() if r.run_id == plan.run_id] == [0]
