"""The DP-SGD plan a researcher asks a site to run, validated in full before anything trains.

A ``DPPlan`` names the clip norm, delta, batch size, steps, rounds and either a target epsilon or a
noise multiplier; the site turns it into a ``CalibratedPlan`` at approval (``policies.dp.calibration``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from models.spec import ModelConfigError
from models.tokens import check_tail_tokens
from policies.accounting import (
    AccountingError,
    check_accountant,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
)

# "ghost": Opacus ghost clipping (Li et al., "Large Language Models Can Be Strong Differentially
# Private Learners", ICLR 2022; Bu et al. 2023): per-sample gradient *norms* from activations and
# output gradients, then a second backward pass on the clipped loss, so per-sample gradients of
# embeddings and linear layers are never materialised. "hooks": Opacus's per-sample gradients
# (Goodfellow 2015 trick per layer), materialised and clipped. Both are exact. "hooks" is the
# default: with LoRA + head it ran at 0.94x the non-private throughput (MiniLM, H200, batch 128,
# fp32), ghost at 0.59x; ghost's advantage is memory when every parameter trains (bench/RESULTS.md).
CLIPPING_MODES = ("ghost", "hooks")
DEFAULT_CLIPPING_MODE = "hooks"  # chosen from bench/dp_throughput.py (bench/RESULTS.md, "DP throughput")
OPTIMIZERS = ("adamw", "sgd")
MAX_TOTAL_STEPS = 100_000  # rounds x local_steps; the largest run measured here had 1,057 steps


class DPPlanError(ValueError):
    """A DP plan parameter is out of range or inconsistent with the data; nothing was trained."""


class UnsupportedLayerError(DPPlanError):
    """A trainable layer has no exact per-sample gradient in the chosen clipping mode."""


def _plan_number(name: str, value: object, *, integer: bool = False) -> float:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise DPPlanError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise DPPlanError(f"{name} must be finite, got {value}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class DPPlan:
    """What a researcher asks a site to run, validated in full before anything trains.

    Exactly one of ``target_epsilon`` and ``noise_multiplier`` is given. The site turns a plan into a
    ``CalibratedPlan`` (``calibrate_plan``) at approval time, against its ledger and its data size.
    """

    clip_norm: float  # C: per-sample gradient L2 bound; > 0
    delta: float  # delta of target_epsilon; in (0, 1), and < 1/n_records (checked with the data)
    expected_batch_size: int  # Poisson sampling gives batches of this size on average; 1 <= B <= n_records
    local_steps: int  # noisy optimizer steps per round at the site; >= 1
    rounds: int  # federated rounds of this run; >= 1 (total steps = rounds * local_steps)
    target_epsilon: float | None = None  # epsilon of this whole run (all rounds) at delta; > 0
    noise_multiplier: float | None = None  # sigma, instead of target_epsilon; > 0
    learning_rate: float = 5e-4  # optimizer step size; > 0
    optimizer: str = "adamw"  # "adamw" or "sgd" (post-processing of the noisy gradient either way)
    max_physical_batch_size: int = 128  # memory bound on one forward/backward; >= 1
    max_length: int = 256  # tokens per text after truncation; >= 2
    tail_tokens: int = 0  # of a longer text, keep the last tail_tokens tokens too (see tokenize); [0, max_length-2]
    accountant: str = "prv"  # "prv" (Gopi et al. 2021) or "rdp" (Mironov et al. 2019)
    clipping_mode: str = DEFAULT_CLIPPING_MODE  # "ghost" or "hooks" (see CLIPPING_MODES)
    # noise and Poisson batches from a CSPRNG, summed against floating-point attacks (SecureGaussianNoise);
    # False only for benches and reference runs: torch's generators, and the admin's review flags the plan
    secure_mode: bool = True
    average_last_steps: int = 0  # release the mean of the last k iterates of a round (0: the last one); [0, local_steps]

    def __post_init__(self) -> None:
        clip = _plan_number("clip_norm", self.clip_norm)
        if clip <= 0:
            raise DPPlanError(f"clip_norm must be > 0, got {clip}: pass e.g. clip_norm=1.0")
        try:
            check_delta(self.delta)
            if self.target_epsilon is not None:
                check_epsilon(self.target_epsilon)
            if self.noise_multiplier is not None:
                check_noise_multiplier(self.noise_multiplier)
            check_accountant(self.accountant)
        except AccountingError as exc:
            raise DPPlanError(str(exc)) from exc
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise DPPlanError(
                f"give exactly one of target_epsilon and noise_multiplier, got target_epsilon={self.target_epsilon!r} "
                f"and noise_multiplier={self.noise_multiplier!r}"
            )
        for name, low in (
            ("expected_batch_size", 1),
            ("local_steps", 1),
            ("rounds", 1),
            ("max_physical_batch_size", 1),
            ("max_length", 2),
        ):
            value = _plan_number(name, getattr(self, name), integer=True)
            if value < low:
                raise DPPlanError(f"{name} must be >= {low}, got {value}")
        if self.rounds * self.local_steps > MAX_TOTAL_STEPS:
            # The admin's review composes every step with the accountant (PRV holds arrays per step): a plan of
            # millions of steps would exhaust the reviewing machine before any problem is shown.
            raise DPPlanError(f"rounds x local_steps = {self.rounds * self.local_steps:,} is over {MAX_TOTAL_STEPS:,} "
                              "DP steps: plan fewer rounds or local steps")
        try:
            check_tail_tokens(self.tail_tokens, self.max_length)
        except ModelConfigError as exc:
            raise DPPlanError(str(exc)) from exc
        average = _plan_number("average_last_steps", self.average_last_steps, integer=True)
        if not 0 <= average <= self.local_steps:
            raise DPPlanError(
                f"average_last_steps must be in [0, local_steps] = [0, {self.local_steps}], got {average}: "
                f"0 releases the last iterate, {self.local_steps} the mean of all the round's iterates"
            )
        if _plan_number("learning_rate", self.learning_rate) <= 0:
            raise DPPlanError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise DPPlanError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.clipping_mode not in CLIPPING_MODES:
            raise DPPlanError(f"clipping_mode must be one of {CLIPPING_MODES}, got {self.clipping_mode!r}")
        if not isinstance(self.secure_mode, bool):
            raise DPPlanError(f"secure_mode must be a bool, got {self.secure_mode!r}")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps

    def check_records(self, n_records: int) -> None:
        """Refuse a plan that does not fit a partition of ``n_records`` records."""
        if isinstance(n_records, bool) or not isinstance(n_records, int) or n_records < 1:
            raise DPPlanError(f"n_records must be an int >= 1, got {n_records!r}")
        if self.expected_batch_size > n_records:
            raise DPPlanError(
                f"expected_batch_size={self.expected_batch_size} is larger than the data ({n_records} records): "
                f"choose expected_batch_size <= {n_records}"
            )
        if self.delta >= 1.0 / n_records:
            raise DPPlanError(
                f"delta={self.delta:g} is not below 1/n_records={1.0 / n_records:g} for {n_records} records "
                f"(a larger delta allows releasing a record outright): choose delta <= {0.1 / n_records:.1g}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> DPPlan:
        """Parse a plan from JSON-like data; unknown keys are refused, types are not coerced."""
        if not isinstance(raw, Mapping):
            raise DPPlanError(f"a DP plan must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(DPPlan)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DPPlanError(f"unknown DP plan fields {unknown}: the fields are {sorted(known)}")
        values = dict(raw)
        for name in ("clip_norm", "delta", "target_epsilon", "noise_multiplier", "learning_rate"):
            # JSON writes 1.0 as 1; accept an int for a float field (never a bool).
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        try:
            return DPPlan(**values)
        except TypeError as exc:
            raise DPPlanError(f"incomplete DP plan: {exc}") from exc
