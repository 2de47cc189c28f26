"""The federated training loop: rounds, FedAvg, evaluation, checkpoints, report; resumable.

Each round is one secure-sum session over the sites (``researcher.federation``). After it the
global model moves by the average of the participants' clipped DP updates (FedAvg, McMahan et al.
2017, with the uniform weights that a secure sum allows), is evaluated on the public IMDB test
subset, and is checkpointed (safetensors) with the JSON report and its plot. Everything needed to
resume is in ``run_dir``: if the researcher's process dies, ``FederatedTrainer(...).run()`` continues
after the last checkpointed round, with a fresh secure-sum attempt number so that no site sees a
session id twice.

A round lost after a release (``researcher.lost_rounds``) is recorded in the report and skipped: the
global model stays as the last checkpoint has it, so no checkpoint is written for it, and a resume
goes on after the latest round the checkpoints or the report's lost rounds name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import build_from_spec
from policies.durable import read_json, write_json_atomic
from policies.federated_plan import FederatedPlan
from researcher.calibration import (
    CalibrationError,
    check_calibratable,
    check_positive_share,
    evaluate_and_calibrate,
)
from researcher.checkpoints import load_latest, restore_into, save_checkpoint
from researcher.evaluation import load_test_subset
from researcher.fedavg import apply_flat_delta, flatten_trainable
from researcher.federation import RoundOutcome, SiteHandle, SiteRefusedError, run_round
from researcher.lost_rounds import RoundLostError, lost_by_refusal
from researcher.report import LostRound, RoundRecord, RunReport

logger = logging.getLogger("fedsite.researcher")

ATTEMPTS_FILE = "attempts.json"
REPORT_FILE = "report.json"
PLOT_FILE = "report.png"
PLAN_FILE = "plan.json"


@dataclass(frozen=True, kw_only=True)
class TrainerSettings:
    """How the researcher runs the loop (nothing here reaches a site's privacy)."""

    run_dir: Path  # checkpoints, report, plot, plan, attempt counter
    imdb_source: str  # a folder with test.parquet: the public evaluation data
    test_size: int = 500  # reviews of the test split to evaluate on after every round
    test_seed: int = 0  # which reviews
    eval_batch_size: int = 64
    server_lr: float = 1.0  # FedAvg server step size (1.0 = plain average)
    attempts_per_round: int = 3  # secure-sum sessions to try before giving up on a round (only before any release)
    progress: bool = True  # a tqdm bar over rounds
    # Public, unlabelled texts of the population the model is for: after each round the classifier's
    # bias is shifted so that positive_share of them are predicted label 1 (researcher.calibration).
    # Empty: no calibration. Texts that are among the evaluated reviews are left out of it.
    calibration_texts: tuple[str, ...] = ()
    positive_share: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.calibration_texts, str) or not all(
            isinstance(text, str) and text for text in self.calibration_texts
        ):
            raise CalibrationError("calibration_texts must be a sequence of non-empty strings (public, unlabelled texts)")
        object.__setattr__(self, "calibration_texts", tuple(self.calibration_texts))
        check_positive_share(self.positive_share)


