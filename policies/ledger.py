"""The privacy ledger of one (dataset, researcher) pair at one site.

Every release of something computed from private records is recorded here, *before* it leaves the
site, as a frozen ``PrivacyEvent`` together with the epsilon of the whole history after it. The
budget is the admin's, read from ``<data-dir>/budgets.json`` (``BudgetBook``) at each check, so an
admin who lowers it is obeyed at the next spend.

Layout: ``<data-dir>/ledger/<dataset>/<researcher-id>.jsonl``, a ``HashChainedJournal`` (append-only,
fsync'd, each line MAC-chained to the previous one under the site's journal key, with a MACed head
that catches a truncation before the next spend), one line per spend. The researcher is keyed by its
immutable syft user id, never its e-mail (``policies.identity``). A second file
``<researcher>.jsonl.spend-lock`` serialises check-then-append across processes (syft forks a worker
per job), so two concurrent rounds cannot both pass the check against the same history.

Epsilons are never summed: the ledger composes the history ``[(sigma, q, steps), ...]`` with one
Opacus accountant (``policies.accounting.epsilon_of``). ``replay`` recomputes every stored epsilon
from the events alone, which is what an auditor does after a restart.
"""

from __future__ import annotations

import fcntl
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from policies.accounting import (
    HistoryEntry,
    PrivacyEvent,
    check_accountant,
    epsilon_of,
)
from policies.budget import BudgetBook, PrivacyBudget
from policies.durable import private_dirs, site_journal
from policies.identity import check_researcher_id

LEDGER_DIR = "ledger"
# Dataset and researcher names become path components: letters, digits and . _ @ + - only.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
# Replayed epsilons must equal the stored ones up to floating-point noise across machines.
REPLAY_RELATIVE_TOLERANCE = 1e-6


class BudgetExceededError(RuntimeError):
    """A spend would take the (dataset, researcher) pair past the site's privacy budget."""


class LedgerReplayError(RuntimeError):
    """A stored record does not match what its events recompute to."""


