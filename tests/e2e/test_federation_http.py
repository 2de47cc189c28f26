"""Three `fedsite serve` processes over HTTP: a full DP run, a kill -9 mid-round, and the attacks.

The same flows as tests/integration/test_federation.py, but every admin and researcher call goes over
loopback HTTP to a separate server process, so a site can be killed with SIGKILL and restarted.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from syft.types.errors import SyftException

from datasites.admin import add_researcher, connect_admin, pin_each_other, upload_partition
from datasites.partition import partition_indices
from datasites.review_queue import ReviewReport, approve_request, list_requests, review_request
from datasites.sitedir import SiteDir
from models import build_from_spec
from policies.accounting import epsilon_of
from policies.approvals import ApprovalRegistry
from policies.audit import ApiCallRefused, AuditLog, PrivacySpent
from policies.budget import PrivacyBudget
from policies.contracts import encode_vector
from policies.federated_plan import FederatedPlan
from policies.identity import key_fingerprint
from policies.ledger import PrivacyLedger
from policies.review import code_hash
from policies.secagg import AdvertiseKeys, MaskedInput, ShareKeys, SignedSurvivors
from policies.site_runtime import STAGES
from policies.submission import function_name
from policies.syft_client import login, quiet
from researcher.fedavg import flatten_trainable
from researcher.federation import (
    FederatedRound,
    SiteHandle,
    SiteRefusedError,
    make_plan,
    request_execution,
    run_round,
    submit,
)
from researcher.report import RunReport
from researcher.trainer import FederatedTrainer, TrainerSettings
from tests.conftest import ADMIN_PASSWORD, IMDB_DIR, RESEARCHER_PASSWORD
from tests.e2e.conftest import ServedSite, free_port
from tests.e2e.kill import kill9

pytestmark = pytest.mark.e2e

T = TypeVar("T")

RESEARCHER = "rita@uni.org"
NAMES = ("site-a", "site-b", "site-c")
REVIEWS_PER_SITE = 150
SPEC = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
        "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 3,
      "target_epsilon": 2.0, "max_length": 64, "max_physical_batch_size": 16}
KILL_WAIT_S = 120  # how long the watcher waits for site-c to start the round it must die in


@dataclass
class HttpFederation:
    """Three served sites, their admins' clients and the researcher's handles, all over HTTP."""

    served: dict[str, ServedSite]
    admins: dict[str, Any]
    handles: dict[str, SiteHandle]
    root: Path
    vector_length: int
    researcher_ids: dict[str, str]  # site -> the researcher's immutable id there (its ledgers' key)

    def site(self, name: str) -> SiteDir:
        return SiteDir(self.served[name].data_dir)

    def plan(self, **overrides: Any) -> dict[str, Any]:
        dp = {**DP, **overrides.pop("dp", {})}
        return make_plan(sites=list(self.handles.values()), model=SPEC, dp=dp, vector_length=self.vector_length,
                         clip=0.5, **overrides)

    def submit(self, name: str, plan: dict[str, Any], handle: SiteHandle | None = None,
               check_earlier: bool = True) -> str:
        """Submit ``plan`` at one site; return the id of the new pending request.

        ``check_earlier=False`` skips the researcher-side check for an earlier request under the same
        run_id, as an attacker with their own client would.
        """
        send = submit if check_earlier else request_execution
        send(handle or self.handles[name], plan, self.root / "functions")
        return self.pending(name, plan.run_id)

    def pending(self, name: str, run_id: str) -> str:
        requests = [r for r in list_requests(self.admins[name])
                    if r.function == function_name(run_id) and r.status == "pending"]
        assert requests, f"no pending request for {run_id} at {name}"
        return requests[-1].request_id

    def approve_everywhere(self, plan: dict[str, Any]) -> None:
        """Submit ``plan`` at every site, and each admin approves it.

        One site after the other: the sites' ledgers hold the same history, so the reviews after the
        first find the noise calibration in this process's accountant cache instead of redoing it.
        """
        for name in NAMES:
            request_id = self.submit(name, plan)
            approve_request(self.admins[name], self.site(name), request_id, admin=self.site(name).meta().admin_email)

    def review(self, name: str, request_id: str) -> ReviewReport:
        return review_request(self.admins[name], self.site(name), request_id, with_dry_run=False)

    def reconnect(self, name: str) -> None:
        """Log the admin and the researcher in again (after the site's process was restarted)."""
        port = self.served[name].port
        self.admins[name] = connect_admin(self.site(name), password=ADMIN_PASSWORD)
        self.handles[name].client = login("http://127.0.0.1", port=port, email=RESEARCHER,
                                          password=RESEARCHER_PASSWORD)

    def trainer(self, plan: dict[str, Any]) -> FederatedTrainer:
        settings = TrainerSettings(run_dir=self.root / "researcher" / plan.run_id, imdb_source=str(IMDB_DIR),
                                   test_size=100, progress=False)
        return FederatedTrainer(list(self.handles.values()), plan, settings)


def _at_every_site(work: Callable[[str], T]) -> dict[str, T]:
    """Run ``work(name)`` for the three sites concurrently (each is a separate server process)."""
    with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
        futures = {name: pool.submit(work, name) for name in NAMES}
        return {name: future.result() for name, future in futures.items()}


def _onboard(served: ServedSite, reviews: pd.DataFrame) -> tuple[Any, SiteHandle, str]:
    site = SiteDir(served.data_dir)
    admin = connect_admin(site, password=ADMIN_PASSWORD)
    upload_partition(admin, site, dataset="imdb", reviews=reviews, budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
    researcher_id = add_researcher(admin, name="Rita", email=RESEARCHER, password=RESEARCHER_PASSWORD)
    client = login("http://127.0.0.1", port=served.port, email=RESEARCHER, password=RESEARCHER_PASSWORD)
    return admin, SiteHandle(name=served.name, client=client, identity_key=site.identity_public_hex()), researcher_id


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, imdb_train: pd.DataFrame) -> Iterator[HttpFederation]:
    root = tmp_path_factory.mktemp("http-federation")
    served = {name: ServedSite(name=name, data_dir=root / name, port=free_port(), log=root / f"{name}.log",
                               admin_password=ADMIN_PASSWORD) for name in NAMES}
    try:
        for site in served.values():
            site.start()
        for site in served.values():
            site.wait_ready()
        parts = partition_indices(imdb_train["label"].to_numpy(), n_sites=60, seed=0)
        onboarded = _at_every_site(lambda name: _onboard(
            served[name], imdb_train.iloc[parts[NAMES.index(name)][:REVIEWS_PER_SITE]].reset_index(drop=True)))
        admins = {name: admin for name, (admin, _, _) in onboarded.items()}
        handles = {name: handle for name, (_, handle, _) in onboarded.items()}
        researcher_ids = {name: researcher_id for name, (_, _, researcher_id) in onboarded.items()}
        pin_each_other([SiteDir(site.data_dir) for site in served.values()])  # the admins compared keys
        model, _ = build_from_spec(SPEC)
        yield HttpFederation(served, admins, handles, root, len(flatten_trainable(model)[0]), researcher_ids)
    finally:
        for site in served.values():
            kill9(site)


@dataclass(frozen=True)
class FullRun:
    plan: dict[str, Any]
    report: RunReport


@pytest.fixture(scope="module")
def full_run(federation: HttpFederation) -> FullRun:
    plan = federation.plan()
    federation.approve_everywhere(plan)
    return FullRun(plan, federation.trainer(plan).run())


def _ledger(federation: HttpFederation, name: str) -> PrivacyLedger:
    return PrivacyLedger(federation.site(name).path, "imdb", federation.researcher_ids[name], site=name)


def _spends_match_the_audit_log(federation: HttpFederation, name: str, run_id: str | None = None) -> None:
    """Every ledger record has its privacy_spent audit event, same run, round and epsilon, and vice versa
    (of ``run_id`` alone when given: another test's run may have been killed between the two)."""
    path = federation.site(name).path
    run_of = {a.request_id: str(a.plan["run_id"]) for a in ApprovalRegistry(path).all()}
    audited = [(run_of[e.request_id], e.round, round(e.epsilon, 9)) for e in AuditLog(path).events()
               if isinstance(e, PrivacySpent)]
    ledger = [(r.run_id, r.round_index, round(max(0.0, r.epsilon_after - r.epsilon_before), 9))
              for r in _ledger(federation, name).replay()]
    if run_id is not None:
        audited, ledger = [a for a in audited if a[0] == run_id], [r for r in ledger if r[0] == run_id]
    assert audited == ledger


def test_three_rounds_over_http_spend_on_every_site(federation: HttpFederation, full_run: FullRun) -> None:
    run_id = full_run.plan.run_id

    assert [r.round_index for r in full_run.report.rounds] == [0, 1, 2]
    assert all(r.participants == NAMES and r.dropped == () for r in full_run.report.rounds)
    for name in NAMES:
        records = _ledger(federation, name).replay()  # replay: each record's epsilons recomputed from those before
        spends = [r for r in records if r.run_id == run_id]
        assert [r.round_index for r in spends] == [0, 1, 2]
        # this run alone composes to its target; other tests' runs may have spent at the site before it (any order)
        alone = epsilon_of([r.history_entry() for r in spends], delta=spends[0].delta, accountant=spends[0].accountant)
        assert alone == pytest.approx(2.0, abs=0.05)
        assert spends[-1].epsilon_after >= alone
        # the site reports the researcher's spend to two decimals (finer would tell the partition's size)
        assert full_run.report.rounds[-1].epsilon_spent[name] == round(spends[-1].epsilon_after, 2)
        AuditLog(federation.site(name).path).verify()
        _spends_match_the_audit_log(federation, name)


def test_a_fake_dropout_claim_cannot_unmask_a_live_site(federation: HttpFederation) -> None:
    # Prepare: an honest session up to the consistency check, every site signing all three survivors
    raw = federation.plan(dp={"rounds": 1, "target_epsilon": 1.0})
    federation.approve_everywhere(raw)
    plan = FederatedPlan.parse(raw)
    attack = FederatedRound(list(federation.handles.values()), plan, 0, 0)
    agg = attack.aggregator
    model = encode_vector(np.zeros(federation.vector_length, dtype=np.float32))
    for reply in attack._stage("advertise_keys", NAMES, lambda _: {}).values():
        agg.receive_advertise_keys(AdvertiseKeys.from_wire(reply.message))
    keys = agg.close_advertise_keys().to_wire()
    for reply in attack._stage("share_keys", NAMES, lambda _: {"round_keys": keys}).values():
        agg.receive_share_keys(ShareKeys.from_wire(reply.message))
    inboxes = {n: i.to_wire() for n, i in agg.close_share_keys().items()}
    for reply in attack._stage("mask_input", NAMES, lambda n: {"incoming": inboxes[n], "global_model": model}).values():
        agg.receive_masked_input(MaskedInput.from_wire(reply.message))
    survivors = agg.close_masked_input().to_wire()
    signatures = attack._stage("consistency_check", NAMES, lambda _: {"survivors": survivors})
    # The aggregator now claims site-c dropped, to get the shares of c's pairwise mask key as well.
    forged = SignedSurvivors(session_id=plan.session_id(0, 0), survivors=("site-a", "site-b"), signatures=())

    # Execute / Assert
    with pytest.raises(SiteRefusedError, match=r"^site-a: SignedSurvivors\.survivors differs from the survivor list "
                                               r"this site signed in ConsistencyCheck: the aggregator is showing "
                                               r"sites different lists; refuse to unmask$"):
        attack._call(federation.handles["site-a"], "unmask", {"signed": forged.to_wire()})
    assert sorted(signatures) == sorted(NAMES) and attack.dropped == []


def _kill_when_round_starts(site: ServedSite, run_id: str, round_index: int, killed: threading.Event,
                            stop: threading.Event) -> None:
    """SIGKILL ``site`` as soon as it has saved its secure-sum state for ``round_index`` (unless stopped)."""
    runs = site.data_dir / "runs"  # runs/<researcher id>/<run id>/
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and not stop.is_set():
        if any(runs.glob(f"*/{run_id}/round-{round_index}-attempt-*.state")):
            kill9(site)
            killed.set()
            return
        time.sleep(0.02)


def test_kill_9_mid_round_then_restart_loses_nothing(federation: HttpFederation) -> None:
    # Prepare
    plan = federation.plan()
    run_id = plan.run_id
    federation.approve_everywhere(plan)
    trainer = federation.trainer(plan)
    site_c = federation.served["site-c"]
    killed, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_kill_when_round_starts, args=(site_c, run_id, 1, killed, stop), daemon=True)

    # Execute: round 0 with all three; site-c dies with SIGKILL once it has started round 1
    watcher.start()
    try:
        trainer.run_one_round(0)
        round_1 = trainer.run_one_round(1)
    finally:
        stop.set()  # never let the watcher kill a site later, during another test
        watcher.join(timeout=KILL_WAIT_S)
    assert killed.is_set(), f"site-c never started round 1 of {run_id}"
    site_c.start()
    site_c.wait_ready()
    federation.reconnect("site-c")
    resumed = federation.trainer(plan)  # the researcher's process restarts too: resume from run_dir
    next_round = resumed.next_round
    report = resumed.run()

    # Assert
    assert round_1.participants == ("site-a", "site-b") and round_1.dropped == ("site-c",)
    assert next_round == 2
    assert [r.round_index for r in report.rounds] == [0, 1, 2]
    assert report.rounds[0].participants == NAMES and report.rounds[2].participants == NAMES
    assert report.rounds[1].dropped == ("site-c",)
    # why, as the researcher saw it: the reason begins with the stage site-c stopped answering at
    assert set(round_1.drop_reasons) == {"site-c"}
    assert round_1.drop_reasons["site-c"].split(":")[0] in STAGES, round_1.drop_reasons
    assert dict(report.rounds[1].drop_reasons) == dict(round_1.drop_reasons)  # kept in report.json across the resume
    c_rounds = [r.round_index for r in _ledger(federation, "site-c").replay() if r.run_id == run_id]
    assert c_rounds in ([0, 2], [0, 1, 2])  # round 1 only if the kill came after its spend
    for name in NAMES:
        AuditLog(federation.site(name).path).verify()
        _spends_match_the_audit_log(federation, name)
    for name in ("site-a", "site-b"):
        assert [r.round_index for r in _ledger(federation, name).records() if r.run_id == run_id] == [0, 1, 2]


