"""syft's result walk against the sites' fixed walk, on a blob read of a real partition.

Every blob read of a site's private partition returns a ``SyftObjectRetrieval`` holding the
serialised DataFrame, and syft's service layer walks that result to stamp the syft objects in it
(``attach_attribute_to_syft_object``); a site does several such reads per approved call. This times
syft's walk and ``datasites.syft_speedups.attach_attributes`` on the same object, in one run:

    python bench/syft_walk.py --reviews 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasites.data import load_imdb  # noqa: E402
from datasites.syft_speedups import attach_attributes  # noqa: E402
from policies.syft_client import quiet  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "imdb"


def seconds(walk: Callable[..., None], result: Any, repeats: int) -> float:
    """Median wall seconds of one walk over ``result``."""
    stamp = {"syft_server_location": None, "syft_client_verify_key": None}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        walk(result=result, attr_dict=stamp)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.parquet")
    parser.add_argument("--reviews", type=int, default=1000, help="rows of the partition")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    with quiet():
        from syft.serde.serialize import _serialize as serialize
        from syft.store.blob_storage import SyftObjectRetrieval
        from syft.types.syft_object import attach_attribute_to_syft_object as syft_walk

    if syft_walk is attach_attributes:
        raise SystemExit("syft's walk is already replaced in this process: run the benchmark in a fresh one")
    partition = load_imdb(args.data, split="train").iloc[: args.reviews].reset_index(drop=True)
    blob = serialize(partition, to_bytes=True)
    result = SyftObjectRetrieval(file_name="partition", syft_object=blob)
    theirs = seconds(syft_walk, result, args.repeats)
    ours = seconds(attach_attributes, result, args.repeats)
    print(f"blob read of {args.reviews} reviews ({len(blob) / 1e6:.2f} MB serialised), median of {args.repeats}:")
    print(f"  syft's walk   {theirs * 1e3:9.1f} ms")
    print(f"  sites' walk   {ours * 1e3:9.3f} ms")
    print(f"  syft / sites  {theirs / ours:9.0f}x")
    return {"syft_s": theirs, "sites_s": ours, "megabytes": len(blob) / 1e6}


if __name__ == "__main__":
    main()
