"""Content fingerprints of a site's partition.

syft 0.9.5 runs an approved function twice, once on the private asset and once on its mock
(docs/syft.md, "Policies, approval and execution"). The site records the fingerprint of its private partition at upload
(``<data-dir>/datasets/<name>.json``); the code that spends privacy compares the data it was
handed against it, so it trains and spends only on the private partition and recognises the mock
run without trusting anything the researcher says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from policies.durable import read_json, write_json_atomic


def partition_fingerprint(texts: Iterable[str], labels: Iterable[int]) -> str:
    """SHA-256 over the length-prefixed (text, label) rows, in order."""
    digest = hashlib.sha256()
    rows = 0
    for text, label in zip(texts, labels, strict=True):
        encoded = str(text).encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
        digest.update(int(label).to_bytes(1, "big", signed=True))
        rows += 1
    digest.update(rows.to_bytes(8, "big"))
    return digest.hexdigest()


DATASETS_DIR = "datasets"


class UnknownDatasetError(LookupError):
    """The site has no record of an uploaded dataset by that name."""


def dataset_facts_path(data_dir: Path, dataset: str) -> Path:
    return Path(data_dir) / DATASETS_DIR / f"{dataset}.json"


def record_dataset_facts(data_dir: Path, dataset: str, facts: Mapping[str, Any]) -> None:
    """What the site's policies need to know of an uploaded dataset (fingerprint, size), written atomically."""
    if not isinstance(facts.get("fingerprint"), str) or not isinstance(facts.get("n_records"), int):
        raise ValueError("dataset facts need a 'fingerprint' (str) and 'n_records' (int)")
    write_json_atomic(dataset_facts_path(data_dir, dataset), dict(facts))


def read_dataset_facts(data_dir: Path, dataset: str) -> dict[str, Any]:
    path = dataset_facts_path(data_dir, dataset)
    if not path.is_file():
        raise UnknownDatasetError(f"dataset {dataset!r} was never uploaded to this site: run `fedsite admin upload`")
    return dict(read_json(path))
