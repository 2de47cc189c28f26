from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasites.errors import FedsiteError
from datasites.partition import partition_indices, partition_stats, render_stats

pytestmark = pytest.mark.unit


def _labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=n)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=40, max_value=3000),
    n_sites=st.integers(min_value=1, max_value=10),
    scheme=st.sampled_from(["iid", "label-skew", "quantity-skew"]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_every_scheme_is_disjoint_and_complete(n: int, n_sites: int, scheme: str, seed: int) -> None:
    labels = _labels(n, seed % 1000)

    parts = partition_indices(labels, n_sites=n_sites, scheme=scheme, seed=seed, alpha=1.0)

    assert len(parts) == n_sites
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "label-skew", "quantity-skew"])
def test_same_seed_same_partition_other_seed_other_partition(scheme: str) -> None:
    labels = _labels(1000)

    first = partition_indices(labels, n_sites=4, scheme=scheme, seed=11)
    again = partition_indices(labels, n_sites=4, scheme=scheme, seed=11)
    other = partition_indices(labels, n_sites=4, scheme=scheme, seed=12)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sites_have_equal_size_and_balanced_labels(imdb_train) -> None:  # type: ignore[no-untyped-def]
    labels = imdb_train["label"].to_numpy()

    stats = partition_stats(partition_indices(labels, n_sites=5, scheme="iid", seed=0), labels)

    assert [s.n for s in stats] == [5000] * 5
    assert all(abs(s.positive_fraction - 0.5) < 0.03 for s in stats)


def test_small_alpha_label_skew_is_skewed_large_alpha_is_not(imdb_train) -> None:  # type: ignore[no-untyped-def]
    labels = imdb_train["label"].to_numpy()

    skewed = partition_stats(partition_indices(labels, n_sites=3, scheme="label-skew", alpha=0.1, seed=1), labels)
    mild = partition_stats(partition_indices(labels, n_sites=3, scheme="label-skew", alpha=1000.0, seed=1), labels)

    assert max(abs(s.positive_fraction - 0.5) for s in skewed) > 0.25
    assert max(abs(s.positive_fraction - 0.5) for s in mild) < 0.03


def test_quantity_skew_sizes_differ_but_labels_stay_balanced() -> None:
    labels = _labels(20_000)

    stats = partition_stats(partition_indices(labels, n_sites=4, scheme="quantity-skew", alpha=0.5, seed=3), labels)

    sizes = [s.n for s in stats]
    assert max(sizes) > 2 * min(sizes)
    # Sites of more than 500 rows keep the overall label balance. The largest site holds at least a quarter
    # of the 20,000 rows whatever the draw, so the check always covers at least one site.
    large = [s for s in stats if s.n > 500]
    assert max(sizes) >= len(labels) // 4 and len(large) >= 1
    assert all(abs(s.positive_fraction - labels.mean()) < 0.1 for s in large)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_sites": 11}, r"--sites 11 is larger than the data \(10 rows\): use at most 10 sites"),
        ({"n_sites": 0}, r"--sites must be a positive integer, got 0"),
        ({"n_sites": True}, r"--sites must be a positive integer, got True"),
        ({"n_sites": 2, "scheme": "zipf"}, r"unknown partition scheme 'zipf'"),
        ({"n_sites": 2, "scheme": "label-skew", "alpha": 0.0}, r"--alpha must be > 0, got 0.0"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(FedsiteError, match=message):
        partition_indices(_labels(10), **kwargs)


def test_impossible_minimum_size_names_the_fix() -> None:
    with pytest.raises(FedsiteError, match=r"cannot give each of 10 sites 11 rows from 100: lower --sites"):
        partition_indices(_labels(100), n_sites=10, scheme="quantity-skew", alpha=0.01, min_size=11, seed=0)


@pytest.mark.parametrize("scheme", ["label-skew", "quantity-skew"])
def test_every_site_gets_the_minimum_even_when_very_skewed(scheme: str) -> None:
    parts = partition_indices(_labels(176), n_sites=8, scheme=scheme, alpha=0.05, min_size=10, seed=3)

    assert min(len(p) for p in parts) >= 10
    assert sum(len(p) for p in parts) == 176


def test_stats_table_lists_each_site_and_the_total() -> None:
    labels = np.array([1, 0, 1, 1, 0, 0])

    text = render_stats(partition_stats([np.array([0, 2]), np.array([1, 3, 4, 5])], labels))

    assert text.splitlines() == [
        "site   rows    pos    neg  pos-frac",
        "   0      2      2      0     1.000",
        "   1      4      1      3     0.250",
        "total     6",
    ]
