"""Opacus wired around a model for one round, and the logical DP-SGD steps it takes.

Poisson sampling (``DPDataLoader`` or ``SecurePoissonSampler``), per-sample clipping
(``GradSampleModule`` or ghost clipping), the noisy optimizer (``policies.dp.optimizers``), the
accountant's step hook and ``BatchMemoryManager``'s physical batches; ``_run_steps`` takes exactly the
planned number of logical steps and ``_DPTraining.close`` leaves no un-noised value in the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.tokens import trim_padding
from policies.dp.layers import BatchedEmbeddingIndices, trainable_parameters
from policies.dp.noise import AesCtrRandomStream, SecureGaussianNoise, SecurePoissonSampler
from policies.dp.optimizers import (
    FiniteRecordsDPOptimizer,
    SecureNoiseDPOptimizer,
    SecureNoiseFastGradientClippingOptimizer,
)
from policies.dp.plan import DPPlanError


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "big") & ((1 << 63) - 1)


@dataclass
class _Generators:
    """The torch generators of a round; with secure_mode neither draws noise or batches.

    With secure_mode the one generator left, ``sampling``, only feeds the DataLoader's base seed (which
    would otherwise consume torch's default generator). Without it (benches and reference tests only)
    Opacus draws the batches from ``sampling`` and the noise from ``noise``, both reseeded from
    ``os.urandom`` (64 bits) before every logical step, unless a reference test fixed a ``seed``.
    """

    sampling: torch.Generator
    noise: torch.Generator | None  # None with secure_mode: SecureGaussianNoise draws the noise
    reseed_each_step: bool

    def reseed(self) -> None:
        if self.reseed_each_step:
            self.sampling.manual_seed(_fresh_seed())
            if self.noise is not None:
                self.noise.manual_seed(_fresh_seed())


def _generators(device: torch.device, *, secure_mode: bool, seed: int | None) -> _Generators:
    if secure_mode and seed is not None:
        raise DPPlanError(
            f"seed={seed!r} makes the noise predictable and is refused with secure noise (secure_mode=True, every "
            "plan's default): drop the seed, or, for a reference test or a bench only, turn secure noise off "
            "explicitly with secure_mode=False"
        )
    sampling = torch.Generator(device="cpu")
    sampling.manual_seed(_fresh_seed() if seed is None else seed)
    if secure_mode:
        return _Generators(sampling=sampling, noise=None, reseed_each_step=True)
    noise = torch.Generator(device=device)
    noise.manual_seed(_fresh_seed() if seed is None else seed + 1)
    return _Generators(sampling=sampling, noise=noise, reseed_each_step=seed is None)


def _dp_optimizer(
    base: torch.optim.Optimizer, *, ghost: bool, secure_mode: bool, generators: _Generators, **kwargs: Any
) -> DPOptimizer:
    """Opacus's optimizer for the clipping mode; with secure_mode its subclass that draws CSPRNG noise."""
    if secure_mode:
        secure = SecureNoiseFastGradientClippingOptimizer if ghost else SecureNoiseDPOptimizer
        return secure(base, noise_source=SecureGaussianNoise(), **kwargs)
    plain = DPOptimizerFastGradientClipping if ghost else FiniteRecordsDPOptimizer
    return plain(base, generator=generators.noise, secure_mode=False, **kwargs)


def _poisson_loader(
    dataset: TensorDataset, *, sample_rate: float, secure_mode: bool, generators: _Generators
) -> DataLoader:
    """Opacus's Poisson-sampling loader; with secure_mode its batches come from ``SecurePoissonSampler``.

    ``DPDataLoader`` builds its torch-driven sampler itself, so the secure loader is a plain DataLoader
    with the secure sampler and DPDataLoader's collate function (it turns an empty batch into
    zero-length tensors). BatchMemoryManager needs only a DataLoader whose batch sampler is a
    ``UniformWithReplacementSampler``.
    """
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generators.sampling)
    if not secure_mode:
        return loader
    sampler = SecurePoissonSampler(num_samples=len(dataset), sample_rate=sample_rate, source=AesCtrRandomStream())
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=loader.collate_fn, generator=generators.sampling)


