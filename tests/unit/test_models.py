"""Model construction and trainable-set selection."""

from __future__ import annotations

import pytest
import torch

from models import (
    ModelConfigError,
    TrainableSet,
    build_model,
    default_model_path,
    prompt_head,
    public_centre,
    set_centre,
    set_head,
    tiny_bert_config,
    with_public_start,
)
from tests.models_fixtures import tiny_tokenizer, trainable_parameter_count

pytestmark = pytest.mark.unit


def _trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_full_trains_every_parameter_including_embeddings() -> None:
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="full"))
    names = _trainable_names(model)
    assert names == {name for name, _ in model.named_parameters()}
    assert "bert.embeddings.position_embeddings.weight" in names


def test_top_k_trains_last_layers_pooler_and_classifier() -> None:
    model = build_model(config=tiny_bert_config(layers=3), trainable=TrainableSet(kind="top_k", top_k=1), pooling="cls")
    prefixes = {name.split(".")[0] if name.startswith("classifier") else ".".join(name.split(".")[:4]) for name in _trainable_names(model)}
    assert prefixes == {"bert.encoder.layer.2", "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier"}


def test_lora_trains_adapters_and_head_only() -> None:
    # Prepare / Execute
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="lora", lora_rank=4), pooling="cls")

    # Assert: 2 layers x (query, value) x (A: 4x32, B: 32x4) + head (pooler 32x32+32, classifier 2x32+2)
    names = _trainable_names(model)
    assert sum("lora_A" in n for n in names) == 4 and sum("lora_B" in n for n in names) == 4
    assert trainable_parameter_count(model) == 8 * 128 + (32 * 32 + 32) + (2 * 32 + 2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "prefix"}, r"kind must be one of \('full', 'top_k', 'lora', 'head'\), got 'prefix'"),
        ({"top_k": 0}, r"top_k must be an int in 1..128, got 0"),
        ({"lora_rank": -1}, r"lora_rank must be an int in 1..1024, got -1"),
        ({"lora_rank": 10**7}, r"lora_rank must be an int in 1..1024, got 10000000"),  # terabytes of adapters
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"lora_targets": ("LayerNorm",)}, r"lora_targets contains 'LayerNorm', which is not a supported layer"),
    ],
)
def test_trainable_set_rejects_bad_options(fields: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        TrainableSet(**fields)


def test_top_k_beyond_the_model_depth_is_refused() -> None:
    with pytest.raises(ModelConfigError, match=r"top_k must be <= the model's 2 encoder layers, got 3"):
        build_model(config=tiny_bert_config(layers=2), trainable=TrainableSet(kind="top_k", top_k=3))


@pytest.mark.slow
def test_default_model_loads_offline_from_the_package() -> None:
    # Prepare / Execute
    model = build_model(trainable=TrainableSet(kind="lora"))

    # Assert
    assert (default_model_path() / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.parameters()) > 22_000_000


def test_mean_pooling_is_the_default_and_trains_adapters_and_classifier_only() -> None:
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="lora", lora_rank=4))

    names = _trainable_names(model)
    assert not any("pooler" in n for n in (name for name, _ in model.named_parameters()))
    assert trainable_parameter_count(model) == 8 * 128 + (2 * 32 + 2)
    assert {n for n in names if "lora_" not in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }


def test_mean_pooling_reads_the_masked_mean_and_ignores_padding() -> None:
    torch.manual_seed(0)
    model = build_model(config=tiny_bert_config(vocab_size=40), trainable=TrainableSet(kind="full")).eval()
    input_ids = torch.tensor([[2, 7, 9, 11, 3]])
    padded_ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0]])
    mask, padded_mask = torch.ones_like(input_ids), torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        padded = model(input_ids=padded_ids, attention_mask=padded_mask).logits
        hidden = model.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        expected = model.classifier(hidden.mean(dim=1))

    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(padded, logits, atol=1e-5)


def test_unknown_pooling_is_refused_with_the_choices() -> None:
    with pytest.raises(ModelConfigError, match=r"pooling must be one of \('mean', 'cls'\), got 'max'"):
        build_model(config=tiny_bert_config(), pooling="max")


def test_head_trains_the_classifier_alone() -> None:
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="head"))

    assert _trainable_names(model) == {"classifier.weight", "classifier.bias"}


