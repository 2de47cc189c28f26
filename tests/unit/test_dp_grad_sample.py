"""Per-sample gradients of the text model against the obviously-correct reference: one record at a time.

Every trainable parameter is compared, position and token-type embeddings and LoRA factors included.
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from models import TrainableSet, build_model, default_model_path, select_trainable, tiny_bert_config
from policies.dp import BatchedEmbeddingIndices, trainable_parameters

pytestmark = pytest.mark.unit

VOCAB = 96
LENGTHS = (12, 7, 12, 3, 9)  # tokens per record before right padding to 12


def _batch(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(5, vocab, (len(LENGTHS), max(LENGTHS)), generator=generator)  # [B, L]
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        attention_mask[row, :length] = 1
    input_ids = input_ids * attention_mask  # [PAD] = 0 after each record's end
    labels = torch.tensor([0, 1, 1, 0, 1])
    return input_ids, attention_mask, labels


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=VOCAB), trainable=TrainableSet(kind=kind, top_k=1))
    with torch.no_grad():  # peft starts lora_B at zero, which would make lora_A's gradient vanish
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    return model


def _microbatch_gradients(model: nn.Module, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Reference: gradient of each record's own loss, one forward/backward per record. [B, *shape] per name."""
    input_ids, attention_mask, labels = _batch(vocab)
    per_record: dict[str, list[torch.Tensor]] = {name: [] for name, _ in trainable_parameters(model)}
    for row in range(len(labels)):
        model.zero_grad()
        logits = model(input_ids=input_ids[row : row + 1], attention_mask=attention_mask[row : row + 1]).logits
        nn.functional.cross_entropy(logits, labels[row : row + 1]).backward()
        for name, parameter in trainable_parameters(model):
            per_record[name].append(parameter.grad.detach().clone())
    model.zero_grad()
    return {name: torch.stack(grads) for name, grads in per_record.items()}


@pytest.mark.parametrize("kind", ["full", "top_k", "lora"])
def test_per_sample_gradients_equal_microbatch_gradients(kind: str) -> None:
    # Prepare
    model = _model(kind)
    expected = _microbatch_gradients(model)
    names = [name for name, _ in trainable_parameters(model)]
    fix = BatchedEmbeddingIndices(model)
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    input_ids, attention_mask, labels = _batch()

    # Execute
    logits = module(input_ids=input_ids, attention_mask=attention_mask).logits
    nn.functional.cross_entropy(logits, labels).backward()

    # Assert
    got = {name: parameter.grad_sample for name, parameter in trainable_parameters(model)}
    assert set(got) == set(expected) == set(names)
    if kind == "full":
        assert "bert.embeddings.position_embeddings.weight" in got
        assert "bert.embeddings.token_type_embeddings.weight" in got
    if kind == "lora":
        assert any("lora_A" in name for name in got) and any("lora_B" in name for name in got)
    for name in names:
        assert got[name].shape == (len(LENGTHS), *expected[name].shape[1:]), name
        torch.testing.assert_close(got[name], expected[name], atol=2e-6, rtol=1e-4, msg=name)
    fix.remove()
    module._close()


def test_without_the_fix_position_embedding_gradient_has_batch_size_one() -> None:
    # Prepare: Hugging Face's [1, L] position_ids, no BatchedEmbeddingIndices
    model = _model("full")
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    input_ids, attention_mask, labels = _batch()

    # Execute
    logits = module(input_ids=input_ids, attention_mask=attention_mask).logits
    nn.functional.cross_entropy(logits, labels).backward()

    # Assert: the per-record gradients were summed by broadcasting before Opacus saw them
    position = model.bert.embeddings.position_embeddings.weight
    assert position.grad_sample.shape == (1, *position.shape)
    module._close()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_ghost_clipping_norms_and_clipped_sum_equal_microbatch_reference(kind: str) -> None:
    # Prepare
    clip_norm = 0.05  # below every record's gradient norm here, so every record is clipped
    model = _model(kind)
    expected = _microbatch_gradients(model)
    names = list(expected)
    flat = torch.cat([expected[name].reshape(len(LENGTHS), -1) for name in names], dim=1)  # [B, P]
    norms = flat.norm(dim=1)  # [B]
    factors = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped_sum = {name: torch.einsum("b,b...->...", factors, expected[name]) for name in names}
    fix = BatchedEmbeddingIndices(model)
    module = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD([p for _, p in trainable_parameters(model)], lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip_norm,
        expected_batch_size=len(LENGTHS),
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss(reduction="mean"), "mean")
    input_ids, attention_mask, labels = _batch()

    # Execute
    logits = module(input_ids=input_ids, attention_mask=attention_mask).logits
    criterion(logits, labels).backward()

    # Assert
    assert bool((norms > clip_norm).all())
    torch.testing.assert_close(module.per_sample_gradient_norms, norms, atol=1e-5, rtol=1e-4)
    for name, parameter in trainable_parameters(model):
        torch.testing.assert_close(parameter.grad, clipped_sum[name], atol=1e-6, rtol=1e-4, msg=name)
    fix.remove()
    module._close()


@pytest.mark.slow
def test_default_model_per_sample_gradients_with_trainable_embeddings_equal_microbatch() -> None:
    # Prepare: the real all-MiniLM-L6-v2 checkpoint, every parameter trainable, dropout off
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        default_model_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model = select_trainable(model, TrainableSet(kind="full")).train()  # from_pretrained returns eval mode
    vocab = model.config.vocab_size
    expected = _microbatch_gradients(model, vocab)
    fix = BatchedEmbeddingIndices(model)
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    input_ids, attention_mask, labels = _batch(vocab)

    # Execute
    logits = module(input_ids=input_ids, attention_mask=attention_mask).logits
    nn.functional.cross_entropy(logits, labels).backward()

    # Assert
    for name, parameter in trainable_parameters(model):
        torch.testing.assert_close(parameter.grad_sample, expected[name], atol=1e-5, rtol=1e-3, msg=name)
    assert "bert.embeddings.position_embeddings.weight" in expected
    fix.remove()
    module._close()
