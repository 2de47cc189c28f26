"""Content fingerprints of a site's partition.

syft 0.9.5 runs an approved function twice, once on the private asset and once on its mock
(SYFT_NOTES.md, "Policies"). The site records the fingerprint of its private partition at upload
(``<data-dir>/datasets/<name>.json``); the code that spends privacy compares the data it was
handed against it, so it trains and spends only on the private partition and recognises the mock
run without trusting anything the researcher says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


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
