"""The site's runtime for federated rounds: the only entry point submitted code calls.

A submitted function is a thin wrapper (see ``policies.submission``): it holds the plan as a
literal and a model builder, and returns ``run_stage(...)``. Everything privacy-critical happens
here, in code the site installed, inside an execution the site's guard authorised
(``policies.approvals``): the plan must be the approved one, the round must be new and within the
approved rounds, every roster entry must be pinned by this site's admin and the threshold at least
the site's minimum (``policies.peers``, checked at every stage), only one attempt of a round may
train and release (a lock per run and round), the ledger must pay for the round (written before
the masked update is returned), and the only thing returned is a secure-sum message (or a refusal
naming the reason): no timing of the private work, which depends on the private reviews' lengths
and the Poisson batch sizes (the researcher times its own calls). One call runs one SecAgg stage (Bonawitz et al. 2017,
Figure 4) for one attempt at one round; the site's half of the protocol state lives in
``<data-dir>/runs/<run-id>/`` between calls, so a restart of the site loses nothing.

syft runs each call twice, on the private partition and on the mock (docs/syft.md); the mock run
is recognised by the partition fingerprint and returns ``{"mock": True}`` without touching state.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import encode_texts
from policies.approvals import ExecutionContext, current_execution, plan_digest
from policies.audit import AuditLog, ExecutionAuthorised, ExecutionRefused, OutputReleased, PrivacySpent
from policies.dp import CalibratedPlan, DPPlanError, local_dp_round, train_dp_sgd, trainable_parameters
from policies.durable import JournalCorruptError, private_dirs, site_journal
from policies.federated_plan import FederatedPlan, FederatedPlanError
from policies.fingerprint import partition_fingerprint, read_dataset_facts
from policies.identity import load_identity_key
from policies.ledger import BudgetExceededError, PrivacyLedger
from policies.peers import PeerPinError, PeerPins
from policies.review import printable
from policies.secagg import (
    IncomingShares,
    RoundKeys,
    SecAggError,
    SignedSurvivors,
    SiteRoundState,
    Survivors,
    advertise_keys,
    check_incoming_shares,
    consistency_check,
    load_round_state,
    mask_input,
    save_round_state,
    share_keys,
    unmask,
)

# The site's own log (its admin reads it; nothing of it reaches the researcher): how long training took,
# and why a round was refused when the researcher is told less.
timing_log = logging.getLogger("fedsite.site.timing")
site_log = logging.getLogger("fedsite.site")
MAX_WEIGHT = 1e4  # the largest magnitude a global model's value may have
STAGES = ("advertise_keys", "share_keys", "mask_input", "consistency_check", "unmask")
ModelBuilder = Callable[[], tuple[torch.nn.Module, Any]]


class SiteRefusal(Exception):
    """The site's policy refuses this call; the message is returned to the researcher."""


def run_stage(data: Any, *, stage: str, message: Mapping[str, Any], plan: Mapping[str, Any],
              make_model: ModelBuilder) -> dict[str, Any]:
    """Run one secure-sum stage of one round at this site; returns a wire message or a refusal."""
    execution = current_execution()
    texts, labels = _columns(data)
    if execution.dry_run:
        return dry_run(texts, labels, plan=FederatedPlan.parse(plan), make_model=make_model)
    facts = read_dataset_facts(execution.data_dir, execution.approval.dataset)
    if partition_fingerprint(texts, labels) != facts["fingerprint"]:
        return {"mock": True}  # syft's second run, on the mock twin: nothing to do, nothing spent
    round_index: int | None = None
    try:
        if plan_digest(plan) != execution.approval.plan_digest:
            raise SiteRefusal("the plan differs from the approved plan: submit the changed plan for review")
        run = SiteRun(execution, FederatedPlan.parse(plan), make_model, private_fingerprint=facts["fingerprint"])
        round_index, attempt = _round_and_attempt(message, run.plan)
        return run.stage(stage, round_index, attempt, message, texts, labels)
    except (SiteRefusal, SecAggError, BudgetExceededError, DPPlanError, FederatedPlanError, PeerPinError) as exc:
        text = str(exc)  # it may quote the researcher's message: escaped and cut before it is logged or sent
        reason = printable(f"{execution.site}: {text if len(text) <= 500 else text[:500] + '... (cut)'}")
        # The ledger's own refusal names the sampling rate, i.e. the partition's size: for the admin's log only.
        told = (f"{execution.site}: budget exhausted: this round's spend would exceed the site's privacy budget"
                if isinstance(exc, BudgetExceededError) else reason)
        AuditLog(execution.data_dir).record(ExecutionRefused(
            request_id=execution.approval.request_id, code_hash=execution.approval.code_hash,
            researcher=execution.researcher, researcher_email=execution.researcher_email,
            dataset=execution.approval.dataset, round=round_index, reason=reason))
        return {"refused": told}
    except JournalCorruptError as exc:
        # A ledger, the sessions journal or the audit log failed verification (cut off, rolled back, edited):
        # nothing is spent or released until the admin restores it. The details are the admin's.
        site_log.error("%s: refused a round: a journal failed verification: %s", execution.site, exc)
        return {"refused": f"{execution.site}: refused: the site's records failed verification; its admin must "
                           "restore them before any round runs here"}


