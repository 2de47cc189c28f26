"""The secure-sum benchmark runs and prints its tables (a smoke test at toy sizes)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[2] / "bench" / "secure_sum.py"


def test_benchmark_prints_generator_and_protocol_tables(capsys, monkeypatch):
    # Prepare: load bench/secure_sum.py as a module (bench/ is not a package)
    spec = importlib.util.spec_from_file_location("secure_sum_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "secure_sum_bench", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)

    # Execute
    status = bench.main(
        ["--sizes", "4096", "--sites", "3", "20", "--secagg-plus", "--dropouts", "1", "--generator-mb", "1"]
    )

    # Assert
    out = capsys.readouterr().out
    assert status == 0
    assert "| AES-128-CTR update_into, 256 KiB buffer (our PRG) |" in out
    assert "| 0.0M | 3 | complete | 1 |" in out
    assert "| 0.0M | 20 | SecAgg+ k=10 | 1 |" in out
