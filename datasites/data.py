"""Loading and validating the IMDB reviews (Maas et al., ACL 2011) from any of three sources.

A source is one of:

* a folder holding ``train.parquet`` / ``test.parquet`` (columns ``text``, ``label``), such as
  ``../shared/data/imdb``;
* an ``aclImdb/`` folder as released by Maas et al. (``train/pos/*.txt``, ``train/neg/*.txt``, ...),
  or a folder that contains one;
* a Hugging Face dataset name (default ``stanfordnlp/imdb``), for machines with internet; write
  ``hf:NAME`` to force this reading when NAME also looks like a path.

The source comes from the caller, else the ``FEDSITE_IMDB`` environment variable, else the default.
Every source is validated the same way: columns ``text`` (non-empty str) and ``label`` (integer 0 or 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from datasites.errors import FedsiteError

DEFAULT_HF_DATASET = "stanfordnlp/imdb"
SOURCE_ENV = "FEDSITE_IMDB"
SPLITS = ("train", "test")


def resolve_source(source: str | os.PathLike[str] | None) -> str:
    """The source to read: the argument, else ``$FEDSITE_IMDB``, else the Hugging Face default."""
    if source is not None and str(source) != "":
        return str(source)
    return os.environ.get(SOURCE_ENV) or DEFAULT_HF_DATASET


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.path.exists(source)


def load_imdb(source: str | os.PathLike[str] | None = None, *, split: str = "train") -> pd.DataFrame:
    """Load one split as a DataFrame with exactly the columns ``text`` (str) and ``label`` (int64)."""
    if split not in SPLITS:
        raise FedsiteError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    resolved = resolve_source(source)
    if resolved.startswith("hf:"):
        frame = _load_hf(resolved[3:], split)
    elif _looks_like_path(resolved):
        frame = _load_folder(Path(resolved).expanduser(), split)
    else:
        frame = _load_hf(resolved, split)
    return validate_reviews(frame, origin=f"{resolved} ({split})")


def _load_folder(folder: Path, split: str) -> pd.DataFrame:
    if not folder.is_dir():
        raise FedsiteError(f"IMDB folder {folder} does not exist: pass --imdb PATH to a folder with {split}.parquet")
    if not any(folder.iterdir()):
        raise FedsiteError(f"IMDB folder {folder} is empty: copy train.parquet/test.parquet or aclImdb/ into it")
    parquet = folder / f"{split}.parquet"
    if parquet.is_file():
        return pd.read_parquet(parquet)
    for candidate in (folder, folder / "aclImdb"):
        if (candidate / split / "pos").is_dir() and (candidate / split / "neg").is_dir():
            return _load_acl_imdb(candidate, split)
    raise FedsiteError(
        f"IMDB folder {folder} has neither {split}.parquet nor aclImdb/{split}/{{pos,neg}}: "
        "point --imdb at the folder that holds them"
    )


def _load_acl_imdb(root: Path, split: str) -> pd.DataFrame:
    """Read the original release: one review per file, the folder name is the label."""
    texts: list[str] = []
    labels: list[int] = []
    for label, polarity in ((0, "neg"), (1, "pos")):
        for path in sorted((root / split / polarity).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8"))
            labels.append(label)
    return pd.DataFrame({"text": texts, "label": labels})


def _load_hf(name: str, split: str) -> pd.DataFrame:
    import datasets  # deferred: importing datasets costs ~1 s

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise FedsiteError(
            f"could not load Hugging Face dataset {name!r} split {split!r} ({type(exc).__name__}: {exc}); "
            f"offline, pass --imdb PATH or set {SOURCE_ENV} to a folder with {split}.parquet"
        ) from exc
    return dataset.to_pandas()


def validate_reviews(frame: pd.DataFrame, *, origin: str) -> pd.DataFrame:
    """Check columns, types and labels; return a clean copy with only ``text`` and ``label``."""
    missing = [column for column in ("text", "label") if column not in frame.columns]
    if missing:
        raise FedsiteError(
            f"{origin}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, frame.columns))}): "
            "the data needs a 'text' column of reviews and a 'label' column of 0/1"
        )
    if len(frame) == 0:
        raise FedsiteError(f"{origin}: no rows: the data set is empty")
    text = frame["text"]
    if text.isna().any() or not text.map(lambda value: isinstance(value, str) and value.strip() != "").all():
        bad = int((~text.map(lambda value: isinstance(value, str) and value.strip() != "")).sum())
        raise FedsiteError(f"{origin}: {bad} row(s) with a missing or empty 'text': remove them first")
    labels = frame["label"]
    if not pd.api.types.is_integer_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        raise FedsiteError(f"{origin}: 'label' has dtype {labels.dtype}: labels must be integers 0 or 1")
    outside = sorted(set(labels.unique().tolist()) - {0, 1})
    if outside:
        raise FedsiteError(f"{origin}: labels outside {{0, 1}}: {outside[:5]}: recode them as 0 (neg) and 1 (pos)")
    return pd.DataFrame({"text": text.astype(str).to_numpy(), "label": labels.astype("int64").to_numpy()})
