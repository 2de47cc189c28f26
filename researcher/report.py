"""What a federated run did, round by round: accuracy, loss, privacy spent, who took part, where time went.

``RoundRecord`` is a frozen value; ``RunReport`` only appends them, in increasing round order, so a
report reloaded after a crash (``load_json``) continues where the saved one stopped. ``save_json``
replaces the file atomically; ``plot_png`` draws accuracy and each site's cumulative epsilon against
the round, with matplotlib's Agg canvas (no display, no pyplot global state). Nothing here prints.
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


class RunReport:
    """The append-only list of a run's round records."""

    def __init__(self, *, run_id: str) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise RunReportError(f"run_id must be a non-empty string, got {run_id!r}")
        self.run_id = run_id
        self._rounds: list[RoundRecord] = []

    @property
    def rounds(self) -> tuple[RoundRecord, ...]:
        return tuple(self._rounds)

    def append_round(self, record: RoundRecord) -> None:
        """Record a completed round; round indices strictly increase (a gap is a round lost to a crash)."""
        if not isinstance(record, RoundRecord):
            raise RunReportError(f"append_round takes a RoundRecord, got {type(record).__name__}")
        if self._rounds and record.round_index <= self._rounds[-1].round_index:
            raise RunReportError(
                f"round {record.round_index} comes after round {self._rounds[-1].round_index}: "
                "each round is recorded once, in order"
            )
        self._rounds.append(record)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "run_id": self.run_id, "rounds": [r.to_dict() for r in self._rounds]}

    def save_json(self, path: Path) -> None:
        """Replace ``path`` with this report, all or nothing."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load_json(cls, path: Path) -> RunReport:
        """A report saved by ``save_json``, every record re-checked."""
        raw = read_json(Path(path))
        if not isinstance(raw, dict) or raw.get("format") != REPORT_FORMAT or not isinstance(raw.get("rounds"), list):
            raise RunReportError(f"{path} is not a {REPORT_FORMAT} document")
        report = cls(run_id=raw.get("run_id"))  # type: ignore[arg-type]  # checked by the constructor
        for entry in raw["rounds"]:
            report.append_round(RoundRecord.from_dict(entry))
        return report

    def plot_png(self, path: Path) -> None:
        """Two panels against the round: accuracy, and each site's cumulative epsilon."""
        if not self._rounds:
            raise RunReportError("the report has no rounds to plot: append_round first")
        figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        accuracy_axes = figure.add_subplot(1, 2, 1)
        epsilon_axes = figure.add_subplot(1, 2, 2)
        rounds = [r.round_index for r in self._rounds]
        accuracy_axes.plot(rounds, [r.accuracy for r in self._rounds], marker="o", label="global model")
        before = [(r.round_index, r.uncalibrated_accuracy) for r in self._rounds if r.uncalibrated_accuracy is not None]
        if before:
            accuracy_axes.plot([x for x, _ in before], [y for _, y in before], marker="x", linestyle="--",
                               label="before the bias calibration")
            accuracy_axes.legend()
        accuracy_axes.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")
        accuracy_axes.grid(alpha=0.3)
        sites = sorted({site for r in self._rounds for site in r.epsilon_spent})
        for site in sites:
            points = [(r.round_index, r.epsilon_spent[site]) for r in self._rounds if site in r.epsilon_spent]
            epsilon_axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=site)
        epsilon_axes.set(xlabel="round", ylabel="epsilon spent (cumulative)", title="Privacy spent per site")
        epsilon_axes.grid(alpha=0.3)
        if sites:
            epsilon_axes.legend()
        for axes in (accuracy_axes, epsilon_axes):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        write_bytes_atomic(Path(path), buffer.getvalue())