@dataclass
class _DPTraining:
    """The Opacus objects of one round, wired to one model."""

    model: nn.Module  # the caller's model
    module: nn.Module  # the GradSampleModule wrapping the model
    optimizer: DPOptimizer
    loader: DataLoader  # Poisson sampling (see _poisson_loader)
    accountant: PRVAccountant | RDPAccountant
    criterion: Any  # DPLossFastGradientClipping (ghost) or None (hooks: plain mean cross-entropy)
    embedding_fix: BatchedEmbeddingIndices
    generators: _Generators

    def close(self) -> None:
        """Remove every hook and every trace of un-noised values from the caller's model.

        Opacus's own clean-up leaves ``p.summed_grad`` (the clipped gradient sum *before* noise),
        ``p.grad`` and the modules' captured ``activations`` (private inputs) behind when a step did
        not complete. The researcher's function holds the model after we return or raise, so all of
        it goes.
        """
        self.embedding_fix.remove()
        self.module._close()  # type: ignore[operator]
        for parameter in self.model.parameters():
            parameter.grad = None
            if hasattr(parameter, "summed_grad"):
                del parameter.summed_grad
        for module in self.model.modules():
            for attribute in ("activations", "max_batch_len"):
                if attribute in module.__dict__:  # not hasattr: peft wrappers forward attribute reads
                    delattr(module, attribute)


def _dp_training(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    expected_batch_size: int,
    clipping_mode: str,
    optimizer_name: str,
    learning_rate: float,
    accountant: str,
    secure_mode: bool,
    device: torch.device,
    seed: int | None = None,
) -> _DPTraining:
    """Wire Opacus around ``model``. ``noise_multiplier`` may be 0 here only for the reference tests.

    With ``secure_mode`` (every plan's default) the noise and the Poisson batches come from a CSPRNG
    (``SecureGaussianNoise``, ``SecurePoissonSampler``) and ``seed`` is refused; ``secure_mode=False``
    leaves both to Opacus and torch's generators, for benches and reference tests that need a ``seed``.
    """
    params = [parameter for _, parameter in trainable_parameters(model)]
    if optimizer_name == "adamw":
        base: torch.optim.Optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    else:
        base = torch.optim.SGD(params, lr=learning_rate)
    generators = _generators(device, secure_mode=secure_mode, seed=seed)
    embedding_fix = BatchedEmbeddingIndices(model)
    noise = {"noise_multiplier": noise_multiplier, "max_grad_norm": clip_norm,
             "expected_batch_size": expected_batch_size, "loss_reduction": "mean"}
    criterion = None
    if clipping_mode == "ghost":
        module: nn.Module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm, use_ghost_clipping=True
        )
        optimizer = _dp_optimizer(base, ghost=True, secure_mode=secure_mode, generators=generators, **noise)
        criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss(reduction="mean"), "mean")
    else:
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = _dp_optimizer(base, ghost=False, secure_mode=secure_mode, generators=generators, **noise)
    tracker: PRVAccountant | RDPAccountant = PRVAccountant() if accountant == "prv" else RDPAccountant()
    optimizer.attach_step_hook(tracker.get_optimizer_hook_fn(sample_rate=sample_rate))
    loader = _poisson_loader(dataset, sample_rate=sample_rate, secure_mode=secure_mode, generators=generators)
    return _DPTraining(model, module, optimizer, loader, tracker, criterion, embedding_fix, generators)


def _steps_taken(accountant: PRVAccountant | RDPAccountant) -> int:
    return sum(steps for _, _, steps in accountant.history)


