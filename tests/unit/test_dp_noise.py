"""The DP-SGD noise and Poisson sampling from a CSPRNG: distribution, independence from torch's RNG, the Opacus hook,
the default, the seed refusal and the admin's warning for a plan that turns it off."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats
from torch.utils.data import TensorDataset

from datasites.review_queue import SECURE_NOISE_OFF, RequestSummary, ReviewReport, plan_warnings
from models import TrainableSet, build_model, tiny_bert_config
from policies.dp import (
    DPPlan,
    DPPlanError,
    SecureGaussianNoise,
    SecureNoiseDPOptimizer,
    SecureNoiseFastGradientClippingOptimizer,
    SecurePoissonSampler,
    trainable_parameters,
)
from policies.dp.engine import _dp_training, _empty_batch_gradients
from policies.federated_plan import FederatedPlan
from policies.review import review_code

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
KS_P_MIN = 1e-6  # a correct sampler fails one KS check with probability 1e-6


class GridUniforms:
    """A stand-in for AesCtrRandomStream: uniforms on the same 53-bit grid, chosen by the test."""

    def __init__(self, values: np.ndarray | None = None, *, seed: int = 0) -> None:
        self.values = values
        self.rng = np.random.default_rng(seed)
        self.drawn: list[np.ndarray] = []

    def uniform53(self, count: int, out: np.ndarray | None = None) -> np.ndarray:
        if self.values is not None:
            drawn = np.array(self.values[:count], dtype=np.float64)
        else:
            drawn = self.rng.integers(0, 2**53, size=count, dtype=np.int64).astype(np.float64) * 2.0**-53
        self.drawn.append(drawn.copy())
        if out is None:
            return drawn
        out[:count] = drawn
        return out[:count]


class ConstantNoise:
    """A noise source whose every coordinate is std: makes the optimizer's use of it visible."""

    def __init__(self) -> None:
        self.stds: list[float] = []

    def sample(self, std: float, *, like: torch.Tensor) -> torch.Tensor:
        self.stds.append(std)
        return torch.full_like(like, std)


def _dataset() -> TensorDataset:
    input_ids = torch.arange(5, 65).reshape(6, 10)  # [6, 10]
    return TensorDataset(input_ids, torch.ones_like(input_ids), torch.tensor([0, 1, 0, 1, 1, 0]))


def _training(mode: str, *, secure: bool = True, seed: int | None = None, sigma: float = 2.0, clip: float = 0.5,
              batch: int = 4):
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=96), trainable=TrainableSet(kind="full"))
    training = _dp_training(model, _dataset(), noise_multiplier=sigma, clip_norm=clip, sample_rate=0.5,
                            expected_batch_size=batch, clipping_mode=mode, optimizer_name="sgd", learning_rate=1.0,
                            accountant="rdp", secure_mode=secure, device=CPU, seed=seed)
    return model, training


def _noise_of_one_empty_step(model: torch.nn.Module, training, mode: str, *, batch: int = 4) -> torch.Tensor:
    """One logical step on an empty Poisson batch: with SGD at lr 1 the update is minus noise / batch."""
    initial = torch.cat([p.detach().reshape(-1).clone() for _, p in trainable_parameters(model)])
    _empty_batch_gradients(training, mode)
    training.optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for _, p in trainable_parameters(model)])
    return -(after - initial) * batch


# --- the sampler ----------------------------------------------------------------------------------


def test_noise_has_mean_zero_and_variance_std_squared() -> None:
    # Prepare
    std, n = 2.5, 1_000_000

    # Execute
    noise = SecureGaussianNoise().sample(std, like=torch.zeros(n, dtype=torch.float64)).numpy()

    # Assert: the mean's standard error is std / 1000, the variance's relative one sqrt(2 / n) = 0.14%
    assert noise.shape == (n,)
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert noise.var() == pytest.approx(std**2, rel=0.01)