def _raw_call(handle: SiteHandle, function: str, stage: str, message: dict[str, Any], *, code_id: Any = None) -> str:
    """What the researcher sees calling one stage directly: the reply, or the error's text.

    With ``code_id``, the call goes to that version of ``function``: syft keeps every version submitted
    under one name and, called by name, runs one of them, not necessarily the newest.
    """
    with quiet():
        try:
            call = getattr(handle.client.code, function)
            if code_id is not None:
                call = call.model_copy(update={"pre_kwargs": {"uid": code_id}})
            result = call(data=handle.asset(), stage=stage, message=message)
            reply = result.get() if hasattr(result, "get") and not isinstance(result, dict) else result
        except Exception as exc:  # noqa: BLE001 - the researcher's view, raised or returned
            return f"{type(exc).__name__}: {exc}"
    return str(reply)


def _gate_refusals(federation: HttpFederation, name: str) -> list[ApiCallRefused]:
    return [e for e in AuditLog(federation.site(name).path).events() if isinstance(e, ApiCallRefused)]


def test_unapproved_code_is_refused_at_the_api_gate(federation: HttpFederation) -> None:
    # Prepare: a pending request at site-b
    plan = federation.plan()
    request_id = federation.submit("site-b", plan)
    with quiet():
        code = next(r for r in federation.admins["site-b"].requests if str(r.id.no_dash) == request_id).code
        digest = code_hash(code.raw_code)
    audit = AuditLog(federation.site("site-b").path)
    logged = audit.head().n_entries

    # Execute: the researcher calls it anyway
    seen = _raw_call(federation.handles["site-b"], function_name(plan.run_id), "advertise_keys",
                     {"round": 0, "attempt": 0})

    # Assert: the gate refused before syft looked at the code's status; nothing ran, the refusal is audited
    reason = (f"site-b: refused: code.call (the site's API gate): code {digest[:12]} has no Fedsite approval here for "
              "you (unapproved, changed after approval, or revoked): submit it for review")
    assert seen == f"SyftException: {reason}", seen
    new = audit.events()[logged:]
    assert [e.kind for e in new] == ["api_call_refused"]
    assert (new[0].path, new[0].caller, new[0].caller_email, new[0].reason) == \
        ("code.call", federation.researcher_ids["site-b"], RESEARCHER, reason)
    assert not list((federation.site("site-b").path / "runs").glob(f"*/{plan.run_id}"))


