"""bench/accuracy.py builds its DP rows' model with the DP recipe's start, and its non-private row without."""

import pytest
import torch
from torch import nn

from researcher.evaluation import evaluate, load_test_subset
from tests.conftest import bench_script

pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture(scope="module")
def bench(imdb_dir):
    with bench_script("accuracy") as module:
        yield module


def _classifier(model: nn.Module) -> nn.Linear:
    (linear,) = [m for name, m in model.named_modules() if name.endswith("classifier.modules_to_save.default")]
    return linear


def test_dp_rows_start_from_the_prompt_head_without_dropout_and_the_non_private_row_does_not(bench, imdb_dir):
    # Prepare: the quick preset's arguments (defaults: --head prompts, --dropout 0)
    args = bench.parse_args(["--quick", "--data", str(imdb_dir)])
    test = load_test_subset(imdb_dir, 200, seed=0)

    # Execute
    private = bench._model(bench._spec(args, private=True), args, torch.device("cpu"))
    non_private = bench._model(bench._spec(args, private=False), args, torch.device("cpu"))

    # Assert: the DP model has no dropout; the non-private one keeps the checkpoint's 0.1
    assert {m.p for m in private.modules() if isinstance(m, nn.Dropout)} == {0.0}
    assert 0.1 in {m.p for m in non_private.modules() if isinstance(m, nn.Dropout)}
    # The DP head is the two-label prompt head (opposite rows) and already classifies; the other is random
    weight = _classifier(private).weight
    assert torch.allclose(weight[0], -weight[1], atol=1e-6)
    assert not torch.allclose(_classifier(non_private).weight[0], -_classifier(non_private).weight[1], atol=1e-3)
    # Every row truncates a longer review to its head and tail: 46 of the quick preset's 64 tokens from the end
    assert args.tail_tokens == 46
    assert bench.parse_args(["--quick", "--data", str(imdb_dir), "--tail-tokens", "0"]).tail_tokens == 0
    zero_shot = evaluate(private, bench.load_tokenizer(None), test["text"].tolist(), test["label"].tolist(), max_length=64,
                         tail_tokens=46)
    assert zero_shot.accuracy > 0.65  # 0.74 on 1,000 reviews at 128 tokens
    # --head random --dropout 0.1 is the earlier recipe: the DP row then starts like the non-private one
    earlier = bench.parse_args(["--quick", "--data", str(imdb_dir), "--head", "random", "--dropout", "0.1"])
    assert torch.equal(_classifier(bench._model(bench._spec(earlier, private=True), earlier, torch.device("cpu"))).weight,
                       _classifier(non_private).weight)
    # --np-start dp gives the non-private row the DP rows' start: the same spec, so the prompt head and no dropout
    recipe = bench.parse_args(["--quick", "--data", str(imdb_dir), "--np-start", "dp"])
    assert bench._spec(recipe, private=False) == bench._spec(args, private=True)
    assert bench._spec(recipe, private=False) != bench._spec(args, private=False)


def test_the_centralised_rows_train_and_evaluate_on_the_federated_benchmarks_reviews(bench, imdb_dir):
    # Prepare: what bench/federated.py --seed 1 gives 3 sites (their IID partitions) and evaluates on
    from datasites.data import load_imdb
    from datasites.partition import partition_indices

    reviews = load_imdb(imdb_dir, split="train")
    parts = partition_indices(reviews["label"].to_numpy(), n_sites=3, scheme="iid", seed=1)
    args = bench.parse_args(["--data", str(imdb_dir), "--train-size", "301", "--test-size", "120", "--seed", "1"])

    # Execute
    (train_texts, train_labels), (test_texts, test_labels) = bench.load_draws(args)

    # Assert: train is each site's first reviews (101 + 100 + 100), test and public the federated draws
    expected = [reviews.iloc[part[:size]] for part, size in zip(parts, (101, 100, 100), strict=True)]
    assert train_texts == [text for frame in expected for text in frame["text"]]
    assert train_labels == [int(label) for frame in expected for label in frame["label"]]
    test = load_test_subset(imdb_dir, 120, seed=0)
    assert (test_texts, test_labels) == (test["text"].tolist(), test["label"].tolist())
    assert bench.public_reviews(args) == load_test_subset(imdb_dir, 256, seed=2)["text"].tolist()
    # With an even split the train set is exactly bench/federated.py's sites' reviews, in site order
    with bench_script("federated") as federated:
        sites = federated.partitions(federated.parse_args(["--data", str(imdb_dir), "--seed", "1", "--reviews-per-site", "100"]),
                                     "iid")
    even = bench.parse_args(["--data", str(imdb_dir), "--train-size", "300", "--test-size", "120", "--seed", "1"])
    assert bench.load_draws(even)[0][0] == [text for site in sites for text in site["text"]]
    # --draws random is the earlier plain sample, another draw
    earlier = bench.parse_args(["--data", str(imdb_dir), "--train-size", "301", "--test-size", "120", "--draws", "random"])
    (random_train, _), _ = bench.load_draws(earlier)
    assert len(random_train) == 301 and random_train != train_texts
    # A train size the partitions cannot hold is refused with the fix
    with pytest.raises(SystemExit, match="choose a smaller --train-size"):
        bench.load_draws(bench.parse_args(["--data", str(imdb_dir), "--train-size", "30000"]))
