"""When a failed round is retried and when it is lost: retries only before any site released its masked input.

The sites here run the real site half of the secure sum (``policies.secagg.site``) in memory behind a
researcher's client, with a site's one rule that matters here: a round it released is never run again
(``policies.site_runtime`` refuses any new session of it). The transport is what is simulated: a site
stops answering, or refuses, at a chosen stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.federated_plan import FederatedPlan
from policies.secagg import (
    IncomingShares,
    RoundKeys,
    SignedSurvivors,
    Survivors,
    advertise_keys,
    consistency_check,
    mask_input,
    share_keys,
    unmask,
)
from policies.secagg.state import SiteRoundState
from researcher.federation import RoundFailedError, SiteHandle, SiteRefusedError, run_round
from researcher.lost_rounds import RoundLostError, lost_by_refusal
from researcher.report import LostRound, RunReport
from researcher.trainer import REPORT_FILE, FederatedTrainer, TrainerSettings
from tests.conftest import IMDB_DIR
from tests.unit.test_submission import make_raw_plan

pytestmark = pytest.mark.unit

NAMES = ("site-a", "site-b", "site-c")
FUNCTION = "fedsite_run_0123456789ab"  # the function name of make_raw_plan's run id


class MemorySite:
    """One site's secure-sum half in memory; ``fail`` maps (stage, attempt or None) to what goes wrong."""

    def __init__(self, name: str, key: Ed25519PrivateKey, plan: FederatedPlan) -> None:
        self.name, self.key, self.plan = name, key, plan
        self.states: dict[int, SiteRoundState] = {}
        self.released: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.fail: dict[tuple[str, int | None], Exception | str] = {}
        self.epsilon: float | None = None  # the spend it reports with its masked input, as a real site does

    def __call__(self, *, data: Any, stage: str, message: Mapping[str, Any]) -> dict[str, Any]:
        round_index, attempt = message["round"], message["attempt"]
        self.calls.append((stage, attempt))
        failure = self.fail.get((stage, attempt), self.fail.get((stage, None)))
        if isinstance(failure, Exception):
            raise failure
        if isinstance(failure, str):
            return {"refused": f"{self.name}: {failure}"}
        if stage == "advertise_keys" and round_index in self.released:
            return {"refused": f"{self.name}: round {round_index} already ran here: a replayed round is refused"}
        reply = {"message": self._stage(stage, round_index, attempt, message)}
        if stage == "mask_input" and self.epsilon is not None:
            reply["epsilon_spent"] = self.epsilon
        return reply

    def _stage(self, stage: str, round_index: int, attempt: int, message: Mapping[str, Any]) -> dict[str, Any]:
        if stage == "advertise_keys":
            self.states[attempt], out = advertise_keys(self.plan.context(round_index, attempt), site_id=self.name,
                                                       identity_key=self.key)
            return out.to_wire()
        state = self.states[attempt]
        if stage == "share_keys":
            self.states[attempt], shared = share_keys(state, RoundKeys.from_wire(message["round_keys"]))
            return shared.to_wire()
        if stage == "mask_input":
            update = np.full(self.plan.secure_sum.vector_length, 0.1, dtype=np.float32)
            self.states[attempt], masked = mask_input(state, IncomingShares.from_wire(message["incoming"]), update)
            self.released.add(round_index)
            return masked.to_wire()
        if stage == "consistency_check":
            self.states[attempt], signed = consistency_check(state, Survivors.from_wire(message["survivors"]),
                                                             identity_key=self.key)
            return signed.to_wire()
        self.states[attempt], shares = unmask(state, SignedSurvivors.from_wire(message["signed"]))
        return shares.to_wire()


def _federation(threshold: int) -> tuple[FederatedPlan, dict[str, MemorySite], list[SiteHandle]]:
    keys = {name: Ed25519PrivateKey.generate() for name in NAMES}
    roster = [[name, keys[name].public_key().public_bytes_raw().hex()] for name in NAMES]
    raw = make_raw_plan(roster=roster)
    raw["secure_sum"] = {**raw["secure_sum"], "threshold": threshold}
    plan = FederatedPlan.parse(raw)
    sites = {name: MemorySite(name, keys[name], plan) for name in NAMES}
    datasets = {"imdb": SimpleNamespace(assets={"reviews": object()})}  # looked up again after a dropout
    handles = [SiteHandle(name=name, client=SimpleNamespace(code=SimpleNamespace(**{FUNCTION: site}), datasets=datasets),
                          identity_key=roster[index][1]) for index, (name, site) in enumerate(sites.items())]
    return plan, sites, handles


def _zeros(plan: FederatedPlan) -> np.ndarray:
    return np.zeros(plan.secure_sum.vector_length, dtype=np.float32)


def test_a_session_that_fails_before_any_release_is_retried_with_a_new_session() -> None:
    # Prepare: site-c stops answering at share_keys in attempt 0 only; every site is needed
    plan, sites, handles = _federation(threshold=3)
    sites["site-c"].fail[("share_keys", 0)] = ConnectionError("[Errno 111] Connection refused")

    # Execute
    outcome = run_round(handles, plan, 0, _zeros(plan))

    # Assert: attempt 1 finished with all three; attempt 0 never reached a masked input
    assert (outcome.attempt, outcome.participants) == (1, NAMES)
    assert np.allclose(outcome.average, 0.1, atol=1e-4)
    assert [stage for stage, attempt in sites["site-a"].calls if attempt == 0] == ["advertise_keys", "share_keys"]


