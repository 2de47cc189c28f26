"""Shared fixtures: the IMDB copy beside the checkout, small review samples, strong test secrets; bench/ scripts as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
IMDB_DIR = Path(os.environ.get("FEDSITE_TEST_IMDB", REPO.parent / "shared" / "data" / "imdb"))
ADMIN_PASSWORD = "Site-admin-Pw-2026!"
RESEARCHER_PASSWORD = "Researcher-Pw-2026!"


@contextlib.contextmanager
def bench_script(name: str, module_name: str | None = None) -> Iterator[ModuleType]:
    """``bench/<name>.py`` loaded as a module (bench/ is not a package), in ``sys.modules`` while in use:
    dataclasses look their module up there."""
    module_name = module_name or f"{name}_bench"
    spec = importlib.util.spec_from_file_location(module_name, REPO / "bench" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"bench/{name}.py cannot be loaded as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[module_name]


@pytest.fixture(scope="session")
def imdb_dir() -> Path:
    if not (IMDB_DIR / "train.parquet").is_file():
        pytest.fail(f"IMDB not found at {IMDB_DIR}: tests need ../shared/data/imdb beside the checkout "
                    "(or FEDSITE_TEST_IMDB pointing at a folder with train.parquet/test.parquet)")
    return IMDB_DIR


@pytest.fixture(scope="session")
def imdb_train(imdb_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(imdb_dir / "train.parquet")


@pytest.fixture()
def small_reviews(imdb_train: pd.DataFrame) -> pd.DataFrame:
    """400 shuffled training reviews, both labels present."""
    return imdb_train.sample(400, random_state=7).reset_index(drop=True)