class FederatedTrainer:
    """Drives an approved plan over ``sites`` to the end, resuming from ``run_dir``."""

    def __init__(self, sites: Sequence[SiteHandle], plan: Mapping[str, Any], settings: TrainerSettings) -> None:
        self.sites = list(sites)
        self.plan = FederatedPlan.parse(plan)
        self.settings = settings
        self.run_dir = Path(settings.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_same_plan(plan)
        self.model, self.tokenizer = build_from_spec(plan["model"])
        _, self.layout = flatten_trainable(self.model)
        test = load_test_subset(settings.imdb_source, settings.test_size, settings.test_seed)
        self.test_texts, self.test_labels = test["text"].tolist(), test["label"].tolist()
        evaluated = set(self.test_texts)
        self.calibration_texts = [text for text in settings.calibration_texts if text not in evaluated]
        if settings.calibration_texts and not self.calibration_texts:
            raise CalibrationError("every calibration text is one of the evaluated test reviews: pass other public texts")
        if self.calibration_texts:
            check_calibratable(self.model)
        self.report = RunReport(run_id=self.plan.run_id)
        self.next_round = 0
        self._resume()

    def _check_same_plan(self, plan: Mapping[str, Any]) -> None:
        path = self.run_dir / PLAN_FILE
        if path.exists() and read_json(path) != dict(plan):
            raise ValueError(f"{self.run_dir} holds another run's plan: use a new run_dir for a new plan")
        write_json_atomic(path, dict(plan))

    def _resume(self) -> None:
        checkpoint = load_latest(self.run_dir)
        if checkpoint is not None:
            restore_into(self.model, checkpoint)
            self.next_round = checkpoint.round_index + 1
        if (self.run_dir / REPORT_FILE).exists():
            self.report = RunReport.load_json(self.run_dir / REPORT_FILE)
            # a lost round leaves the model as it was, so no checkpoint marks it: the report does
            lost = [r.round_index + 1 for r in self.report.lost_rounds]
            self.next_round = max([self.next_round, *lost])

    def _claim_attempts(self, round_index: int) -> int:
        """The first attempt number for this round, persisted before use so a restart never reuses one."""
        path = self.run_dir / ATTEMPTS_FILE
        claimed = dict(read_json(path)) if path.exists() else {}
        first = int(claimed.get(str(round_index), 0))
        claimed[str(round_index)] = first + self.settings.attempts_per_round
        write_json_atomic(path, claimed)
        return first

    def run(self) -> RunReport:
        rounds = range(self.next_round, self.plan.dp.rounds)
        if self.settings.progress:
            from tqdm.auto import tqdm

            iterator: Any = tqdm(rounds, desc=f"{self.plan.run_id}", unit="round", initial=self.next_round,
                                 total=self.plan.dp.rounds)
        else:
            iterator = rounds
        for round_index in iterator:
            record = self.run_one_round(round_index)
            if self.settings.progress:
                iterator.set_postfix(self._postfix(record))
                if isinstance(record, LostRound):
                    iterator.write(record.summary())
        return self.report

    def _postfix(self, record: RoundRecord | LostRound) -> dict[str, str]:
        """What the progress bar shows after a round: accuracy, epsilon, dropped sites, lost rounds."""
        shown = {"accuracy": f"{record.accuracy:.3f}"} if isinstance(record, RoundRecord) else {}
        shown["epsilon"] = f"{max(record.epsilon_spent.values(), default=0.0):.2f}"
        if isinstance(record, RoundRecord) and record.dropped:
            shown["dropped"] = ",".join(record.dropped)
        if self.report.lost_rounds:
            shown["lost"] = ",".join(str(lost.round_index) for lost in self.report.lost_rounds)
        return shown

    def _secure_sum(self, round_index: int) -> RoundOutcome | LostRound:
        """The round's secure sum over the sites, or the record of its loss after a release."""
        vector, _ = flatten_trainable(self.model)
        first_attempt = self._claim_attempts(round_index)
        try:
            return run_round(self.sites, self.plan, round_index, vector.astype(np.float32),
                             max_attempts=self.settings.attempts_per_round, first_attempt=first_attempt)
        except RoundLostError as lost:
            return lost.record
        except SiteRefusedError as refused:
            revealed = lost_by_refusal(str(refused), round_index, first_attempt)
            if revealed is None:
                raise  # a site's policy says no, before any release: the run stops with its reason
            return revealed

    def run_one_round(self, round_index: int) -> RoundRecord | LostRound:
        """Run one round and record it: completed (model updated, checkpointed) or lost (model unchanged)."""
        outcome = self._secure_sum(round_index)
        if isinstance(outcome, LostRound):
            return self._record_lost(outcome)
        apply_flat_delta(self.model, self.layout, outcome.average.astype(np.float32), scale=self.settings.server_lr)
        started = time.perf_counter()
        dp = self.plan.dp
        scored = evaluate_and_calibrate(self.model, self.tokenizer, self.test_texts, self.test_labels,
                                        self.calibration_texts, positive_share=self.settings.positive_share,
                                        max_length=dp.max_length, tail_tokens=dp.tail_tokens,
                                        batch_size=self.settings.eval_batch_size)
        evaluation = scored.evaluation
        seconds = {**outcome.times, "evaluation": round(time.perf_counter() - started, 3)}
        record = RoundRecord(round_index=round_index, accuracy=evaluation.accuracy, mean_loss=evaluation.mean_loss,
                             epsilon_spent=dict(outcome.epsilon_spent), participants=outcome.participants,
                             dropped=outcome.dropped, seconds=seconds,
                             uncalibrated_accuracy=scored.uncalibrated_accuracy, calibration_shift=scored.shift,
                             drop_reasons=outcome.drop_reasons)
        for name, why in record.drop_reasons.items():
            logger.warning("round %d finished without %s, which dropped at %s", round_index, name, why)
        save_checkpoint(self.run_dir, round_index=round_index, model=self.model, layout=self.layout,
                        meta={"run_id": self.plan.run_id, "accuracy": evaluation.accuracy})
        self.report.append_round(record)
        self.report.save_json(self.run_dir / REPORT_FILE)
        self.report.plot_png(self.run_dir / PLOT_FILE)
        self.next_round = round_index + 1
        return record

    def _record_lost(self, record: LostRound) -> LostRound:
        """Report a lost round (JSON and plot) and go on after it; the model and its checkpoint stay as they are."""
        logger.warning("%s", record.summary())
        self.report.append_lost(record)
        self.report.save_json(self.run_dir / REPORT_FILE)
        self.report.plot_png(self.run_dir / PLOT_FILE)
        self.next_round = record.round_index + 1
        return record