@pytest.mark.parametrize(("size", "calls"), [(1, 4000), (3, 1500), (100, 40), (10_000, 1), (1_000_000, 1)])
def test_noise_passes_kolmogorov_smirnov_against_the_normal(size: int, calls: int) -> None:
    # Prepare: odd sizes and size 1 take the padded and the wrapped-around pair assignment
    sampler, std = SecureGaussianNoise(), 0.7

    # Execute
    noise = np.concatenate([sampler.sample(std, like=torch.zeros(size, dtype=torch.float64)).numpy()
                            for _ in range(calls)])

    # Assert
    assert stats.kstest(noise / std, "norm").pvalue > KS_P_MIN


def test_the_kolmogorov_smirnov_check_catches_a_three_percent_scale_error() -> None:
    # Prepare: the check above can fail: noise whose std is 3% off is rejected at 1e6 coordinates
    noise = SecureGaussianNoise().sample(1.0, like=torch.zeros(1_000_000, dtype=torch.float64)).numpy()

    # Execute
    wrong = stats.kstest(noise * 1.03, "norm").pvalue

    # Assert
    assert wrong < KS_P_MIN


@pytest.mark.parametrize("size", [2, 5, 8])
def test_the_two_halves_of_a_box_muller_pair_never_land_in_one_coordinate(size: int) -> None:
    # Prepare: every radius uniform 0 (radius 0) but pair j's; angle 1/8, so its cos and sin are both nonzero
    pairs = 2 * size
    for j in range(pairs):
        uniforms = np.concatenate([np.zeros(pairs), np.full(pairs, 0.125)])
        uniforms[j] = 0.5
        sampler = SecureGaussianNoise(GridUniforms(uniforms))

        # Execute
        noise = sampler.sample(2.0, like=torch.zeros(size, dtype=torch.float64)).numpy()

        # Assert: the pair feeds two different coordinates, sqrt(2 ln 2) cos(pi/4) = sqrt(ln 2) each
        assert np.count_nonzero(noise) == 2, (j, noise)
        np.testing.assert_allclose(noise[noise != 0], math.sqrt(math.log(2.0)), rtol=1e-12)


@pytest.mark.parametrize("size", [1, 2, 7])
def test_the_sum_of_four_matches_a_slow_reference(size: int) -> None:
    # Prepare
    source = GridUniforms(seed=size)
    sampler = SecureGaussianNoise(source)

    # Execute: std 2 makes the noise the plain sum z1 + z2 + z3 + z4
    noise = sampler.sample(2.0, like=torch.zeros(size, dtype=torch.float64)).numpy()

    # Assert: coordinate c is cos of pairs c, m + c and sin of pairs c - 1, m + c - 1 (m = max(size, 2))
    u, m = source.drawn[0], max(size, 2)
    for c in range(size):
        expected = (_box_muller(u, m, c, math.cos) + _box_muller(u, m, m + c, math.cos)
                    + _box_muller(u, m, (c - 1) % m, math.sin) + _box_muller(u, m, m + (c - 1) % m, math.sin))
        assert noise[c] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _box_muller(u: np.ndarray, m: int, pair: int, trig: Callable[[float], float]) -> float:
    """One half of Box-Muller pair ``pair``, one scalar at a time: radius uniform u[pair], angle u[2m + pair]."""
    return math.sqrt(-2.0 * math.log(1.0 - u[pair])) * trig(2.0 * math.pi * u[2 * m + pair])


def test_noise_takes_the_dtype_shape_and_device_of_the_gradient() -> None:
    # Prepare
    like = torch.zeros(3, 4, dtype=torch.bfloat16)

    # Execute
    noise = SecureGaussianNoise().sample(1.0, like=like)
    silent = SecureGaussianNoise().sample(0.0, like=like)

    # Assert
    assert noise.shape == (3, 4) and noise.dtype == torch.bfloat16 and noise.device == like.device
    assert torch.count_nonzero(noise) >= 10
    assert torch.equal(silent, torch.zeros(3, 4, dtype=torch.bfloat16))
    with pytest.raises(DPPlanError, match=r"noise std must be a finite number >= 0, got -1.0"):
        SecureGaussianNoise().sample(-1.0, like=like)