def test_a_public_centre_makes_the_pooled_embeddings_of_those_texts_zero_mean(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path, words=("good", "bad", "film"))
    texts = ["good film", "bad film", "a good good film", "the film is bad", "film"]
    model = build_model(config=tiny_bert_config(vocab_size=len(tokenizer)), trainable=TrainableSet(kind="lora"))

    centre = public_centre(model, tokenizer, texts)
    set_centre(model, centre)

    head = model.base_model.model
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = head.pool(head.bert(**encoded).last_hidden_state, encoded["attention_mask"]) - head.centre
    assert len(centre) == 32 and max(abs(v) for v in centre) > 1e-3
    assert pooled.mean(dim=0).abs().max() < 1e-5


def test_a_centre_of_the_wrong_size_or_for_a_cls_model_is_refused() -> None:
    model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="full"))
    with pytest.raises(ModelConfigError, match="the centre has 3 values, the model's hidden size is 32"):
        set_centre(model, [0.0, 0.0, 0.0])
    cls_model = build_model(config=tiny_bert_config(), trainable=TrainableSet(kind="full"), pooling="cls")
    with pytest.raises(ModelConfigError, match="pooling='mean'"):
        public_centre(cls_model, None, ["text"])


def _tiny_mean_model(tokenizer, *, trainable: TrainableSet):
    return build_model(config=tiny_bert_config(vocab_size=len(tokenizer)), trainable=trainable)


def test_a_prompt_head_scores_each_text_by_its_nearest_label_description(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path, words=("good", "bad", "film", "great", "awful"))
    model = _tiny_mean_model(tokenizer, trainable=TrainableSet(kind="lora"))
    public = ["good film", "bad film", "a great film", "the film is awful", "film", "good good", "bad awful"]
    prompts = (("bad film", "awful"), ("good film", "great"))
    set_centre(model, public_centre(model, tokenizer, public))

    head_init = prompt_head(model, tokenizer, prompts, public)
    set_head(model, head_init)

    head = model.base_model.model
    encoded = tokenizer(public, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**encoded).logits.double()
        pooled = head.pool(head.bert(**encoded).last_hidden_state, encoded["attention_mask"]).double() - head.centre
        label_means = []
        for texts in prompts:
            e = tokenizer(list(texts), padding=True, return_tensors="pt")
            label_means.append(head.pool(head.bert(**e).last_hidden_state, e["attention_mask"]).double().mean(dim=0))
    # The margin is a positive multiple of the distance difference's linear part: same sign as the
    # projection on (positive mean - negative mean) of the centred embedding, shifted by the bias.
    direction = label_means[1] - label_means[0]
    projection = pooled @ direction
    margin = logits[:, 1] - logits[:, 0]
    assert torch.corrcoef(torch.stack([projection, margin]))[0, 1] > 0.999
    assert logits.mean(dim=0).abs().max() < 1e-5  # the bias centres the public texts' logits
    assert torch.allclose(logits.std(dim=0, correction=0).mean(), torch.tensor(0.5, dtype=torch.float64), atol=1e-5)
    trainable = dict(model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
    assert torch.equal(trainable, torch.tensor(head_init["weight"]))  # the trained copy starts there too


def test_with_public_start_puts_the_centre_and_a_head_in_the_spec_that_every_build_loads() -> None:
    from models import build_from_spec

    spec = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
            "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 3}
    public = ["a good film", "a bad film", "the plot", "great acting", "awful acting"]

    start = with_public_start(spec, public, label_prompts=(("bad",), ("good",)))
    first, tokenizer = build_from_spec(start)
    second, _ = build_from_spec(start)

    pretrained, _ = build_from_spec(spec)  # no centre, no head: the encoder the researcher starts from
    assert start["centre"] == public_centre(pretrained, tokenizer, public)
    again = prompt_head(first, tokenizer, (("bad",), ("good",)), public)  # on the float32 centre: equal to 1e-6
    for key in ("weight", "bias"):
        assert torch.allclose(torch.tensor(start["head_init"][key]), torch.tensor(again[key]), atol=1e-6)
    weight = torch.tensor(start["head_init"]["weight"])
    assert weight.shape == (2, 32) and torch.allclose(weight[0], -weight[1])  # two labels: opposite rows
    for model in (first, second):
        assert torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, weight)
    assert "head_init" not in with_public_start(spec, public, label_prompts=None)
    with pytest.raises(ModelConfigError, match="needs a mean-pooling spec"):
        with_public_start({**spec, "pooling": "cls"}, public)
    with pytest.raises(ModelConfigError, match="label_prompts has 1 labels, the model has 2"):
        with_public_start(spec, public, label_prompts=(("good",),))


