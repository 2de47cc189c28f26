"""Opacus's DP optimizers with the site's two changes: CSPRNG noise, and a non-finite record counting as zero."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from policies.dp.noise import SecureGaussianNoise
from policies.dp.plan import DPPlanError


class _SecureNoiseStep:
    """Opacus's ``add_noise`` with the noise drawn by ``SecureGaussianNoise`` (mixed into both DP optimizers).

    As in Opacus 1.6 (``DPOptimizer.add_noise``): the noise, std = noise_multiplier * max_grad_norm,
    is added to the *sum* of the clipped per-sample gradients, ``p.grad = (p.summed_grad + noise)``;
    ``scale_grad`` divides by the expected batch size afterwards; ``_mark_as_processed`` lets Opacus
    refuse a second step on the same gradients without ``zero_grad``. ``_adjusted_noise_multiplier``
    is the fast-gradient-clipping optimizer's adaptive-clipping override (never set here).
    """

    params: list[Any]  # Opacus's DPOptimizer.params: the trainable parameters, each with Opacus's summed_grad
    noise_multiplier: float
    max_grad_norm: float
    noise_source: SecureGaussianNoise

    def add_noise(self) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.noise_source.sample(std, like=p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


def _refuse_torch_generator(kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("generator") is not None or "secure_mode" in kwargs:
        raise DPPlanError("a secure-noise optimizer draws its noise from SecureGaussianNoise: pass neither a "
                          "torch generator nor secure_mode")


class _FiniteRecords:
    """A record whose per-sample gradient is not finite contributes nothing to the step.

    Clipping bounds a finite gradient's norm, not a NaN or an infinity: one such record would make the
    whole summed gradient non-finite, and whether a round then fails would say whether that record was in
    the batch. A researcher can choose a global model that overflows for one particular review (weights
    near float32's limit pointed at its embedding), so this is a membership oracle outside any epsilon.
    Zeroing the record's gradient keeps its contribution within the clip bound (zero), the sum finite and
    the round's outcome a function of the noisy sums only. Per-sample gradients of BERT are independent
    across records (LayerNorm, not BatchNorm), so one record's overflow cannot reach another's.
    """

    params: list[Any]
    _get_flat_grad_sample: Callable[[Any], torch.Tensor]

    def clip_and_accumulate(self) -> None:
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        if samples and len(samples[0]):
            finite = torch.ones(len(samples[0]), dtype=torch.bool, device=samples[0].device)
            for sample in samples:
                finite &= torch.isfinite(sample.reshape(len(sample), -1)).all(dim=1).to(finite.device)
            for p, sample in zip(self.params, samples, strict=True):
                keep = finite.to(sample.device).view(-1, *([1] * (sample.dim() - 1)))
                p.grad_sample = torch.where(keep, sample, torch.zeros((), dtype=sample.dtype, device=sample.device))
        super().clip_and_accumulate()  # type: ignore[misc]


class FiniteRecordsDPOptimizer(_FiniteRecords, DPOptimizer):
    """Opacus's ``DPOptimizer`` with torch's noise, where a non-finite per-sample gradient counts as zero."""


class SecureNoiseDPOptimizer(_SecureNoiseStep, _FiniteRecords, DPOptimizer):
    """Opacus's ``DPOptimizer`` (per-sample gradients, "hooks") with CSPRNG noise."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureGaussianNoise, **kwargs: Any) -> None:
        _refuse_torch_generator(kwargs)
        super().__init__(optimizer, generator=None, secure_mode=True, **kwargs)
        self.noise_source = noise_source


class SecureNoiseFastGradientClippingOptimizer(_SecureNoiseStep, DPOptimizerFastGradientClipping):
    """Opacus's ``DPOptimizerFastGradientClipping`` (ghost clipping) with CSPRNG noise."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureGaussianNoise, **kwargs: Any) -> None:
        _refuse_torch_generator(kwargs)
        super().__init__(optimizer, generator=None, secure_mode=True, **kwargs)
        self.noise_source = noise_source
