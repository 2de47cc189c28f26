from __future__ import annotations

import pandas as pd
import pytest

from datasites.errors import FedsiteError
from datasites.mock import MAX_MOCK_ROWS, check_no_private_overlap, make_mock_twin

pytestmark = pytest.mark.unit


def test_mock_has_the_private_schema_and_label_balance(small_reviews: pd.DataFrame) -> None:
    mock = make_mock_twin(small_reviews, seed=0)

    assert list(mock.columns) == ["text", "label"]
    assert mock["label"].dtype == small_reviews["label"].dtype
    assert set(mock["label"].unique()) <= {0, 1}
    assert len(mock) == len(small_reviews)
    assert abs(mock["label"].mean() - small_reviews["label"].mean()) < 0.08
    assert 150 < mock["text"].str.len().mean() < 1500


def test_mock_contains_no_private_review_nor_near_duplicate(imdb_train: pd.DataFrame) -> None:
    private = imdb_train.sample(5000, random_state=1).reset_index(drop=True)

    mock = make_mock_twin(private, seed=3)

    assert not set(mock["text"]) & set(private["text"])
    check_no_private_overlap(mock["text"], imdb_train["text"])  # not even of any other training review


def test_mock_is_deterministic_and_capped(imdb_train: pd.DataFrame) -> None:
    private = imdb_train.sample(MAX_MOCK_ROWS + 500, random_state=2)

    first = make_mock_twin(private, seed=5)
    again = make_mock_twin(private, seed=5)
    other = make_mock_twin(private, seed=6)

    assert len(first) == MAX_MOCK_ROWS
    assert first.equals(again)
    assert not first["text"].equals(other["text"])


def test_mock_texts_look_like_reviews_with_matching_sentiment(small_reviews: pd.DataFrame) -> None:
    mock = make_mock_twin(small_reviews, seed=0)

    positive = " ".join(mock.loc[mock["label"] == 1, "text"])
    negative = " ".join(mock.loc[mock["label"] == 0, "text"])
    assert "recommended" in positive.lower() and "skip it" in negative.lower()
    assert mock["text"].nunique() == len(mock)


def test_overlap_check_refuses_a_verbatim_private_review(small_reviews: pd.DataFrame) -> None:
    leaked = ["An invented review.", small_reviews["text"][3]]

    with pytest.raises(FedsiteError, match=r"mock row 1 is a private review verbatim"):
        check_no_private_overlap(leaked, small_reviews["text"])


def test_overlap_check_refuses_a_lightly_edited_private_review(small_reviews: pd.DataFrame) -> None:
    words = small_reviews["text"][5].split()
    edited = " ".join(["Honestly,"] + words[:-3] + ["THE", "END"])

    with pytest.raises(FedsiteError, match=r"mock row 0 nearly duplicates a private review"):
        check_no_private_overlap([edited], small_reviews["text"])
