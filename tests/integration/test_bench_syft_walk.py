"""bench/syft_walk.py times syft's result walk against the sites' on a real partition's blob read."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "syft_walk.py"


def test_the_walk_benchmark_prints_both_timings_and_their_ratio(imdb_dir) -> None:  # type: ignore[no-untyped-def]
    # A fresh interpreter: in this one a test may already have built a datasite (which replaces syft's walk).
    run = subprocess.run([sys.executable, str(BENCH), "--data", str(imdb_dir), "--reviews", "200", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, check=False)

    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("blob read of 200 reviews (")
    timings = dict(re.findall(r"^  (syft's walk|sites' walk|syft / sites)\s+([0-9.]+)", run.stdout, re.MULTILINE))
    assert set(timings) == {"syft's walk", "sites' walk", "syft / sites"}
    assert float(timings["syft's walk"]) > 0 and float(timings["sites' walk"]) > 0