def test_a_session_that_fails_after_a_release_is_lost_and_never_retried() -> None:
    # Prepare: site-c dies during its masked input, after site-a and site-b released theirs
    plan, sites, handles = _federation(threshold=3)
    sites["site-a"].epsilon, sites["site-b"].epsilon = 1.25, 1.5
    sites["site-c"].fail[("mask_input", None)] = ConnectionError("[Errno 111] Connection refused")

    # Execute
    with pytest.raises(RoundLostError) as lost:
        run_round(handles, plan, 1, _zeros(plan), max_attempts=3, first_attempt=4)

    # Assert: one session only; the record says who spent (and what they reported), where and why
    record = lost.value.record
    assert {attempt for site in sites.values() for _, attempt in site.calls} == {4}
    assert (record.round_index, record.attempt, record.stage) == (1, 4, "mask_input")
    assert record.released == ("site-a", "site-b") and dict(record.epsilon_spent) == {"site-a": 1.25, "site-b": 1.5}
    assert record.unconfirmed == ("site-c",)
    assert dict(record.drop_reasons) == {"site-c": "mask_input: ConnectionError: [Errno 111] Connection refused"}
    assert "too few" in record.reason or "threshold" in record.reason, record.reason
    assert str(lost.value) == record.summary()
    assert str(lost.value).startswith("round 1 lost at mask_input: ")


def test_a_refusal_after_a_release_loses_the_round() -> None:
    # Prepare: every site masks, then site-b refuses to sign the survivor list
    plan, sites, handles = _federation(threshold=2)
    sites["site-b"].fail[("consistency_check", None)] = "the survivor list is not the one it saw"

    # Execute
    with pytest.raises(RoundLostError) as lost:
        run_round(handles, plan, 0, _zeros(plan))

    # Assert: no site reported a spend here, so none is claimed; all three released
    record = lost.value.record
    assert (record.stage, record.reason) == ("consistency_check", "site-b: the survivor list is not the one it saw")
    assert record.released == NAMES and dict(record.epsilon_spent) == {} and record.unconfirmed == ()


def test_a_refusal_before_any_release_stops_the_run() -> None:
    plan, sites, handles = _federation(threshold=2)
    sites["site-a"].fail[("advertise_keys", None)] = "budget exhausted: this round's spend would exceed the budget"

    with pytest.raises(SiteRefusedError, match=r"^site-a: budget exhausted: "):
        run_round(handles, plan, 0, _zeros(plan))
    assert all(stage == "advertise_keys" for site in sites.values() for stage, _ in site.calls)


def test_too_few_sites_in_every_attempt_without_a_release_fails_the_round() -> None:
    plan, sites, handles = _federation(threshold=3)
    sites["site-c"].fail[("advertise_keys", None)] = ConnectionError("[Errno 111] Connection refused")

    with pytest.raises(RoundFailedError, match=r"^round 0 failed 2 times: "):
        run_round(handles, plan, 0, _zeros(plan), max_attempts=2)
    assert [attempt for _, attempt in sites["site-a"].calls] == [0, 1]


def test_a_new_session_of_a_released_round_reveals_a_lost_round() -> None:
    # Prepare: the researcher's process died after site-a released round 0; the new process tries again
    plan, sites, handles = _federation(threshold=2)
    sites["site-a"].released.add(0)

    # Execute
    with pytest.raises(SiteRefusedError) as refused:
        run_round(handles, plan, 0, _zeros(plan), first_attempt=3)
    record = lost_by_refusal(str(refused.value), 0, 3)

    # Assert
    assert record is not None
    assert (record.round_index, record.attempt, record.stage, record.released) == (0, 3, "advertise_keys", ("site-a",))
    assert record.reason == "site-a: round 0 already ran here: a replayed round is refused"
    assert record.summary() == ("round 0 lost at advertise_keys: site-a: round 0 already ran here: a replayed round "
                                "is refused; spent by site-a (not reported: see its ledger)")


@pytest.mark.parametrize("refusal", [
    "site-a: round 1 already ran here: a replayed round is refused",  # another round than the one asked for
    "site-a: round 0 is older than round 2, which already ran here",  # the researcher went backwards: stop
    "site-a: budget exhausted: this round's spend would exceed the site's privacy budget",
    "round 0 already ran here",  # not a site's refusal
])
def test_other_refusals_reveal_no_lost_round(refusal: str) -> None:
    assert lost_by_refusal(refusal, 0, 0) is None


def test_a_resumed_trainer_goes_on_after_a_lost_round_that_left_no_checkpoint(tmp_path: Path) -> None:
    # Prepare: round 0 was lost (recorded in the report) and the researcher's process died before round 1
    raw = make_raw_plan()
    report = RunReport(run_id=raw["run_id"])
    report.append_lost(LostRound(round_index=0, attempt=0, stage="mask_input", reason="too few", released=["site-a"]))
    report.save_json(tmp_path / REPORT_FILE)
    settings = TrainerSettings(run_dir=tmp_path, imdb_source=str(IMDB_DIR), test_size=8, progress=False)

    # Execute
    trainer = FederatedTrainer([], raw, settings)

    # Assert: no checkpoint, so the model is the initial one; the run goes on with round 1
    assert trainer.next_round == 1 and trainer.report.lost_rounds == report.lost_rounds