def test_seeding_torch_changes_nothing_in_the_noise_and_the_noise_leaves_torch_alone() -> None:
    # Prepare
    sampler, like = SecureGaussianNoise(), torch.zeros(1000)

    # Execute
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = sampler.sample(1.0, like=like)
    untouched = torch.equal(state, torch.get_rng_state())
    torch.manual_seed(0)
    second = sampler.sample(1.0, like=like)
    torch.manual_seed(0)
    torch_noise = torch.normal(0.0, 1.0, size=(1000,))
    seeded = torch.normal(0.0, 1.0, size=(1000,), generator=torch.Generator().manual_seed(0))

    # Assert
    assert untouched
    assert not torch.equal(first, second)
    assert not torch.allclose(first, torch_noise) and not torch.allclose(second, seeded)


# --- the Opacus hook ------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "optimizer_type"),
                         [("hooks", SecureNoiseDPOptimizer), ("ghost", SecureNoiseFastGradientClippingOptimizer)])
def test_the_secure_optimizer_adds_its_sources_noise_to_the_summed_gradient(mode: str, optimizer_type: type) -> None:
    # Prepare: a noise source of constant std per coordinate, so the gradient shows where the noise went
    model, training = _training(mode, sigma=2.0, clip=0.5, batch=4)
    constant = ConstantNoise()
    training.optimizer.noise_source = constant

    # Execute
    noise = _noise_of_one_empty_step(model, training, mode)
    training.close()

    # Assert: std = sigma * C per coordinate, as Opacus scales it, once per parameter
    assert isinstance(training.optimizer, optimizer_type)
    assert constant.stds == [1.0] * len(trainable_parameters(model))
    torch.testing.assert_close(noise, torch.full_like(noise, 1.0))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_secure_step_adds_normal_noise_of_std_sigma_c_and_leaves_torchs_rng_alone(mode: str) -> None:
    # Prepare: an empty Poisson batch, so the step adds pure noise N(0, (sigma C)^2) to each coordinate
    model, training = _training(mode, sigma=2.0, clip=0.5, batch=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()

    # Execute
    noise = _noise_of_one_empty_step(model, training, mode)
    after = torch.get_rng_state()
    training.close()

    # Assert: ~30k coordinates (float32 rounding of the update: tolerance 3% on the std)
    assert torch.equal(state, after)
    assert noise.numel() > 20_000
    assert float(noise.std()) == pytest.approx(1.0, rel=0.03)
    assert stats.kstest(noise.double().numpy(), "norm", args=(0.0, float(noise.std()))).pvalue > KS_P_MIN
    assert training.accountant.history == [(2.0, 0.5, 1)]


def test_a_second_secure_step_without_zero_grad_is_refused() -> None:
    # Prepare: ghost clipping accumulates into summed_grad, which the secure add_noise marks as used
    model, training = _training("ghost")
    _empty_batch_gradients(training, "ghost")
    training.optimizer.step()

    # Execute / Assert
    _empty_batch_gradients(training, "ghost")
    with pytest.raises(ValueError, match=r"Gradients haven't been cleared since the last optimizer step"):
        training.optimizer.step()
    training.close()


def test_a_secure_optimizer_refuses_a_torch_generator() -> None:
    # Prepare
    parameter = torch.nn.Parameter(torch.zeros(3))

    # Execute / Assert
    with pytest.raises(DPPlanError, match=r"pass neither a torch generator nor secure_mode"):
        SecureNoiseDPOptimizer(torch.optim.SGD([parameter], lr=1.0), noise_source=SecureGaussianNoise(),
                               noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                               generator=torch.Generator().manual_seed(0))


# --- Poisson sampling -----------------------------------------------------------------------------


def test_secure_poisson_batches_include_each_record_with_probability_q_without_torchs_rng() -> None:
    # Prepare
    sampler = SecurePoissonSampler(num_samples=10_000, sample_rate=0.03, source=GridUniforms(seed=1))
    torch.manual_seed(5)
    state = torch.get_rng_state()

    # Execute
    batches = [batch for batch, _ in zip(sampler, range(20), strict=False)]

    # Assert: 20 x 10k Bernoulli(0.03) draws: 6000 expected, standard deviation 76
    assert torch.equal(state, torch.get_rng_state())
    assert abs(sum(len(batch) for batch in batches) - 6000) < 5 * 76
    assert all(batch == sorted(set(batch)) and 0 <= batch[0] and batch[-1] < 10_000 for batch in batches)


def test_the_secure_round_samples_its_batches_with_the_secure_sampler() -> None:
    # Prepare
    _, secure = _training("hooks")
    _, reference = _training("hooks", secure=False, seed=11)

    # Execute
    batches = [len(batch[0]) for batch in secure.loader]

    # Assert: Opacus's epoch of 1 / q = 2 batches, each a subset of the 6 records
    assert isinstance(secure.loader.batch_sampler, SecurePoissonSampler)
    assert not isinstance(reference.loader.batch_sampler, SecurePoissonSampler)
    assert len(batches) == 2 and all(0 <= size <= 6 for size in batches)
    secure.close()
    reference.close()


# --- the default, the seed, the review ------------------------------------------------------------

PLAN: dict[str, Any] = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 2,
        "noise_multiplier": 1.0}


