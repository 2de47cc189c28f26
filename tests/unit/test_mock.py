"""The mock twin: schema, no private text, and a size and label balance from public defaults or DP counts."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from datasites.admin import upload_partition
from datasites.errors import FedsiteError
from datasites.mock import (
    MAX_MOCK_ROWS,
    MIN_MOCK_ROWS,
    PUBLIC_MOCK_ROWS,
    MockShape,
    check_mock_epsilon,
    check_no_private_overlap,
    describe_mock_record,
    discrete_laplace,
    dp_mock_shape,
    make_mock_twin,
    public_mock_shape,
)
from datasites.sitedir import SiteDir
from fedsite import cli
from policies.budget import PrivacyBudget

pytestmark = pytest.mark.unit


def test_mock_has_the_private_schema_and_the_public_default_size_and_balance(
    small_reviews: pd.DataFrame, imdb_train: pd.DataFrame
) -> None:
    # Prepare: two partitions of other sizes and label balances
    skewed = imdb_train[imdb_train["label"] == 1].head(900)

    # Execute
    mocks = [make_mock_twin(private, seed=0) for private in (small_reviews, skewed)]

    # Assert: nothing of either partition's size or balance shows
    for mock in mocks:
        assert list(mock.columns) == ["text", "label"]
        assert mock["label"].dtype == small_reviews["label"].dtype
        assert len(mock) == PUBLIC_MOCK_ROWS == 200
        assert int(mock["label"].sum()) == PUBLIC_MOCK_ROWS // 2
        assert 150 < mock["text"].str.len().mean() < 1500
    assert mocks[0].equals(mocks[1])


def test_mock_contains_no_private_review_nor_near_duplicate(imdb_train: pd.DataFrame) -> None:
    private = imdb_train.sample(5000, random_state=1).reset_index(drop=True)

    mock = make_mock_twin(private, seed=3, shape=MockShape(rows=MAX_MOCK_ROWS, positives=1000, source="public-defaults"))

    assert not set(mock["text"]) & set(private["text"])
    check_no_private_overlap(mock["text"], imdb_train["text"])  # not even of any other training review


def test_mock_is_deterministic_for_a_seed_and_follows_its_shape(small_reviews: pd.DataFrame) -> None:
    # Prepare
    shape = MockShape(rows=150, positives=40, source="dp-counts", epsilon=0.5)

    # Execute
    first = make_mock_twin(small_reviews, seed=5, shape=shape)
    again = make_mock_twin(small_reviews, seed=5, shape=shape)
    other = make_mock_twin(small_reviews, seed=6, shape=shape)

    # Assert
    assert len(first) == 150 and int(first["label"].sum()) == 40
    assert first.equals(again)
    assert not first["text"].equals(other["text"])


def test_mock_texts_look_like_reviews_with_matching_sentiment(small_reviews: pd.DataFrame) -> None:
    mock = make_mock_twin(small_reviews, seed=0)

    positive = " ".join(mock.loc[mock["label"] == 1, "text"])
    negative = " ".join(mock.loc[mock["label"] == 0, "text"])
    assert "recommended" in positive.lower() and "skip it" in negative.lower()
    assert mock["text"].nunique() == len(mock)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rows": MAX_MOCK_ROWS + 1}, r"mock rows must be an int in \[1, 2000\], got 2001"),
        ({"rows": 0}, r"mock rows must be an int in \[1, 2000\], got 0"),
        ({"positives": 201}, r"mock positives must be an int in \[0, 200\], got 201"),
        ({"source": "exact"}, r"mock source must be one of \('public-defaults', 'dp-counts'\), got 'exact'"),
        ({"epsilon": 1.0}, r"a public-defaults mock spends no epsilon, got epsilon=1.0"),
        ({"source": "dp-counts"}, r"mock_epsilon must be a number in \(0, 10\], got None"),
    ],
)
def test_a_mock_shape_is_range_checked(fields: dict, message: str) -> None:
    with pytest.raises(FedsiteError, match=message):
        MockShape(**({"rows": 200, "positives": 100, "source": "public-defaults"} | fields))


@pytest.mark.parametrize("epsilon", [0, -0.5, 10.5, float("nan"), float("inf"), True, "0.1", None])
def test_the_mock_epsilon_is_range_checked(epsilon: object) -> None:
    with pytest.raises(FedsiteError, match=rf"mock_epsilon must be a number in \(0, 10\], got {epsilon!r}: "
                                           r"e\.g\. 0\.1 noises the label counts"):
        check_mock_epsilon(epsilon)


def test_discrete_laplace_has_the_two_sided_geometric_distribution() -> None:
    # Prepare: P(y) = (1 - e^-eps) / (1 + e^-eps) * e^(-eps |y|)
    epsilon, draws = 1.0, 4000
    ratio = math.exp(-epsilon)

    # Execute
    counts = Counter(discrete_laplace(epsilon=epsilon) for _ in range(draws))

    # Assert: each frequency within 5 standard errors of its probability
    for y in range(-3, 4):
        p = (1 - ratio) / (1 + ratio) * ratio ** abs(y)
        assert abs(counts[y] / draws - p) < 5 * math.sqrt(p * (1 - p) / draws), (y, counts[y])
    assert all(isinstance(y, int) for y in counts)


def test_dp_counts_are_near_the_private_counts_and_vary_between_uploads() -> None:
    # Prepare: 1000 records, 700 positive
    labels = [1] * 700 + [0] * 300

    # Execute
    close = dp_mock_shape(labels, epsilon=1.0)
    loose = [dp_mock_shape(labels, epsilon=0.1) for _ in range(20)]

    # Assert: at epsilon 1 each count moves by ~1.4 (sd); at 0.1 by ~14, so 20 draws are not all equal
    assert close.source == "dp-counts" and close.epsilon == 1.0
    assert abs(close.rows - 1000) <= 20 and abs(close.positives - 700) <= 20
    assert len({shape.rows for shape in loose}) > 1
    assert all(MIN_MOCK_ROWS <= shape.rows <= MAX_MOCK_ROWS for shape in loose)


@pytest.mark.parametrize(("labels", "rows"), [([1, 0] * 5, MIN_MOCK_ROWS), ([1, 0] * 3000, MAX_MOCK_ROWS)])
def test_dp_counts_are_clamped_to_a_sane_size_with_both_labels(labels: list[int], rows: int) -> None:
    # Execute
    shape = dp_mock_shape(labels, epsilon=1.0)
    one_label = dp_mock_shape([1] * 500, epsilon=1.0)

    # Assert
    assert shape.rows == rows and 1 <= shape.positives <= rows - 1
    assert 1 <= one_label.positives <= one_label.rows - 1


def test_the_review_line_names_the_mock_source() -> None:
    # Prepare
    public, noised = public_mock_shape(), MockShape(rows=480, positives=250, source="dp-counts", epsilon=0.25)

    # Execute
    lines = [describe_mock_record(shape.to_record()) for shape in (public, noised)] + [describe_mock_record(None)]

    # Assert
    assert lines[0] == "200 rows, 100 positive, from public defaults (nothing taken from the private partition)"
    assert lines[1].startswith("480 rows, 250 positive, from the private label counts with discrete Laplace noise "
                               "at epsilon=0.25 (a one-off release at upload")
    assert lines[2].startswith("source not recorded")


def test_the_admins_review_shows_the_mock_source() -> None:
    # Prepare
    from datasites.review_queue import RequestSummary, ReviewReport
    from policies.review import review_code

    summary = RequestSummary(request_id="0123456789abcdef0123456789abcdef", function="fedsite_run_0123456789ab",
                             researcher="0" * 32, researcher_email="rita@uni.org", status="pending")
    report = ReviewReport(summary, "def f(): ...\n", review_code("def f(): ...\n"), None, None, None, None, None,
                          mock_twin=describe_mock_record({"source": "dp-counts", "rows": 480, "positives": 250,
                                                          "epsilon": 0.25}))

    # Execute
    text = report.render_text()

    # Assert
    assert "mock twin: 480 rows, 250 positive, from the private label counts with discrete Laplace noise at " \
           "epsilon=0.25" in text


class FakeAdminClient:
    """The two syft calls upload_partition makes: list the datasets, upload one."""

    def __init__(self) -> None:
        self.uploaded: list = []
        self.datasets = SimpleNamespace(get_all=lambda: [])

    def upload_dataset(self, bundle: object) -> None:
        self.uploaded.append(bundle)


@pytest.mark.parametrize("mock_epsilon", [None, 0.5])
def test_upload_records_and_reports_the_mock_source(tmp_path: Path, small_reviews: pd.DataFrame,
                                                    mock_epsilon: float | None) -> None:
    # Prepare
    site = SiteDir(tmp_path / "site-a")
    site.create(name="site-a", admin_email="admin@site-a.fedsite.org")
    client = FakeAdminClient()

    # Execute
    report = upload_partition(client, site, dataset="imdb", reviews=small_reviews,
                              budget=PrivacyBudget(epsilon=8.0, delta=1e-5), mock_epsilon=mock_epsilon)

    # Assert: the upload report, the site's facts and the published mock agree
    recorded = site.dataset_facts("imdb")["mock"]
    published = client.uploaded[0].assets[0].mock
    assert recorded == report.mock.to_record() and report.n_mock == report.mock.rows == len(published)
    assert int(published["label"].sum()) == report.mock.positives
    if mock_epsilon is None:
        assert recorded == {"source": "public-defaults", "rows": 200, "positives": 100}
    else:
        assert recorded["source"] == "dp-counts" and recorded["epsilon"] == 0.5
        assert abs(report.mock.rows - len(small_reviews)) <= 40


def test_upload_refuses_a_bad_mock_epsilon_before_anything_changes(tmp_path: Path,
                                                                  small_reviews: pd.DataFrame) -> None:
    # Prepare
    site = SiteDir(tmp_path / "site-a")
    site.create(name="site-a", admin_email="admin@site-a.fedsite.org")
    client = FakeAdminClient()

    # Execute / Assert
    with pytest.raises(FedsiteError, match=r"mock_epsilon must be a number in \(0, 10\], got 50"):
        upload_partition(client, site, dataset="imdb", reviews=small_reviews,
                         budget=PrivacyBudget(epsilon=8.0, delta=1e-5), mock_epsilon=50)
    assert client.uploaded == []
    with pytest.raises(FedsiteError, match=r"never uploaded"):
        site.dataset_facts("imdb")


def test_the_upload_command_takes_a_mock_epsilon_and_prints_the_mock_source(
    tmp_path: Path, small_reviews: pd.DataFrame, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    data = tmp_path / "partition.parquet"
    small_reviews.to_parquet(data)
    site = SiteDir(tmp_path / "site-a")
    site.create(name="site-a", admin_email="admin@site-a.fedsite.org")
    monkeypatch.setattr(cli, "_admin_client", lambda args: (site, FakeAdminClient()))

    # Execute
    code = cli.main(["admin", "upload", "--data-dir", str(site.path), "--data", str(data), "--epsilon", "8",
                     "--delta", "1e-5", "--mock-epsilon", "0.5"])
    out = capsys.readouterr().out

    # Assert
    assert code == 0
    assert out.startswith("uploaded imdb: 400 private reviews")
    assert "\nmock twin: " in out and "from the private label counts with discrete Laplace noise at epsilon=0.5" in out
    assert site.dataset_facts("imdb")["mock"]["epsilon"] == 0.5


def test_overlap_check_refuses_a_verbatim_private_review(small_reviews: pd.DataFrame) -> None:
    leaked = ["An invented review.", small_reviews["text"][3]]

    with pytest.raises(FedsiteError, match=r"mock row 1 is a private review verbatim"):
        check_no_private_overlap(leaked, small_reviews["text"])


def test_overlap_check_refuses_a_lightly_edited_private_review(small_reviews: pd.DataFrame) -> None:
    words = small_reviews["text"][5].split()
    edited = " ".join(["Honestly,"] + words[:-3] + ["THE", "END"])

    with pytest.raises(FedsiteError, match=r"mock row 0 nearly duplicates a private review"):
        check_no_private_overlap([edited], small_reviews["text"])
