from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from datasites.data import load_imdb, resolve_source, validate_reviews
from datasites.errors import FedsiteError

pytestmark = pytest.mark.unit


def test_loads_parquet_folder_with_validated_columns(imdb_dir: Path) -> None:
    frame = load_imdb(imdb_dir, split="test")

    assert list(frame.columns) == ["text", "label"]
    assert len(frame) == 25_000
    assert frame["label"].dtype == "int64"
    assert int(frame["label"].sum()) == 12_500


def test_source_comes_from_env_when_not_given(monkeypatch: pytest.MonkeyPatch, imdb_dir: Path) -> None:
    monkeypatch.setenv("FEDSITE_IMDB", str(imdb_dir))

    assert resolve_source(None) == str(imdb_dir)
    assert len(load_imdb(split="train")) == 25_000


def test_default_source_is_the_hugging_face_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSITE_IMDB", raising=False)

    assert resolve_source(None) == "stanfordnlp/imdb"


def _write_acl_imdb(root: Path) -> None:
    for split in ("train", "test"):
        for polarity, texts in (("pos", ["Loved it.", "Wonderful cast."]), ("neg", ["Dull.", "Awful plot.", "Meh."])):
            folder = root / "aclImdb" / split / polarity
            folder.mkdir(parents=True)
            for i, text in enumerate(texts):
                (folder / f"{i}_7.txt").write_text(text)


def test_loads_original_acl_imdb_layout(tmp_path: Path) -> None:
    _write_acl_imdb(tmp_path)

    frame = load_imdb(tmp_path, split="train")

    assert sorted(zip(frame["text"], frame["label"], strict=True)) == [
        ("Awful plot.", 0), ("Dull.", 0), ("Loved it.", 1), ("Meh.", 0), ("Wonderful cast.", 1)]


def test_loads_a_hugging_face_dataset_by_name(tmp_path: Path) -> None:
    local = tmp_path / "my_imdb" / "data"
    local.mkdir(parents=True)
    pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]}).to_parquet(local / "train.parquet")

    frame = load_imdb(f"hf:{tmp_path / 'my_imdb'}", split="train")

    assert frame.to_dict("list") == {"text": ["good", "bad"], "label": [1, 0]}


def test_unknown_hugging_face_name_offline_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(FedsiteError, match=r"could not load Hugging Face dataset 'nobody/none'.*pass --imdb PATH"):
        load_imdb("nobody/none")


def test_missing_folder_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FedsiteError, match=r"does not exist: pass --imdb PATH"):
        load_imdb(tmp_path / "nope")


def test_empty_folder_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FedsiteError, match=r"is empty: copy train.parquet/test.parquet or aclImdb/"):
        load_imdb(tmp_path)


def test_folder_without_data_names_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")

    with pytest.raises(FedsiteError, match=r"has neither train.parquet nor aclImdb/train/\{pos,neg\}"):
        load_imdb(tmp_path)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"review": ["a"], "label": [1]}), r"missing column\(s\) text \(has review, label\)"),
        (pd.DataFrame({"text": ["a", "b"], "label": [1, 2]}), r"labels outside \{0, 1\}: \[2\]"),
        (pd.DataFrame({"text": ["a"], "label": [0.5]}), r"'label' has dtype float64"),
        (pd.DataFrame({"text": ["a"], "label": [True]}), r"'label' has dtype bool"),
        (pd.DataFrame({"text": ["a", "  "], "label": [1, 0]}), r"1 row\(s\) with a missing or empty 'text'"),
        (pd.DataFrame({"text": ["a", None], "label": [1, 0]}), r"1 row\(s\) with a missing or empty 'text'"),
        (pd.DataFrame({"text": [], "label": []}), r"no rows"),
    ],
)
def test_bad_data_is_refused_with_the_problem_named(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(FedsiteError, match=message):
        validate_reviews(frame, origin="x")


def test_validation_keeps_only_text_and_label() -> None:
    frame = pd.DataFrame({"text": ["a"], "label": [1], "extra": [3]})

    clean = validate_reviews(frame, origin="x")

    assert clean.to_dict("list") == {"text": ["a"], "label": [1]}
