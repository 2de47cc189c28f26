"""Splitting a data set into disjoint, complete site partitions.

Three schemes, all deterministic for a given seed:

* ``iid``: a uniform shuffle cut into near-equal parts.
* ``label-skew``: for each label, the proportions across sites are drawn from Dirichlet(alpha)
  (Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical Data Distribution"); small alpha
  means each site sees mostly one label.
* ``quantity-skew``: site sizes drawn from Dirichlet(alpha), labels IID within each site.

Every site gets at least a minimum number of rows (default min(10, n / 2N)): quantity skew hands
the minimum out first, label skew tops small sites up from the largest. Every index appears in
exactly one site (checked before returning). Shuffling uses numpy's
PCG64: partitioning is not a secret, so a statistical generator is right here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasites.errors import FedsiteError

SCHEMES = ("iid", "label-skew", "quantity-skew")


@dataclass(frozen=True)
class SiteStats:
    """Size and label balance of one site's partition."""

    site: int
    n: int
    positives: int

    @property
    def positive_fraction(self) -> float:
        return self.positives / self.n if self.n else 0.0


def partition_indices(
    labels: np.ndarray,
    *,
    n_sites: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """Row indices of each site, in a shuffled order; disjoint and together complete."""
    n = len(labels)
    _check_arguments(n, n_sites=n_sites, scheme=scheme, alpha=alpha, min_size=min_size)
    floor = min_size if min_size is not None else max(1, min(10, n // (2 * n_sites)))
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), n_sites)
    elif scheme == "label-skew":
        parts = _label_skew(np.asarray(labels), n_sites, alpha, floor, rng)
    else:
        parts = _quantity_skew(n, n_sites, alpha, floor, rng)
    _check_disjoint_and_complete(parts, n)
    return [np.asarray(part, dtype=np.int64) for part in parts]


def _check_arguments(n: int, *, n_sites: int, scheme: str, alpha: float, min_size: int | None) -> None:
    if scheme not in SCHEMES:
        raise FedsiteError(f"unknown partition scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise FedsiteError(f"--sites must be a positive integer, got {n_sites!r}")
    if n_sites > n:
        raise FedsiteError(f"--sites {n_sites} is larger than the data ({n} rows): use at most {n} sites")
    if min_size is not None and min_size * n_sites > n:
        raise FedsiteError(f"cannot give each of {n_sites} sites {min_size} rows from {n}: lower --sites")
    if not alpha > 0:
        raise FedsiteError(f"--alpha must be > 0, got {alpha}: try 0.5 (skewed) to 100 (near IID)")


def _label_skew(
    labels: np.ndarray, n_sites: int, alpha: float, floor: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per label, split its rows across sites by Dirichlet(alpha) shares."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for c in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for site, chunk in enumerate(np.split(indices, cuts)):
            pieces[site].append(chunk)
    return _top_up([rng.permutation(np.concatenate(p)) for p in pieces], floor, rng)


def _quantity_skew(n: int, n_sites: int, alpha: float, floor: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Site sizes: ``floor`` each, the rest split by Dirichlet(alpha) shares; rows IID."""
    order = rng.permutation(n)
    shares = rng.dirichlet(np.full(n_sites, alpha))
    extra = np.floor(shares * (n - floor * n_sites)).astype(int)
    extra[: (n - floor * n_sites) - int(extra.sum())] += 1  # hand out the rounding remainder
    return np.split(order, np.cumsum(floor + extra)[:-1])


def _top_up(parts: list[np.ndarray], floor: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random rows from the largest sites to any site below ``floor`` (keeps the skew elsewhere)."""
    parts = list(parts)
    for site in range(len(parts)):
        while len(parts[site]) < floor:
            donor = int(np.argmax([len(p) for p in parts]))
            take = min(floor - len(parts[site]), len(parts[donor]) - floor)
            moved, parts[donor] = parts[donor][:take], parts[donor][take:]
            parts[site] = rng.permutation(np.concatenate([parts[site], moved]))
    return parts


def _check_disjoint_and_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if len(joined) != n or not np.array_equal(np.sort(joined), np.arange(n)):
        raise RuntimeError("internal error: partition is not disjoint and complete")


def partition_stats(parts: list[np.ndarray], labels: np.ndarray) -> list[SiteStats]:
    labels = np.asarray(labels)
    return [SiteStats(site=i, n=len(p), positives=int(labels[p].sum())) for i, p in enumerate(parts)]


def render_stats(stats: list[SiteStats]) -> str:
    """A plain-text table, one site a row."""
    lines = ["site   rows    pos    neg  pos-frac"]
    for s in stats:
        lines.append(f"{s.site:>4} {s.n:>6} {s.positives:>6} {s.n - s.positives:>6}  {s.positive_fraction:8.3f}")
    total = sum(s.n for s in stats)
    lines.append(f"total {total:>5}")
    return "\n".join(lines)


def partition_to_upload(data: str | None, *, imdb: str | None, sites: int | None, site_index: int | None,
                        scheme: str, seed: int, alpha: float) -> Any:
    """The reviews ``fedsite admin upload`` uploads: the parquet file ``data``, or partition ``site_index`` of ``sites``."""
    import pandas as pd

    from datasites.data import load_imdb

    if data:
        if not Path(data).is_file():
            raise FedsiteError(f"--data {data} does not exist: pass a parquet file with text and label")
        return pd.read_parquet(data)
    if sites is None or site_index is None:
        raise FedsiteError("pass --data FILE.parquet, or --sites N and --site-index I to take a partition")
    if not 0 <= site_index < sites:
        raise FedsiteError(f"--site-index {site_index} is outside 0..{sites - 1}")
    full = load_imdb(imdb, split="train")
    parts = partition_indices(full["label"].to_numpy(), n_sites=sites, scheme=scheme, seed=seed, alpha=alpha)
    return full.iloc[parts[site_index]].reset_index(drop=True)


def partition_command(imdb: str | None, *, sites: int, scheme: str, seed: int, alpha: float, stats: bool,
                      out: str | None) -> str:
    """``fedsite partition``: the per-site stats (with ``stats``, or without ``out``); with ``out``, the parquet files."""
    from datasites.data import load_imdb

    reviews = load_imdb(imdb, split="train")
    labels = reviews["label"].to_numpy()
    parts = partition_indices(labels, n_sites=sites, scheme=scheme, seed=seed, alpha=alpha)
    lines = [render_stats(partition_stats(parts, labels))] if stats or not out else []
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for site, rows in enumerate(parts):
            reviews.iloc[rows].reset_index(drop=True).to_parquet(folder / f"site-{site}.parquet")
        lines.append(f"wrote {len(parts)} partitions to {folder}/site-<i>.parquet")
    return "\n".join(lines)