def dry_run(texts: list[str], labels: list[int], *, plan: FederatedPlan, make_model: ModelBuilder,
            rows: int = 64) -> dict[str, Any]:
    """The admin's review on the mock twin: build the model, check its size, take one noisy step.

    Runs on mock data only (the review passes the mock; the guard never sets ``dry_run``) and spends
    nothing; it shows that the exact submitted code builds the planned model and trains under DP.
    """
    started = time.perf_counter()
    model, tokenizer = make_model()
    trainable = sum(parameter.numel() for _, parameter in trainable_parameters(model))
    if trainable != plan.secure_sum.vector_length:
        raise SiteRefusal(f"the model has {trainable} trainable parameters, the plan's secure_sum.vector_length "
                          f"is {plan.secure_sum.vector_length}")
    n = min(rows, len(texts))
    # One step; an averaging plan keeps its code path with the one iterate there is.
    step_plan = dataclasses.replace(plan.dp, local_steps=1, rounds=1, target_epsilon=None, noise_multiplier=1.0,
                                    expected_batch_size=min(plan.dp.expected_batch_size, n), delta=0.1 / n,
                                    average_last_steps=min(plan.dp.average_last_steps, 1))
    calibrated = CalibratedPlan(plan=step_plan, n_records=n, noise_multiplier=1.0,
                                sample_rate=step_plan.expected_batch_size / n, run_epsilon=0.0,
                                projected_epsilon=0.0, budget_epsilon=0.0)
    mock = encode_texts(tokenizer, texts[:n], labels[:n], max_length=step_plan.max_length,
                        tail_tokens=step_plan.tail_tokens)
    loss, _ = train_dp_sgd(model, mock, plan=calibrated, device=torch.device("cpu"))
    return {"dry_run": True, "trainable_parameters": trainable, "mock_rows": n, "mock_loss": round(loss, 4),
            "seconds": round(time.perf_counter() - started, 2)}


def _columns(data: Any) -> tuple[list[str], list[int]]:
    try:
        return [str(t) for t in data["text"]], [int(v) for v in data["label"]]
    except (KeyError, TypeError) as exc:
        raise SiteRefusal(f"the data handed to the run has no text/label columns ({exc})") from None


def _checked_int(message: Mapping[str, Any], key: str) -> int:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SiteRefusal(f"message[{key!r}] must be an int >= 0, got {value!r}")
    return value


def _round_and_attempt(message: Mapping[str, Any], plan: FederatedPlan) -> tuple[int, int]:
    if not isinstance(message, Mapping):
        raise SiteRefusal(f"the message must be a mapping, got {type(message).__name__}")
    round_index, attempt = _checked_int(message, "round"), _checked_int(message, "attempt")
    if round_index >= plan.dp.rounds:
        raise SiteRefusal(f"round {round_index} is beyond the {plan.dp.rounds} approved rounds (0..{plan.dp.rounds - 1})")
    return round_index, attempt


def decode_vector(encoded: object, length: int) -> np.ndarray:
    """A float32 vector sent as base64 of its little-endian bytes; exact length checked."""
    if not isinstance(encoded, str):
        raise SiteRefusal(f"the global model must be a base64 str, got {type(encoded).__name__}")
    raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    if len(raw) != 4 * length:
        raise SiteRefusal(f"the global model has {len(raw) // 4} values, the plan has {length} trainable parameters")
    vector = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(vector).all():
        raise SiteRefusal("the global model contains NaN or infinite values")
    if np.abs(vector).max(initial=0.0) > MAX_WEIGHT:
        # No trained weight comes near this; weights near float32's limit can make one chosen review overflow.
        raise SiteRefusal(f"the global model has a value beyond +-{MAX_WEIGHT:g}: no trained weight is that large")
    return vector


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def load_trainable(model: torch.nn.Module, vector: np.ndarray) -> None:
    """Copy ``vector`` into the trainable parameters, in ``named_parameters`` order."""
    named = trainable_parameters(model)
    total = sum(p.numel() for _, p in named)
    if total != len(vector):
        raise SiteRefusal(f"the model has {total} trainable parameters, the plan's vector_length is {len(vector)}")
    offset = 0
    with torch.no_grad():
        for _, parameter in named:
            count = parameter.numel()
            parameter.copy_(torch.from_numpy(vector[offset : offset + count].copy()).view_as(parameter))
            offset += count