def test_secure_noise_is_every_plans_default_and_off_only_when_asked() -> None:
    # Execute
    default, parsed = DPPlan(**PLAN), DPPlan.from_dict(PLAN)
    off = DPPlan.from_dict(PLAN | {"secure_mode": False})

    # Assert
    assert default.secure_mode is True and parsed.secure_mode is True
    assert off.secure_mode is False


def test_a_seed_is_refused_with_secure_noise() -> None:
    with pytest.raises(DPPlanError, match=r"seed=7 makes the noise predictable and is refused with secure noise "
                                          r"\(secure_mode=True, every plan's default\): drop the seed"):
        _training("hooks", secure=True, seed=7)


def test_only_a_plan_without_secure_noise_gets_the_warning() -> None:
    # Execute
    warned = plan_warnings(DPPlan(**PLAN, secure_mode=False))
    quiet = plan_warnings(DPPlan(**PLAN))

    # Assert
    assert warned == (SECURE_NOISE_OFF,)
    assert SECURE_NOISE_OFF.startswith("this plan turns off cryptographically secure noise (dp.secure_mode = false)")
    assert quiet == ()


def _federated_plan(secure: bool) -> FederatedPlan:
    def key() -> str:
        return Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()

    return FederatedPlan.parse({
        "format": 1, "run_id": "run-0123456789ab", "dataset": "imdb",
        "model": {"name": None, "tiny": {"hidden_size": 32}, "trainable": {"kind": "lora"}, "seed": 0},
        "dp": PLAN | {"secure_mode": secure},
        "secure_sum": {"vector_length": 10, "clip": 0.5, "quantisation_bits": 24, "threshold": 2, "modulus_bits": 32,
                       "neighbourhood_size": None},
        "roster": [["site-a", key()], ["site-b", key()], ["site-c", key()]],
    })


def _report(plan: FederatedPlan) -> ReviewReport:
    summary = RequestSummary(request_id="0123456789abcdef0123456789abcdef", function="fedsite_run_0123456789ab",
                             researcher="0" * 32, researcher_email="rita@uni.org", status="pending")
    return ReviewReport(summary, "def f(): ...\n", review_code("def f(): ...\n"), plan, None, None, None, None,
                        problems=(), warnings=plan_warnings(plan.dp))


def test_the_review_flags_a_plan_without_secure_noise_and_still_lets_it_be_approved() -> None:
    # Execute
    flagged = _report(_federated_plan(secure=False)).render_text()
    clean = _report(_federated_plan(secure=True)).render_text()

    # Assert
    assert f"WARNING: {SECURE_NOISE_OFF}" in flagged.splitlines()
    assert flagged.rstrip().endswith("no problems: the request can be approved")
    assert "WARNING" not in clean