def test_code_bound_to_another_asset_is_refused_at_submission(federation: HttpFederation,
                                                              imdb_train: pd.DataFrame) -> None:
    # Prepare: a second dataset at site-a, and a plan for dataset "imdb" whose `data` is bound to the other one
    site = federation.site("site-a")
    other = imdb_train.iloc[-120:].reset_index(drop=True)
    upload_partition(federation.admins["site-a"], site, dataset="imdb-extra", reviews=other,
                     budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
    handle = SiteHandle(name="site-a", client=federation.handles["site-a"].client,
                        identity_key=site.identity_public_hex(), dataset="imdb-extra")
    plan = federation.plan(dp={"target_epsilon": None, "noise_multiplier": 1.0})  # says dataset "imdb"

    # Execute
    with pytest.raises(SyftException) as refused:
        request_execution(handle, plan, federation.root / "functions")

    # Assert: the gate refused the request before syft stored it; the admin has nothing to review
    assert str(refused.value).endswith("site-a: refused: code.request_code_execution (the site's API gate): `data` "
                                       "must be this site's asset of dataset 'imdb'"), str(refused.value)
    assert not [r for r in list_requests(federation.admins["site-a"]) if r.function == function_name(plan.run_id)]
    assert _gate_refusals(federation, "site-a")[-1].path == "code.request_code_execution"


def test_an_extra_round_is_refused(federation: HttpFederation, full_run: FullRun) -> None:
    handles = list(federation.handles.values())
    vector = np.zeros(federation.vector_length, dtype=np.float32)

    with pytest.raises(SiteRefusedError, match=r"^site-a: round 3 is beyond the 3 approved rounds \(0\.\.2\)$"):
        run_round(handles, FederatedPlan.parse(full_run.plan), 3, vector)


def test_a_replayed_round_is_refused(federation: HttpFederation, full_run: FullRun) -> None:
    handles = list(federation.handles.values())
    vector = np.zeros(federation.vector_length, dtype=np.float32)

    with pytest.raises(SiteRefusedError, match=r"^site-a: round 0 already ran here: a replayed round is refused$"):
        run_round(handles, FederatedPlan.parse(full_run.plan), 0, vector, first_attempt=7)


def test_an_over_budget_plan_is_refused_at_review(federation: HttpFederation) -> None:
    greedy = federation.plan(dp={"target_epsilon": None, "noise_multiplier": 0.3, "rounds": 50})

    report = federation.review("site-b", federation.submit("site-b", greedy))

    assert len(report.problems) == 1
    assert report.problems[0].startswith("privacy: site 'site-b' refuses ")
    assert "over the budget epsilon=8" in report.problems[0]


def test_a_forged_roster_is_refused_at_review(federation: HttpFederation) -> None:
    own = federation.handles["site-a"].identity_key
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    raw = federation.plan(dp={"target_epsilon": None, "noise_multiplier": 1.0}).to_dict()
    raw["roster"][0][1] = other
    forged = FederatedPlan.parse(raw)

    report = federation.review("site-a", federation.submit("site-a", forged))

    assert report.problems == (f"roster entry site-a carries key {key_fingerprint(other)}: KEY DIFFERS from this "
                               f"site's {key_fingerprint(own)} (a substituted or outdated key)",)
    assert [(e.site_id, e.trusted) for e in report.roster] == [("site-a", False), ("site-b", True), ("site-c", True)]


def test_code_changed_after_approval_is_refused_by_the_gate(federation: HttpFederation) -> None:
    """A run of its own: once P' is approved in syft, syft may route calls of the run's name to P'."""
    # Prepare: P is approved through Fedsite at site-a; P' has P's run id and a changed plan literal, and
    # site-a's admin approves it in syft's own UI, bypassing Fedsite's review
    site = federation.site("site-a")
    approved = federation.plan()
    approve_request(federation.admins["site-a"], site, federation.submit("site-a", approved),
                    admin=site.meta().admin_email)
    changed = dataclasses.replace(approved, dp=dataclasses.replace(approved.dp, local_steps=64))
    request_id = federation.submit("site-a", changed, check_earlier=False)
    with quiet():
        request = next(r for r in federation.admins["site-a"].requests if str(r.id.no_dash) == request_id)
        request.approve()
        code_id, digest = request.code.id, code_hash(request.code.raw_code)
    spent = len(_ledger(federation, "site-a").records())

    # Execute
    seen = _raw_call(federation.handles["site-a"], function_name(changed.run_id), "advertise_keys",
                     {"round": 0, "attempt": 20}, code_id=code_id)

    # Assert: syft's approval is not Fedsite's; the API gate refuses the call before syft runs anything
    reason = (f"site-a: refused: code.call (the site's API gate): code {digest[:12]} has no Fedsite approval here "
              "for you (unapproved, changed after approval, or revoked): submit it for review")
    assert seen == f"SyftException: {reason}"
    refusal = _gate_refusals(federation, "site-a")[-1]
    assert (refusal.path, refusal.caller, refusal.reason) == ("code.call", federation.researcher_ids["site-a"], reason)
    assert ApprovalRegistry(site.path).find(digest, researcher=federation.researcher_ids["site-a"]) is None
    assert len(_ledger(federation, "site-a").records()) == spent
