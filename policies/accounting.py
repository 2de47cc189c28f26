"""Privacy accounting for DP-SGD: the event a training round spends, its composition, and calibration.

DP-SGD with Poisson sampling at rate ``q`` and Gaussian noise of standard deviation ``sigma * C`` on
the sum of per-sample gradients clipped to norm ``C`` is, per step, the Poisson-subsampled Gaussian
mechanism with noise multiplier ``sigma`` (Abadi et al., "Deep Learning with Differential Privacy",
CCS 2016, Algorithm 1). ``T`` steps compose. We never add up epsilons: every figure here comes from
one Opacus accountant run over the whole history ``[(sigma, q, steps), ...]``:

* ``prv`` (default): numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz,
  "Numerical Composition of Differential Privacy", NeurIPS 2021); Opacus returns the *upper* end of
  its error interval, so the figure is a guarantee, not an estimate.
* ``rdp``: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang, 2019), composed by
  adding RDP curves and converted with Balle et al., AISTATS 2020, Theorem 21.

Both accountants are deterministic, so the calibration at approval time and the ledger at spend
time compute the very same number for the same history; ``merge_history`` makes the history they
see identical too (R rounds of ``(sigma, q, S)`` are one entry ``(sigma, q, R*S)``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANTS = ("prv", "rdp")
# Width of the PRV accountant's error interval on epsilon (Gopi et al. 2021, Section 5); Opacus
# reports the upper end, so this only costs a little tightness, never correctness.
PRV_EPS_ERROR = 0.01
# The largest noise multiplier calibration will propose before declaring the budget unreachable.
MAX_NOISE_MULTIPLIER = 1e4

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus's layout


class AccountingError(ValueError):
    """A privacy parameter is out of range, or a target cannot be met."""


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AccountingError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise AccountingError(f"{name} must be finite, got {value}")
    return float(value)


def check_noise_multiplier(value: object) -> float:
    sigma = _check_number("noise_multiplier", value)
    if sigma <= 0:
        raise AccountingError(f"noise_multiplier must be > 0, got {sigma}: pass e.g. noise_multiplier=1.0")
    return sigma


def check_sample_rate(value: object) -> float:
    q = _check_number("sample_rate", value)
    if not 0 < q <= 1:
        raise AccountingError(f"sample_rate must be in (0, 1], got {q}: it is expected_batch_size / n_records")
    return q


def check_steps(value: object, name: str = "steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AccountingError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise AccountingError(f"{name} must be >= 1, got {value}")
    return value


def check_delta(value: object) -> float:
    delta = _check_number("delta", value)
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}: pass e.g. delta=1e-5")
    return delta


def check_epsilon(value: object, name: str = "target_epsilon") -> float:
    epsilon = _check_number(name, value)
    if epsilon <= 0:
        raise AccountingError(f"{name} must be > 0, got {epsilon}: pass e.g. {name}=8")
    return epsilon


def check_accountant(value: object) -> str:
    if value not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {ACCOUNTANTS}, got {value!r}")
    return str(value)


@dataclass(frozen=True, kw_only=True)
class PrivacyEvent:
    """What one release costs: ``steps`` noisy DP-SGD steps at (noise_multiplier, sample_rate).

    Frozen: once a site has trained with these parameters, the event is a fact to be recorded, not
    something to adjust. ``run_id`` and ``round_index`` only label the event for the audit trail.
    """

    noise_multiplier: float  # sigma: noise std divided by the clip norm C; > 0
    sample_rate: float  # q: Poisson inclusion probability of each record per step; in (0, 1]
    steps: int  # number of noisy optimizer steps at (sigma, q); >= 1
    run_id: str = ""  # which approved run spent it (free text, for the audit trail)
    round_index: int = 0  # which federated round of that run; >= 0

    def __post_init__(self) -> None:
        check_noise_multiplier(self.noise_multiplier)
        check_sample_rate(self.sample_rate)
        check_steps(self.steps)
        if not isinstance(self.run_id, str):
            raise AccountingError(f"run_id must be a str, got {self.run_id!r}")
        if isinstance(self.round_index, bool) or not isinstance(self.round_index, int) or self.round_index < 0:
            raise AccountingError(f"round_index must be an int >= 0, got {self.round_index!r}")

    def history_entry(self) -> HistoryEntry:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


def merge_history(entries: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """Sum the steps of entries with the same (sigma, q), keeping first-occurrence order.

    Composition is commutative and associative, so this changes nothing mathematically; it makes the
    accountant's input, hence its floating-point result, independent of how rounds were split.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, count in entries:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(count)
    return [(sigma, q, count) for (sigma, q), count in steps.items()]


def epsilon_of(entries: Iterable[HistoryEntry], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of all ``entries`` (0.0 for an empty history)."""
    check_delta(delta)
    check_accountant(accountant)
    history = merge_history(entries)
    for sigma, q, count in history:
        check_noise_multiplier(sigma)
        check_sample_rate(q)
        check_steps(count)
    if not history:
        return 0.0
    return _composed_epsilon(tuple(history), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    """The accountant's answer, memoised: a PRV evaluation costs ~1 s on a CPU, and a site asks the
    same question several times per round (budget check, spend) and per review (calibration)."""
    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = list(history)
        return float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    rdp = RDPAccountant()
    rdp.history = list(history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is still valid, only less tight.
        warnings.simplefilter("ignore", UserWarning)
        return float(rdp.get_epsilon(delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: Sequence[HistoryEntry] = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) whose run keeps the total within target.

    Finds sigma such that ``epsilon_of(prior + [(sigma, sample_rate, steps)]) <= target_epsilon``:
    the run is composed with what was already spent (``prior``), not budgeted by subtraction. Bisection
    as in Opacus's ``get_noise_multiplier``; epsilon decreases monotonically in sigma. The returned
    sigma is the upper end of the bracket, so its epsilon is <= target (never above).
    """
    check_epsilon(target_epsilon)
    check_delta(delta)
    check_sample_rate(sample_rate)
    check_steps(steps)
    check_accountant(accountant)
    spent = epsilon_of(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise AccountingError(
            f"epsilon already spent ({spent:.4f}) reaches target_epsilon={target_epsilon:g}: no noise level can fit "
            "another run"
        )

    def total(sigma: float) -> float:
        return epsilon_of([*prior, (sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    low, high = 0.0, 1.0
    eps_high = total(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise AccountingError(
                f"target_epsilon={target_epsilon:g} at delta={delta:g} needs noise_multiplier > {MAX_NOISE_MULTIPLIER:g} "
                f"for {steps} steps at sample_rate={sample_rate:g}: plan fewer steps or a smaller batch"
            )
        eps_high = total(high)
    # Invariant: total(high) <= target_epsilon < total(low) (or low == 0, which means no noise).
    while target_epsilon - eps_high > tolerance and high - low > 1e-6 * high:
        middle = (low + high) / 2
        eps_middle = total(middle)
        if eps_middle <= target_epsilon:
            high, eps_high = middle, eps_middle
        else:
            low = middle
    return high