def _check_name(parameter: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise ValueError(
            f"{parameter} must be 1-128 characters of letters, digits and . _ @ + - (no '..'), got {value!r}"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class LedgerRecord:
    """One spend as written to the journal: the event, its context, and the epsilon after it."""

    site: str  # the site that spent
    dataset: str
    researcher: str  # the researcher's immutable id (policies.identity)
    accountant: str  # "prv" or "rdp": how epsilon_after was composed
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str
    round_index: int
    delta: float  # the budget's delta at which epsilon_before/after are stated
    epsilon_before: float  # epsilon of the history before this event
    epsilon_after: float  # epsilon of the history including this event (composed, not summed)
    budget_epsilon: float  # the budget in force when it was spent
    recorded_at: str  # UTC, ISO 8601

    def event(self) -> PrivacyEvent:
        return PrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            run_id=self.run_id,
            round_index=self.round_index,
        )

    def history_entry(self) -> HistoryEntry:
        return self.event().history_entry()

    @staticmethod
    def from_record(record: dict[str, Any]) -> LedgerRecord:
        return LedgerRecord(**record)


class PrivacyLedger:
    """Append-only, durable record of the privacy spent by one researcher on one dataset at one site."""

    def __init__(self, data_dir: Path, dataset: str, researcher: str, *, site: str, accountant: str = "prv") -> None:
        self.data_dir = Path(data_dir)
        self.dataset = _check_name("dataset", dataset)
        try:
            self.researcher = check_researcher_id(researcher)
        except ValueError as exc:
            raise ValueError(f"researcher: {exc}") from None
        if not isinstance(site, str) or not site:
            raise ValueError(f"site must be a non-empty str, got {site!r}")
        self.site = site
        self.accountant = check_accountant(accountant)
        relative = Path(LEDGER_DIR) / dataset / f"{researcher}.jsonl"
        self.path = self.data_dir / relative
        self.journal = site_journal(self.data_dir, relative)
        self._spend_lock = self.path.with_name(self.path.name + ".spend-lock")
        self._check_accountant_matches(self.records())

    def _check_accountant_matches(self, records: list[LedgerRecord]) -> None:
        used = {record.accountant for record in records}
        if used - {self.accountant}:
            raise ValueError(
                f"ledger {self.path} was composed with accountant {sorted(used)}, opened with "
                f"accountant={self.accountant!r}: open it with the accountant it was written with"
            )

    @property
    def budget(self) -> PrivacyBudget:
        """The admin's budget for this dataset, read from disk each time (it may have changed)."""
        return BudgetBook(self.data_dir).get(self.dataset)

    def records(self) -> list[LedgerRecord]:
        """Every spend, in order, from the verified journal."""
        return [LedgerRecord.from_record(dict(entry.record)) for entry in self.journal.entries()]

    def history(self) -> list[HistoryEntry]:
        return [record.history_entry() for record in self.records()]

    def spent(self) -> float:
        """Epsilon of everything spent so far, at the budget's delta."""
        return epsilon_of(self.history(), delta=self.budget.delta, accountant=self.accountant)

    def remaining(self) -> float:
        """Budget epsilon minus the composed epsilon spent so far (>= 0 unless the budget was lowered)."""
        return self.budget.epsilon - self.spent()

    def epsilon_after(self, event: PrivacyEvent) -> float:
        """Epsilon of the history composed with ``event``, at the budget's delta."""
        entries = [*self.history(), event.history_entry()]
        return epsilon_of(entries, delta=self.budget.delta, accountant=self.accountant)

    def can_spend(self, event: PrivacyEvent) -> bool:
        return self.epsilon_after(event) <= self.budget.epsilon

    def check_spend(self, event: PrivacyEvent) -> float:
        """Raise BudgetExceededError if ``event`` does not fit; return the epsilon it would reach."""
        budget = self.budget
        history = self.history()
        after = epsilon_of([*history, event.history_entry()], delta=budget.delta, accountant=self.accountant)
        if not after <= budget.epsilon:
            self._refuse(event, after, budget, history)
        return after

    def _refuse(self, event: PrivacyEvent, after: float, budget: PrivacyBudget, history: list[HistoryEntry]) -> None:
        spent = epsilon_of(history, delta=budget.delta, accountant=self.accountant)
        raise BudgetExceededError(
            f"site {self.site!r} refuses to spend for dataset {self.dataset!r} and researcher {self.researcher!r}: "
            f"{event.steps} steps at noise_multiplier={event.noise_multiplier:g}, sample_rate={event.sample_rate:g} "
            f"would reach epsilon={after:.4f} (delta={budget.delta:g}), over the budget epsilon={budget.epsilon:g} "
            f"(already spent {spent:.4f}): plan fewer rounds or steps, more noise, or ask the admin for more budget"
        )

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        private_dirs(self._spend_lock.parent)
        with open(self._spend_lock, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def spend(self, event: PrivacyEvent) -> LedgerRecord:
        """Durably record ``event``; returns only once it is on disk. Refuses an overspend.

        Call it before anything computed with ``event`` leaves the site: a record that ``spend``
        returned survives a crash, so the site can never release more than its ledger shows.
        """
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent, got {type(event).__name__}")
        with self._exclusive():
            budget = self.budget
            records = self.records()
            self._check_accountant_matches(records)
            history = [record.history_entry() for record in records]
            before = epsilon_of(history, delta=budget.delta, accountant=self.accountant)
            after = epsilon_of([*history, event.history_entry()], delta=budget.delta, accountant=self.accountant)
            if not after <= budget.epsilon:
                self._refuse(event, after, budget, history)
            record = LedgerRecord(
                site=self.site,
                dataset=self.dataset,
                researcher=self.researcher,
                accountant=self.accountant,
                noise_multiplier=float(event.noise_multiplier),
                sample_rate=float(event.sample_rate),
                steps=int(event.steps),
                run_id=event.run_id,
                round_index=event.round_index,
                delta=float(budget.delta),
                epsilon_before=before,
                epsilon_after=after,
                budget_epsilon=float(budget.epsilon),
                recorded_at=datetime.now(UTC).isoformat(timespec="microseconds"),
            )
            self.journal.append(asdict(record))
            return record

    def replay(self) -> list[LedgerRecord]:
        """Recompute each record's epsilons from the events before it; raise if any stored figure differs.

        Verifies the hash chain too (``records`` does). Returns the records, so an auditor can print them.
        """
        records = self.records()
        history: list[HistoryEntry] = []
        for number, record in enumerate(records):
            before = epsilon_of(history, delta=record.delta, accountant=record.accountant)
            history.append(record.history_entry())
            after = epsilon_of(history, delta=record.delta, accountant=record.accountant)
            for name, stored, recomputed in (
                ("epsilon_before", record.epsilon_before, before),
                ("epsilon_after", record.epsilon_after, after),
            ):
                if not math.isclose(stored, recomputed, rel_tol=REPLAY_RELATIVE_TOLERANCE, abs_tol=1e-12):
                    raise LedgerReplayError(
                        f"{self.path}: record {number} stores {name}={stored!r} but its events compose to "
                        f"{recomputed!r}: the ledger was altered or written by a different accountant"
                    )
        return records