class SiteRun:
    """This site's side of one approved federated run."""

    def __init__(self, execution: ExecutionContext, plan: FederatedPlan, make_model: ModelBuilder, *,
                 private_fingerprint: str) -> None:
        self.execution = execution
        self.private_fingerprint = private_fingerprint
        self.plan = plan
        self.make_model = make_model
        # keyed by researcher too: a run id is the researcher's choice, and another researcher's plan with the
        # same id must not reach this run's sessions
        relative = Path("runs") / execution.researcher / plan.run_id
        self.directory = execution.data_dir / relative
        self.sessions = site_journal(execution.data_dir, relative / "sessions.jsonl")
        self.ledger = PrivacyLedger(execution.data_dir, plan.dataset, execution.researcher, site=execution.site,
                                    accountant=plan.dp.accountant)
        self.calibrated = CalibratedPlan.from_dict(execution.approval.calibrated)
        self.audit = AuditLog(execution.data_dir)

    def stage(self, stage: str, round_index: int, attempt: int, message: Mapping[str, Any],
              texts: list[str], labels: list[int]) -> dict[str, Any]:
        if stage not in STAGES:
            raise SiteRefusal(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
        self._check_roster_pinned()  # at every stage: a pin the admin removed mid-run stops the run here
        approval = self.execution.approval
        self.audit.record(ExecutionAuthorised(request_id=approval.request_id, code_hash=approval.code_hash,
                                              researcher=self.execution.researcher,
                                              researcher_email=self.execution.researcher_email,
                                              dataset=approval.dataset, round=round_index))
        if stage == "advertise_keys":
            return self._advertise(round_index, attempt)
        state_path = self._state_path(round_index, attempt)
        if not state_path.exists():
            raise SiteRefusal(f"no secure-sum session for round {round_index} attempt {attempt} here: "
                              "start it with advertise_keys")
        state = load_round_state(state_path)
        if stage == "share_keys":
            state, reply = share_keys(state, RoundKeys.from_wire(message.get("round_keys")))
            return self._persist(state_path, state, reply.to_wire())
        if stage == "mask_input":
            return self._mask_input(state_path, state, round_index, attempt, message, texts, labels)
        if stage == "consistency_check":
            state, signature = consistency_check(state, Survivors.from_wire(message.get("survivors")),
                                                 identity_key=load_identity_key(self.execution.data_dir))
            return self._persist(state_path, state, signature.to_wire())
        state, shares = unmask(state, SignedSurvivors.from_wire(message.get("signed")))
        return self._persist(state_path, state, shares.to_wire())

    # ---- stages -------------------------------------------------------------------------------
    def _advertise(self, round_index: int, attempt: int) -> dict[str, Any]:
        """Round 0, with the site's freshness and budget checks before any key is made."""
        self._check_fresh_round(round_index)
        session_id = self.plan.session_id(round_index, attempt)
        if any(entry.record["session_id"] == session_id for entry in self.sessions.entries()):
            raise SiteRefusal(f"session {session_id} was already started here: a replayed round; use a new attempt")
        self._check_budget(round_index)
        self.sessions.append({"session_id": session_id, "round": round_index, "attempt": attempt})
        identity = load_identity_key(self.execution.data_dir)
        state, advert = advertise_keys(self.plan.context(round_index, attempt), site_id=self.execution.site,
                                       identity_key=identity)
        return self._persist(self._state_path(round_index, attempt), state, advert.to_wire())

    def _mask_input(self, state_path: Path, state: SiteRoundState, round_index: int, attempt: int,
                    message: Mapping[str, Any], texts: list[str], labels: list[int]) -> dict[str, Any]:
        """Round 2: DP-SGD on the private partition, ledger spend, then the masked update.

        Everything from the freshness check to the release runs under the round's lock, so of two
        attempts of one round sent at once only the first trains and releases; the second finds the
        round spent (or the lock held) and is refused.
        """
        incoming = IncomingShares.from_wire(message.get("incoming"))
        if incoming.recipient != self.execution.site:
            raise SiteRefusal(f"the forwarded shares are for {incoming.recipient!r}, not this site")
        global_vector = decode_vector(message.get("global_model"), self.plan.secure_sum.vector_length)
        check_incoming_shares(state, incoming)  # before training: bad shares must not cost a round of budget
        with self._round_lock(round_index):
            self._check_fresh_round(round_index)
            started = time.perf_counter()
            model, tokenizer = self.make_model()
            load_trainable(model, global_vector)
            result = local_dp_round(
                model, texts, labels, tokenizer=tokenizer, plan=self.calibrated, ledger=self.ledger,
                private_fingerprint=self.private_fingerprint, run_id=self.plan.run_id, round_index=round_index,
                device=self.execution.device,
            )
            trained = time.perf_counter()
            update = result.flat_delta().cpu().numpy().astype(np.float32)
            state, masked = mask_input(state, incoming, update)
            self._audit_spend_and_release(round_index, result.ledger_record, masked.vector)
            reply = self._persist(state_path, state, masked.to_wire())
            timing_log.info("%s: round %d attempt %d trained in %.2f s, masked in %.2f s", self.execution.site,
                            round_index, attempt, trained - started, time.perf_counter() - trained)
        # The researcher's own cumulative spend here. It depends on the sampling rate, so a little on the
        # partition's size: two decimals are what a researcher needs, and no more is said.
        reply["epsilon_spent"] = round(float(result.ledger_record.epsilon_after), 2) if result.ledger_record else 0.0
        return reply

    @contextmanager
    def _round_lock(self, round_index: int) -> Iterator[None]:
        """Exclusive, across processes, for one (run, round); a second attempt is refused, never queued."""
        private_dirs(self.directory)
        with open(self.directory / f"round-{round_index}.lock", "a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SiteRefusal(f"another attempt of round {round_index} is training here: only one attempt of a "
                                  "round trains and releases") from None
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # ---- checks -------------------------------------------------------------------------------
    def _spent_rounds(self) -> set[int]:
        return {record.round_index for record in self.ledger.records() if record.run_id == self.plan.run_id}

    def _check_fresh_round(self, round_index: int) -> None:
        spent = self._spent_rounds()
        if round_index in spent:
            raise SiteRefusal(f"round {round_index} already ran here: a replayed round is refused")
        if spent and round_index < max(spent):
            raise SiteRefusal(f"round {round_index} is older than round {max(spent)}, which already ran here")

    def _check_roster_pinned(self) -> None:
        pins = PeerPins(self.execution.data_dir, own_name=self.execution.site).load()
        problems = pins.roster_problems(self.plan.roster, self.plan.secure_sum.threshold)
        if problems:
            raise SiteRefusal("; ".join(problems))

    def _check_budget(self, round_index: int) -> None:
        event = self.calibrated.event(run_id=self.plan.run_id, round_index=round_index)
        if not self.ledger.can_spend(event):
            raise SiteRefusal(f"budget exhausted: epsilon would be {self.ledger.epsilon_after(event):.2f} > "
                              f"{self.ledger.budget.epsilon:g}")

    # ---- persistence --------------------------------------------------------------------------
    def _state_path(self, round_index: int, attempt: int) -> Path:
        return self.directory / f"round-{round_index}-attempt-{attempt}.state"

    def _persist(self, path: Path, state: SiteRoundState, wire: dict[str, Any]) -> dict[str, Any]:
        """Save the new state before its message leaves (a crash after this loses nothing)."""
        save_round_state(path, state)
        return {"message": wire}

    def _audit_spend_and_release(self, round_index: int, record: Any, vector: bytes) -> None:
        approval = self.execution.approval
        if record is None:
            raise SiteRefusal("the DP step recorded no privacy spend: nothing is released")
        self.audit.record(PrivacySpent(request_id=approval.request_id, dataset=approval.dataset,
                                       researcher=self.execution.researcher,
                                       epsilon=max(0.0, record.epsilon_after - record.epsilon_before),
                                       delta=record.delta, round=round_index))
        self.audit.record(OutputReleased(request_id=approval.request_id, output_sha256=hashlib.sha256(vector).hexdigest(),
                                         round=round_index))


__all__ = ["STAGES", "SiteRefusal", "decode_vector", "encode_vector", "load_trainable", "run_stage"]