def test_bad_label_prompts_or_head_shapes_are_refused(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    model = _tiny_mean_model(tokenizer, trainable=TrainableSet(kind="head"))
    with pytest.raises(ModelConfigError, match="label_prompts has 3 labels, the model has 2"):
        prompt_head(model, tokenizer, (("a",), ("b",), ("c",)), ["text"])
    with pytest.raises(ModelConfigError, match="non-empty list of non-empty strings"):
        prompt_head(model, tokenizer, ("bad", "good"), ["text"])
    with pytest.raises(ModelConfigError, match="at least one public text"):
        prompt_head(model, tokenizer, (("bad",), ("good",)), [])
    with pytest.raises(ModelConfigError, match="do not separate the public texts"):
        prompt_head(model, tokenizer, (("same",), ("same",)), ["a text", "another text"])
    with pytest.raises(ModelConfigError, match=r"head_init has weight \(2, 3\) and bias \(2,\), the classifier needs"):
        set_head(model, {"weight": [[0.0] * 3, [0.0] * 3], "bias": [0.0, 0.0]})


def test_the_tiny_tokenizer_knows_its_words_and_spells_the_rest(tmp_path) -> None:
    tokenizer = tiny_tokenizer(tmp_path, words=("good", "film"))

    ids = tokenizer(["good film", "bad"])["input_ids"]

    assert len(tokenizer) == 5 + 52 + 2
    assert ids[0] == [2, 57, 58, 3]  # [CLS] good film [SEP]
    assert ids[1][1:-1] == tokenizer.convert_tokens_to_ids(["b", "##a", "##d"]) and 1 not in ids[1]  # no [UNK]


def test_dropout_sets_every_dropout_of_the_model_but_not_the_adapters() -> None:
    config = tiny_bert_config()
    model = build_model(config=config, trainable=TrainableSet(kind="lora", lora_dropout=0.2), dropout=0.3)

    probabilities = {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}

    adapters = {name for name in probabilities if "lora_dropout" in name}
    assert adapters and {probabilities[name] for name in adapters} == {0.2}
    others = set(probabilities) - adapters
    assert any("attention.self" in name for name in others) and any(name.endswith("classifier") or
                                                                      name.endswith(".dropout") for name in others)
    assert {probabilities[name] for name in others} == {0.3}
    for bad in (1.0, -0.1, True):
        with pytest.raises(ModelConfigError, match=r"dropout must be None or in \[0, 1\)"):
            build_model(config=tiny_bert_config(), dropout=bad)


def test_a_spec_without_dropout_keeps_the_checkpoints_own() -> None:
    from models import build_from_spec

    spec = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
            "trainable": {"kind": "head"}, "seed": 0}
    kept, _ = build_from_spec(spec)
    off, _ = build_from_spec({**spec, "dropout": 0.25})

    assert {m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}  # tiny_bert_config's
    assert {m.p for m in off.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}


def test_build_from_spec_parses_the_spec_as_a_site_does() -> None:
    from models import ModelSpec, build_from_spec

    spec = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
            "trainable": {"kind": "lora", "lora_rank": 4, "lora_targets": ["query"]}, "seed": 0}

    parsed = ModelSpec.parse(spec)
    from_json, _ = build_from_spec(spec)
    from_spec, _ = build_from_spec(parsed)

    assert parsed.trainable == TrainableSet(kind="lora", lora_rank=4, lora_targets=("query",))
    assert [n for n, _ in from_json.named_parameters()] == [n for n, _ in from_spec.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(from_json.parameters(), from_spec.parameters(), strict=True))
    with pytest.raises(ModelConfigError, match=r"plan\['model'\]\['name'\] '/srv/private-model' is not a model name"):
        build_from_spec({"name": "/srv/private-model", "trainable": {"kind": "head"}})
