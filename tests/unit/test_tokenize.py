"""Head + tail truncation (``models.tokenize``): what a long text keeps, and bad settings refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models import ModelConfigError, build_model, encode_texts, public_centre, tiny_bert_config, tokenize
from policies.dp import DPPlan, DPPlanError
from researcher.evaluation import EvaluationError, evaluate
from tests.models_fixtures import tiny_tokenizer

pytestmark = pytest.mark.unit

WORDS = ("film", "movie", "the", "good", "bad", "plot", "end")
LONG = " ".join(["the film"] * 20 + ["good plot", "bad end"])  # 44 words; the verdict is at the end
SHORT = "good movie"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), words=WORDS)


def _words(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_long_text_keeps_its_first_and_last_tokens(tokenizer: Any) -> None:
    # Prepare
    words = _words(tokenizer, LONG)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    # Execute
    encoded = tokenize(tokenizer, [LONG], max_length=12, tail_tokens=4)

    # Assert: [CLS], the first 12 - 4 - 2 = 6 tokens, the last 4 tokens, [SEP]
    assert encoded["input_ids"][0].tolist() == [cls, *words[:6], *words[-4:], sep]
    assert encoded["attention_mask"][0].tolist() == [1] * 12
    assert tokenizer.decode(encoded["input_ids"][0][-5:-1]) == "good plot bad end"


def test_without_tail_tokens_it_is_the_tokenizers_own_truncation(tokenizer: Any) -> None:
    texts = [LONG, SHORT]
    own = tokenizer(texts, truncation=True, max_length=12, padding="max_length", return_tensors="pt")

    ours = tokenize(tokenizer, texts, max_length=12, padding="max_length")

    assert torch.equal(ours["input_ids"], own["input_ids"])
    assert torch.equal(ours["attention_mask"], own["attention_mask"])


@pytest.mark.parametrize(("padding", "width"), [(True, 6), ("max_length", 12)])
def test_a_text_that_fits_is_untouched_and_padded(tokenizer: Any, padding: bool | str, width: int) -> None:
    words = _words(tokenizer, SHORT)

    encoded = tokenize(tokenizer, [SHORT, "good bad good bad"], max_length=12, tail_tokens=4, padding=padding)

    row = encoded["input_ids"][0].tolist()
    assert len(row) == width
    assert row[: len(words) + 2] == [tokenizer.cls_token_id, *words, tokenizer.sep_token_id]
    assert row[len(words) + 2 :] == [tokenizer.pad_token_id] * (width - len(words) - 2)
    assert encoded["attention_mask"][0].tolist() == [1] * (len(words) + 2) + [0] * (width - len(words) - 2)


def test_encode_texts_truncates_every_text_the_same_way(tokenizer: Any) -> None:
    dataset = encode_texts(tokenizer, [LONG, SHORT], [1, 0], max_length=12, tail_tokens=4)

    ids, mask, labels = dataset.tensors
    assert ids.shape == mask.shape == (2, 12)
    assert torch.equal(ids[0], tokenize(tokenizer, [LONG], max_length=12, tail_tokens=4)["input_ids"][0])
    assert labels.tolist() == [1, 0]


@pytest.mark.parametrize("tail_tokens", [-1, 11, True, 2.0])
def test_bad_tail_tokens_are_refused_with_the_range(tokenizer: Any, tail_tokens: Any) -> None:
    message = rf"tail_tokens must be an int in \[0, max_length - 2\] = \[0, 10\].*got {tail_tokens!r}"
    with pytest.raises(ModelConfigError, match=message):
        tokenize(tokenizer, [LONG], max_length=12, tail_tokens=tail_tokens)
    with pytest.raises(DPPlanError, match=message):
        DPPlan(clip_norm=1.0, delta=1e-5, expected_batch_size=8, local_steps=1, rounds=1, noise_multiplier=1.0,
               max_length=12, tail_tokens=tail_tokens)


def test_the_plan_carries_tail_tokens_through_json() -> None:
    plan = DPPlan(clip_norm=1.0, delta=1e-5, expected_batch_size=8, local_steps=1, rounds=1, noise_multiplier=1.0,
                  max_length=128, tail_tokens=94)

    assert DPPlan.from_dict(plan.to_dict()).tail_tokens == 94
    assert DPPlan.from_dict({key: value for key, value in plan.to_dict().items() if key != "tail_tokens"}).tail_tokens == 0


def test_evaluation_reads_the_tail_only_when_asked(tokenizer: Any) -> None:
    # Prepare: two reviews that differ only after the first 12 tokens
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=len(tokenizer), max_length=32))
    ending_good = LONG.replace("bad end", "good end")

    # Execute
    head_only = [evaluate(model, tokenizer, [text], [1], max_length=12).mean_loss for text in (LONG, ending_good)]
    with_tail = [evaluate(model, tokenizer, [text], [1], max_length=12, tail_tokens=4).mean_loss
                 for text in (LONG, ending_good)]

    # Assert
    assert head_only[0] == head_only[1]
    assert with_tail[0] != with_tail[1]
    with pytest.raises(EvaluationError, match=r"tail_tokens must be an int in \[0, max_length - 2\]"):
        evaluate(model, tokenizer, [LONG], [1], max_length=12, tail_tokens=12)


def test_the_public_centre_embeds_the_same_truncation(tokenizer: Any) -> None:
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=len(tokenizer), max_length=32))
    texts = [LONG, LONG.replace("bad end", "good end")]

    head_only = public_centre(model, tokenizer, texts, max_length=12)
    with_tail = public_centre(model, tokenizer, texts, max_length=12, tail_tokens=4)

    assert head_only != with_tail
    assert public_centre(model, tokenizer, [SHORT], max_length=12) == public_centre(
        model, tokenizer, [SHORT], max_length=12, tail_tokens=4)
    with pytest.raises(ModelConfigError, match=r"tail_tokens must be an int"):
        public_centre(model, tokenizer, texts, max_length=12, tail_tokens=-1)


def test_the_default_tokenizer_keeps_the_verdict() -> None:
    """The default model's tokenizer (what sites and the researcher use) truncates the same way."""
    from models import load_tokenizer

    default = load_tokenizer()
    text = "It starts slowly. " * 60 + "In the end it was wonderful."

    encoded = tokenize(default, [text], max_length=32, tail_tokens=7)

    assert encoded["input_ids"].shape == (1, 32)
    assert default.decode(encoded["input_ids"][0][-8:-1]) == "in the end it was wonderful."
