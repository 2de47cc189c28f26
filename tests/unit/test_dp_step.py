"""The DP-SGD step's clipping and noise, through the site's own training code paths."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from models import TrainableSet, build_model, tiny_bert_config
from policies.dp import trainable_parameters
from policies.dp.engine import _dp_training, _empty_batch_gradients, _physical_step

pytestmark = pytest.mark.unit

VOCAB = 96
CPU = torch.device("cpu")


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, VOCAB, (6, 10), generator=generator)  # [6, 10]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[4, 3:] = 0
    return TensorDataset(input_ids * attention_mask, attention_mask, torch.tensor([0, 1, 0, 1, 1, 0]))


def _training(mode: str, *, noise_multiplier: float, clip_norm: float, expected_batch_size: int, secure: bool = False):
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=VOCAB), trainable=TrainableSet(kind="full"))
    training = _dp_training(
        model,
        _dataset(),
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        sample_rate=0.5,
        expected_batch_size=expected_batch_size,
        clipping_mode=mode,
        optimizer_name="sgd",
        learning_rate=1.0,  # SGD with lr 1: the parameter change is minus the privatised gradient
        accountant="rdp",
        secure_mode=secure,
        device=CPU,
        seed=None if secure else 11,
    )
    return model, training


def _flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().reshape(-1).clone() for _, parameter in trainable_parameters(model)])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_each_clipped_per_sample_gradient_has_norm_at_most_clip_norm(mode: str) -> None:
    # Prepare: no noise, batch of one record, so the update is exactly that record's clipped gradient
    clip_norm = 0.1
    model, training = _training(mode, noise_multiplier=0.0, clip_norm=clip_norm, expected_batch_size=1)
    dataset = _dataset()
    initial = _flat_parameters(model)
    update_norms = []

    # Execute
    for row in range(len(dataset)):
        _physical_step(training, [t[row : row + 1] for t in dataset.tensors], clipping_mode=mode, device=CPU, amp_dtype=None)
        training.optimizer.step()
        training.optimizer.zero_grad(set_to_none=True)
        update_norms.append(float((_flat_parameters(model) - initial).norm()))
        with torch.no_grad():  # back to the start for the next record
            offset = 0
            for _, parameter in trainable_parameters(model):
                parameter.copy_(initial[offset : offset + parameter.numel()].view_as(parameter))
                offset += parameter.numel()
    training.close()

    # Assert: every record was clipped to C exactly (their raw norms are far above 0.1)
    assert len(update_norms) == 6
    for norm in update_norms:
        assert norm <= clip_norm * (1 + 1e-5)
        assert norm == pytest.approx(clip_norm, rel=1e-4)


@pytest.mark.parametrize(("mode", "secure"), [("hooks", False), ("ghost", False), ("hooks", True)])
def test_added_noise_has_standard_deviation_sigma_times_clip_norm(mode: str, secure: bool) -> None:
    # Prepare: an empty Poisson batch, so the step adds pure noise N(0, (sigma*C)^2) to each coordinate
    sigma, clip_norm, batch = 2.0, 0.5, 4
    model, training = _training(mode, noise_multiplier=sigma, clip_norm=clip_norm, expected_batch_size=batch, secure=secure)
    initial = _flat_parameters(model)

    # Execute
    _empty_batch_gradients(training, mode)
    training.optimizer.step()
    noise = -(_flat_parameters(model) - initial) * batch  # undo lr=1 and the division by the expected batch size
    training.close()

    # Assert: n ~ 30k coordinates, so the sample std is within ~0.5% of sigma*C (tolerance 3%)
    assert noise.numel() > 20_000
    assert float(noise.std()) == pytest.approx(sigma * clip_norm, rel=0.03)
    assert abs(float(noise.mean())) < 4 * sigma * clip_norm / noise.numel() ** 0.5
    assert training.accountant.history == [(sigma, 0.5, 1)]