def _empty_batch_gradients(training: _DPTraining, clipping_mode: str) -> None:
    """An empty Poisson batch still takes a noisy step (the mechanism releases noise, not nothing)."""
    for parameter in training.optimizer.params:
        if clipping_mode == "ghost":
            parameter.grad = torch.zeros_like(parameter)
        else:
            parameter.grad_sample = torch.zeros((0, *parameter.shape), dtype=parameter.dtype, device=parameter.device)


def _physical_step(
    training: _DPTraining,
    batch: Sequence[torch.Tensor],
    *,
    clipping_mode: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one physical batch; returns (summed loss as a 0-d tensor, batch size).

    ``batch`` is (input_ids [b, L], attention_mask [b, L], labels [b]) on the CPU; padding is trimmed
    there, so no device synchronisation happens per step.
    """
    input_ids, attention_mask, labels = batch
    if input_ids.shape[0] == 0:
        _empty_batch_gradients(training, clipping_mode)
        return torch.zeros(()), 0
    input_ids, attention_mask = trim_padding(input_ids, attention_mask)
    input_ids, attention_mask, labels = (t.to(device, non_blocking=True) for t in (input_ids, attention_mask, labels))
    with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = training.module(input_ids=input_ids, attention_mask=attention_mask)
    logits = (outputs.logits if hasattr(outputs, "logits") else outputs[0]).float()  # [b, num_labels]
    if clipping_mode == "ghost":
        loss = training.criterion(logits, labels)
    else:
        loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach() * labels.shape[0], int(labels.shape[0])


class _TailAverage:
    """The running sum of the parameters after each of the last ``count`` of ``steps`` logical steps.

    Each iterate is a function of the noisy gradients released so far, so their mean is post-processing
    of the same DP mechanism: it costs no privacy (Polyak-Ruppert averaging of the round's tail).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, steps: int, count: int) -> None:
        self.named, self.first, self.count = named, steps - count + 1, count
        self.sums: list[torch.Tensor] | None = None

    def after_step(self, step: int) -> None:
        """Called with the 1-based number of logical steps taken so far."""
        if step < self.first:
            return
        with torch.no_grad():
            values = [parameter.detach().double() for _, parameter in self.named]
            if self.sums is None:
                self.sums = values
            else:
                for total, value in zip(self.sums, values, strict=True):
                    total.add_(value)

    def apply(self) -> None:
        """Write the mean of the recorded iterates into the parameters."""
        if self.sums is None:
            raise RuntimeError(f"no iterate recorded for the last {self.count} steps: nothing to average")
        with torch.no_grad():
            for (_, parameter), total in zip(self.named, self.sums, strict=True):
                parameter.copy_((total / self.count).to(parameter.dtype))


def _run_steps(
    training: _DPTraining,
    *,
    steps: int,
    max_physical_batch_size: int,
    clipping_mode: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    tail: _TailAverage | None = None,
) -> float:
    """Exactly ``steps`` logical DP-SGD steps; returns the mean training loss (site-internal, not DP).

    With ``tail``, the parameters end as the mean of the iterates it records instead of the last one.
    """
    loss_sum, seen = torch.zeros((), device=device), 0
    training.module.train()
    with BatchMemoryManager(
        data_loader=training.loader, max_physical_batch_size=max_physical_batch_size, optimizer=training.optimizer
    ) as physical_loader:
        while _steps_taken(training.accountant) < steps:
            for batch in physical_loader:
                batch_loss, batch_size = _physical_step(
                    training, batch, clipping_mode=clipping_mode, device=device, amp_dtype=amp_dtype
                )
                loss_sum, seen = loss_sum + batch_loss.to(device), seen + batch_size
                before = _steps_taken(training.accountant)
                training.optimizer.step()
                training.optimizer.zero_grad(set_to_none=True)
                taken = _steps_taken(training.accountant)
                if taken > before:
                    training.generators.reseed()
                    if tail is not None:
                        tail.after_step(taken)
                if taken >= steps:
                    break
    if tail is not None:
        tail.apply()
    return float(loss_sum) / seen if seen else 0.0
