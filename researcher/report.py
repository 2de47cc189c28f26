"""What a federated run did, round by round: accuracy, loss, privacy spent, who took part, where time went.

``RoundRecord`` (a completed round) and ``LostRound`` (a round that could not finish after some site
had released its masked input, so it could never be retried: which sites spent, where it failed and
why) are frozen values; ``RunReport`` only appends them, in increasing round order and each round once,
so a report reloaded after a crash (``load_json``) continues where the saved one stopped. ``save_json``
replaces the file atomically; ``plot_png`` draws accuracy and each site's cumulative epsilon against
the round, lost rounds marked, with matplotlib's Agg canvas (no display, no pyplot global state).
Nothing here prints.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from policies.durable import read_json, write_bytes_atomic, write_json_atomic

REPORT_FORMAT = "fedsite-run-report-v1"
# The stages of one round whose wall time a RoundRecord usually carries (DESIGN.md, "One round").
TIME_KEYS = ("dispatch", "transfer", "training", "masking", "unmasking", "evaluation")


class RunReportError(ValueError):
    """A round record or a saved report is invalid."""


def _number(name: str, value: object, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high or math.isinf(value):
        raise RunReportError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def _site_names(name: str, sites: Iterable[object]) -> tuple[str, ...]:
    if isinstance(sites, str):
        raise RunReportError(f"{name} must be a list of site names, got the string {sites!r}")
    names: list[str] = []
    for site in sites:
        if not isinstance(site, str) or not site:
            raise RunReportError(f"{name} holds {site!r}: site names are non-empty strings")
        names.append(site)
    if len(set(names)) != len(names):
        raise RunReportError(f"{name} names a site more than once: {names}")
    return tuple(names)


def _number_map(name: str, values: object) -> Mapping[str, float]:
    if not isinstance(values, Mapping):
        raise RunReportError(f"{name} must be a mapping of name -> number, got {type(values).__name__}")
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise RunReportError(f"{name} has key {key!r}: keys are non-empty strings")
        checked[key] = _number(f"{name}[{key!r}]", value)
    return MappingProxyType(checked)


def _drop_reasons(values: Any, dropped: tuple[str, ...]) -> Mapping[str, str]:
    if not isinstance(values, Mapping):
        raise RunReportError(f"drop_reasons must be a mapping of dropped site -> reason, got {type(values).__name__}")
    strangers = sorted(str(name) for name in values if name not in dropped)
    if strangers:
        raise RunReportError(f"drop_reasons names {strangers}, which did not drop out (dropped: {list(dropped)})")
    for name, reason in values.items():
        if not isinstance(reason, str) or not reason:
            raise RunReportError(f"drop_reasons[{name!r}] must be a non-empty string, got {reason!r}")
    return MappingProxyType(dict(values))


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """One completed round, as the researcher saw it."""

    round_index: int  # 0-based round of the run
    accuracy: float  # global model's accuracy on the public test subset after this round, in [0, 1]
    mean_loss: float  # its mean cross-entropy on the same subset (nats), >= 0
    epsilon_spent: Mapping[str, float]  # site -> cumulative epsilon spent after this round (the run's delta)
    participants: tuple[str, ...]  # sites whose masked update entered the secure sum (>= 1)
    dropped: tuple[str, ...]  # roster sites whose update did not (timeout, refusal, crash)
    seconds: Mapping[str, float]  # stage (TIME_KEYS, or others) -> wall seconds, >= 0
    # With the trainer's prior calibration (researcher.calibration), accuracy is the calibrated model's;
    # these are the accuracy before it and the logit-margin shift it applied. None without calibration.
    uncalibrated_accuracy: float | None = None
    calibration_shift: float | None = None
    # dropped site -> why it left the round, as the researcher saw it (researcher.federation.describe_site_failure)
    drop_reasons: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.round_index, bool) or not isinstance(self.round_index, int) or self.round_index < 0:
            raise RunReportError(f"round_index must be an int >= 0, got {self.round_index!r}")
        _number("accuracy", self.accuracy, high=1.0)
        _number("mean_loss", self.mean_loss)
        participants = _site_names("participants", self.participants)
        dropped = _site_names("dropped", self.dropped)
        if not participants:
            raise RunReportError("participants is empty: a round without participants updates nothing")
        both = sorted(set(participants) & set(dropped))
        if both:
            raise RunReportError(f"sites {both} are both participants and dropped")
        object.__setattr__(self, "participants", participants)
        object.__setattr__(self, "dropped", dropped)
        object.__setattr__(self, "drop_reasons", _drop_reasons(self.drop_reasons, dropped))
        object.__setattr__(self, "epsilon_spent", _number_map("epsilon_spent", self.epsilon_spent))
        object.__setattr__(self, "seconds", _number_map("seconds", self.seconds))
        if (self.uncalibrated_accuracy is None) != (self.calibration_shift is None):
            raise RunReportError("uncalibrated_accuracy and calibration_shift come together: give both or neither")
        if self.uncalibrated_accuracy is not None:
            _number("uncalibrated_accuracy", self.uncalibrated_accuracy, high=1.0)
            _number("calibration_shift", self.calibration_shift, low=-math.inf)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_index": self.round_index,
            "accuracy": self.accuracy,
            "mean_loss": self.mean_loss,
            "epsilon_spent": dict(self.epsilon_spent),
            "participants": list(self.participants),
            "dropped": list(self.dropped),
            "seconds": dict(self.seconds),
            "uncalibrated_accuracy": self.uncalibrated_accuracy,
            "calibration_shift": self.calibration_shift,
            "drop_reasons": dict(self.drop_reasons),
        }

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> RoundRecord:
        fields = ("round_index", "accuracy", "mean_loss", "epsilon_spent", "participants", "dropped", "seconds")
        # absent from reports written before calibration, and before drop reasons were kept
        optional = ("uncalibrated_accuracy", "calibration_shift", "drop_reasons")
        if not isinstance(raw, Mapping) or not set(fields) <= set(raw) <= set(fields + optional):
            keys = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
            raise RunReportError(f"a round record needs the keys {list(fields)} (and may have {list(optional)}), got {keys}")
        return RoundRecord(**{name: raw[name] for name in fields + optional if name in raw})


def _reasons(name: str, values: Any) -> Mapping[str, str]:
    if not isinstance(values, Mapping) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                  for k, v in values.items()):
        raise RunReportError(f"{name} must be a mapping of site -> non-empty reason, got {values!r}")
    return MappingProxyType(dict(values))


@dataclass(frozen=True, kw_only=True)
class LostRound:
    """A round that could not finish after some site had released its masked input for it.

    A site that released a round has spent privacy on it and refuses any second session of it
    (``policies.site_runtime``), so the round is never retried: the global model stays as it was and
    the run goes on with the next round. The spend is real: the released sites' ledgers hold it.
    """

    round_index: int  # 0-based round of the run
    attempt: int  # the secure-sum session (attempt) that was lost
    stage: str  # the secure-sum stage at which it could not go on (e.g. consistency_check)
    reason: str  # why, as the researcher saw it (too few answers, or a site's refusal)
    released: tuple[str, ...]  # sites known to have released their masked input for this round (>= 1): they spent
    # released site -> its cumulative epsilon after this round, as it reported; a site missing here said it
    # had run the round (a refusal of a new session) without saying how much: its ledger knows
    epsilon_spent: Mapping[str, float] = field(default_factory=dict)
    unconfirmed: tuple[str, ...] = ()  # sites sent the masked-input stage that never answered: may have spent
    drop_reasons: Mapping[str, str] = field(default_factory=dict)  # site -> why it stopped answering
    seconds: Mapping[str, float] = field(default_factory=dict)  # stage -> wall seconds, >= 0

    def __post_init__(self) -> None:
        for name in ("round_index", "attempt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RunReportError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("stage", "reason"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RunReportError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        released = _site_names("released", self.released)
        unconfirmed = _site_names("unconfirmed", self.unconfirmed)
        if not released:
            raise RunReportError("released is empty: a round no site released is retried, not lost")
        if set(released) & set(unconfirmed):
            raise RunReportError(f"sites {sorted(set(released) & set(unconfirmed))} are both released and unconfirmed")
        epsilon = _number_map("epsilon_spent", self.epsilon_spent)
        if not set(epsilon) <= set(released):
            raise RunReportError(f"epsilon_spent names {sorted(set(epsilon) - set(released))}, which did not release")
        object.__setattr__(self, "released", released)
        object.__setattr__(self, "unconfirmed", unconfirmed)
        object.__setattr__(self, "epsilon_spent", epsilon)
        object.__setattr__(self, "drop_reasons", _reasons("drop_reasons", self.drop_reasons))
        object.__setattr__(self, "seconds", _number_map("seconds", self.seconds))

    def summary(self) -> str:
        """One line for a progress bar or a status view."""
        spent = ", ".join(f"{site} (epsilon {self.epsilon_spent[site]:.2f})" if site in self.epsilon_spent
                          else f"{site} (not reported: see its ledger)" for site in self.released)
        maybe = f"; may have spent: {', '.join(self.unconfirmed)}" if self.unconfirmed else ""
        return f"round {self.round_index} lost at {self.stage}: {self.reason}; spent by {spent}{maybe}"

    def to_dict(self) -> dict[str, Any]:
        return {"round_index": self.round_index, "attempt": self.attempt, "stage": self.stage, "reason": self.reason,
                "released": list(self.released), "epsilon_spent": dict(self.epsilon_spent),
                "unconfirmed": list(self.unconfirmed), "drop_reasons": dict(self.drop_reasons),
                "seconds": dict(self.seconds)}

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> LostRound:
        keys = ("round_index", "attempt", "stage", "reason", "released", "epsilon_spent", "unconfirmed",
                "drop_reasons", "seconds")
        if not isinstance(raw, Mapping) or set(raw) != set(keys):
            got = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
            raise RunReportError(f"a lost round record needs exactly the keys {list(keys)}, got {got}")
        return LostRound(**{name: raw[name] for name in keys})


class RunReport:
    """The append-only list of a run's round records: completed rounds and lost ones."""

    def __init__(self, *, run_id: str) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise RunReportError(f"run_id must be a non-empty string, got {run_id!r}")
        self.run_id = run_id
        self._rounds: list[RoundRecord] = []
        self._lost: list[LostRound] = []

    @property
    def rounds(self) -> tuple[RoundRecord, ...]:
        """The completed rounds, whose updates the global model holds."""
        return tuple(self._rounds)

    @property
    def lost_rounds(self) -> tuple[LostRound, ...]:
        """The rounds lost after a release: never applied, never retried; who spent on them and why."""
        return tuple(self._lost)

    @property
    def last_round_index(self) -> int | None:
        """The latest round recorded, completed or lost (None before the first): a run goes on after it."""
        indices = [r.round_index for r in self._rounds[-1:]] + [r.round_index for r in self._lost[-1:]]
        return max(indices, default=None)

    def _check_next(self, round_index: int) -> None:
        last = self.last_round_index
        if last is not None and round_index <= last:
            raise RunReportError(f"round {round_index} comes after round {last}: each round is recorded once, "
                                 "completed or lost, in order")

    def append_round(self, record: RoundRecord) -> None:
        """Record a completed round; round indices strictly increase (a gap is a round lost to a crash)."""
        if not isinstance(record, RoundRecord):
            raise RunReportError(f"append_round takes a RoundRecord, got {type(record).__name__}")
        self._check_next(record.round_index)
        self._rounds.append(record)

    def append_lost(self, record: LostRound) -> None:
        """Record a lost round; it takes its place in the one order of round indices."""
        if not isinstance(record, LostRound):
            raise RunReportError(f"append_lost takes a LostRound, got {type(record).__name__}")
        self._check_next(record.round_index)
        self._lost.append(record)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "run_id": self.run_id, "rounds": [r.to_dict() for r in self._rounds],
                "lost_rounds": [r.to_dict() for r in self._lost]}

    def save_json(self, path: Path) -> None:
        """Replace ``path`` with this report, all or nothing."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load_json(cls, path: Path) -> RunReport:
        """A report saved by ``save_json``, every record re-checked."""
        raw = read_json(Path(path))
        if not isinstance(raw, dict) or raw.get("format") != REPORT_FORMAT or not isinstance(raw.get("rounds"), list):
            raise RunReportError(f"{path} is not a {REPORT_FORMAT} document")
        lost = raw.get("lost_rounds", [])  # absent from reports written before lost rounds were recorded
        if not isinstance(lost, list):
            raise RunReportError(f"{path}: lost_rounds must be a list, got {type(lost).__name__}")
        report = cls(run_id=raw.get("run_id"))  # type: ignore[arg-type]  # checked by the constructor
        records: list[RoundRecord | LostRound] = [RoundRecord.from_dict(entry) for entry in raw["rounds"]]
        records += [LostRound.from_dict(entry) for entry in lost]
        for record in sorted(records, key=lambda r: r.round_index):
            if isinstance(record, LostRound):
                report.append_lost(record)
            else:
                report.append_round(record)
        return report

    def plot_png(self, path: Path) -> None:
        """Two panels against the round: accuracy, and each site's cumulative epsilon; lost rounds marked."""
        if not self._rounds and not self._lost:
            raise RunReportError("the report has no rounds to plot: append_round or append_lost first")
        figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        accuracy_axes = figure.add_subplot(1, 2, 1)
        epsilon_axes = figure.add_subplot(1, 2, 2)
        self._plot_accuracy(accuracy_axes)
        self._plot_epsilon(epsilon_axes)
        for axes in (accuracy_axes, epsilon_axes):
            for number, lost in enumerate(self._lost):  # never applied to the model, but paid for
                axes.axvline(lost.round_index, color="tab:red", linestyle=":", label="lost round" if number == 0 else None)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        write_bytes_atomic(Path(path), buffer.getvalue())

    def _plot_accuracy(self, axes: Any) -> None:
        axes.plot([r.round_index for r in self._rounds], [r.accuracy for r in self._rounds], marker="o",
                  label="global model")
        before = [(r.round_index, r.uncalibrated_accuracy) for r in self._rounds if r.uncalibrated_accuracy is not None]
        if before:
            axes.plot([x for x, _ in before], [y for _, y in before], marker="x", linestyle="--",
                      label="before the bias calibration")
        axes.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")

    def _plot_epsilon(self, axes: Any) -> None:
        spends: list[RoundRecord | LostRound] = sorted([*self._rounds, *self._lost], key=lambda r: r.round_index)
        # (lost rounds were paid for too)
        for site in sorted({site for r in spends for site in r.epsilon_spent}):
            points = [(r.round_index, r.epsilon_spent[site]) for r in spends if site in r.epsilon_spent]
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=site)
        axes.set(xlabel="round", ylabel="epsilon spent (cumulative)", title="Privacy spent per site")
