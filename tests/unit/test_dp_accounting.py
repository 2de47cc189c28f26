"""Epsilon against published figures and against independent accountants written here from the papers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.special import gammaln
from scipy.stats import norm

from policies.accounting import (
    PRV_EPS_ERROR,
    AccountingError,
    PrivacyEvent,
    calibrate_noise_multiplier,
    epsilon_of,
    merge_history,
)

pytestmark = pytest.mark.unit


# ---- independent RDP accountant ---------------------------------------------------------------
# Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism" (2019), Sec. 3.3:
# for mu0 = N(0, s^2), mu1 = N(1, s^2), mu = (1-q) mu0 + q mu1, the RDP of order a is
# log(A_a) / (a-1) with A_a = E_{z~mu0}[(mu(z)/mu0(z))^a]; mu1/mu0 (z) = exp((2z-1)/(2 s^2)).


def _log_a_integer(q: float, sigma: float, order: int) -> float:
    """Binomial expansion of A_a for integer a (Mironov et al. 2019, Sec. 3.3, eq. for integer alpha)."""
    k = np.arange(order + 1)
    log_terms = (
        gammaln(order + 1) - gammaln(k + 1) - gammaln(order - k + 1)
        + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    )
    peak = log_terms.max()
    return float(peak + math.log(np.exp(log_terms - peak).sum()))


def _log_a_numeric(q: float, sigma: float, order: float) -> float:
    """A_a - 1 by quadrature of E_{mu0}[((1-q) + q ratio)^a - 1], for any real a > 1."""

    def integrand(z: float) -> float:
        ratio = math.exp((2 * z - 1) / (2 * sigma**2))
        return norm.pdf(z, scale=sigma) * math.expm1(order * math.log1p(q * (ratio - 1)))

    value, _ = integrate.quad(integrand, -60 * sigma, 60 * sigma, points=[0.5], epsabs=1e-18, epsrel=1e-12, limit=400)
    return math.log1p(value)


def reference_rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Compose T steps in RDP, convert with Balle et al. (AISTATS 2020), Theorem 21."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    best = math.inf
    for order in orders:
        log_a = _log_a_integer(q, sigma, order) if float(order).is_integer() else _log_a_numeric(q, sigma, order)
        rdp = steps * log_a / (order - 1)
        eps = rdp + math.log((order - 1) / order) - (math.log(delta) + math.log(order)) / (order - 1)
        best = min(best, eps)
    return best


# ---- independent PLD accountant ---------------------------------------------------------------
# Privacy loss L(z) = log(mu(z)/mu0(z)) of the "remove" pair (mu, mu0), z ~ mu ("add": -L, z ~ mu0).
# L is monotone in z, so the mass of each loss bin is a difference of Gaussian CDFs. Rounding every
# bin to its upper (lower) edge gives an upper (lower) bound on epsilon (Koskela, Jalko, Honkela,
# AISTATS 2020); T-fold composition is the T-th power of the pmf's Fourier transform; then
# delta(eps) = E[(1 - exp(eps - L_T))_+] (Meiser & Mohammadi, CCS 2018, via Balle et al. 2018).


def _loss_pmf(q: float, sigma: float, h: float, loss_max: float, direction: str, upper: bool):
    k_min = int(math.floor(math.log1p(-q) / h)) - 1
    edges = np.arange(k_min, int(math.ceil(loss_max / h)) + 1) * h  # loss bin edges
    inner = (np.exp(edges) - (1 - q)) / q
    z = np.full_like(edges, -np.inf)
    z[inner > 0] = sigma**2 * np.log(inner[inner > 0]) + 0.5  # the z at which L(z) = edge
    if direction == "remove":
        cdf = (1 - q) * norm.cdf(z / sigma) + q * norm.cdf((z - 1) / sigma)
        mass, values, infinite = np.diff(cdf), edges, 1 - cdf[-1]
    else:
        cdf = norm.cdf(z / sigma)
        mass, values, infinite = np.diff(cdf)[::-1].copy(), -edges[::-1], 0.0
        mass[0] += 1 - cdf[-1]  # losses below -loss_max, rounded up to the lowest bin
    return (values[1:] if upper else values[:-1]), mass, infinite


def reference_pld_epsilon(q: float, sigma: float, steps: int, delta: float, *, upper: bool, h: float = 2e-4) -> float:
    best = 0.0
    for direction in ("remove", "add"):
        grid, mass, infinite = _loss_pmf(q, sigma, h, 3.0, direction, upper)
        size = 1 << math.ceil(math.log2(steps * len(mass)))
        composed = np.clip(np.fft.irfft(np.fft.rfft(mass, size) ** steps, size)[: steps * (len(mass) - 1) + 1], 0, None)
        losses = (np.arange(len(composed)) + steps * round(grid[0] / h)) * h
        infinite_total = 1 - (1 - infinite) ** steps
        low, high = 0.0, 50.0
        for _ in range(60):
            middle = (low + high) / 2
            tail = infinite_total + float(np.sum(composed * np.clip(1 - np.exp(middle - losses), 0, None)))
            low, high = (middle, high) if tail > delta else (low, middle)
        best = max(best, high)
    return best


# ---- tests ------------------------------------------------------------------------------------


def test_published_setting_prv_is_about_095() -> None:
    # Prepare / Execute
    eps = epsilon_of([(4.0, 0.01, 10_000)], delta=1e-5, accountant="prv")

    # Assert
    assert eps == pytest.approx(0.95, abs=0.02)


def test_published_setting_rdp_is_about_104_and_matches_independent_rdp() -> None:
    # Prepare
    expected = reference_rdp_epsilon(0.01, 4.0, 10_000, 1e-5)

    # Execute
    eps = epsilon_of([(4.0, 0.01, 10_000)], delta=1e-5, accountant="rdp")

    # Assert
    assert expected == pytest.approx(1.04, abs=0.01)
    assert eps == pytest.approx(expected, rel=1e-4)


def test_prv_lies_within_independent_pld_bounds_and_below_rdp() -> None:
    # Prepare
    q, sigma, steps, delta = 0.05, 1.0, 50, 1e-5
    lower = reference_pld_epsilon(q, sigma, steps, delta, upper=False)
    upper = reference_pld_epsilon(q, sigma, steps, delta, upper=True)

    # Execute
    prv = epsilon_of([(sigma, q, steps)], delta=delta, accountant="prv")
    rdp = epsilon_of([(sigma, q, steps)], delta=delta, accountant="rdp")

    # Assert: upper - lower = steps * h = 0.01; PRV reports the top of its own +-0.01 interval
    assert upper - lower == pytest.approx(0.01, abs=1e-6)
    assert lower - 1e-3 <= prv <= upper + PRV_EPS_ERROR
    assert upper == pytest.approx(2.68, abs=0.01)
    assert rdp > prv


def test_composition_does_not_depend_on_how_rounds_are_split() -> None:
    # Prepare
    whole = [(1.1, 0.02, 300)]
    rounds = [(1.1, 0.02, 100)] * 3

    # Execute / Assert
    assert merge_history(rounds) == whole
    for accountant in ("prv", "rdp"):
        assert epsilon_of(rounds, delta=1e-5, accountant=accountant) == epsilon_of(whole, delta=1e-5, accountant=accountant)
    assert epsilon_of([], delta=1e-5, accountant="prv") == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_noise_meets_the_target_from_below(accountant: str) -> None:
    # Prepare
    prior = [(2.0, 0.01, 500)]

    # Execute
    sigma = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000, accountant=accountant, prior=prior
    )

    # Assert
    reached = epsilon_of([*prior, (sigma, 0.01, 1000)], delta=1e-5, accountant=accountant)
    assert 3.0 - 0.01 <= reached <= 3.0
    assert epsilon_of([*prior, (sigma * 0.97, 0.01, 1000)], delta=1e-5, accountant=accountant) > 3.0


def test_calibration_refuses_when_prior_spend_already_reaches_the_target() -> None:
    with pytest.raises(AccountingError, match=r"already spent \(\d+\.\d+\) reaches target_epsilon=0.5"):
        calibrate_noise_multiplier(
            target_epsilon=0.5, delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp", prior=[(0.8, 0.1, 100)]
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"noise_multiplier": -1.0}, r"noise_multiplier must be > 0, got -1.0"),
        ({"noise_multiplier": 0.0}, r"noise_multiplier must be > 0, got 0.0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\], got 1.5"),
        ({"steps": 0}, r"steps must be >= 1, got 0"),
        ({"steps": True}, r"steps must be an int, got True"),
        ({"round_index": -2}, r"round_index must be an int >= 0, got -2"),
    ],
)
def test_privacy_event_rejects_bad_parameters(fields: dict, message: str) -> None:
    values = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10} | fields
    with pytest.raises(AccountingError, match=message):
        PrivacyEvent(**values)


def test_epsilon_rejects_bad_delta_and_unknown_accountant() -> None:
    with pytest.raises(AccountingError, match=r"delta must be in \(0, 1\), got 1.0"):
        epsilon_of([(1.0, 0.1, 1)], delta=1.0, accountant="prv")
    with pytest.raises(AccountingError, match=r"accountant must be one of \('prv', 'rdp'\), got 'gdp'"):
        epsilon_of([(1.0, 0.1, 1)], delta=1e-5, accountant="gdp")
    with pytest.raises(AccountingError, match=r"target_epsilon must be > 0, got 0.0"):
        calibrate_noise_multiplier(target_epsilon=0.0, delta=1e-5, sample_rate=0.1, steps=1, accountant="rdp")
