"""bench/federated.py --quick runs a real DP cell through in-process datasites and prints its table."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "federated.py"


def test_quick_benchmark_reports_accuracy_per_round_and_the_time_breakdown(capsys, monkeypatch, imdb_dir):
    # Prepare: load bench/federated.py as a module (bench/ is not a package)
    spec = importlib.util.spec_from_file_location("federated_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "federated_bench", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)

    # Execute: the quick preset (its DP cell and its no-DP cell)
    cells = bench.main(["--quick", "--epsilons", "8,inf", "--data", str(imdb_dir)])

    # Assert: two evaluated rounds per cell, each also scored before its bias calibration, every stage of
    # the DP cell's breakdown measured
    cell, plain = cells
    assert (cell.scheme, cell.epsilon, len(cell.per_round), len(cell.uncalibrated)) == ("iid", 8.0, 2, 2)
    assert (plain.epsilon, len(plain.per_round), len(plain.uncalibrated)) == (float("inf"), 2, 2)
    assert all(0.0 <= a <= 1.0 for a in (*cell.per_round, *cell.uncalibrated))
    assert set(cell.breakdown) == {"dispatch+transfer", "training", "masking", "unmasking", "evaluation"}
    assert cell.breakdown["training"] > 0 and cell.breakdown["dispatch+transfer"] > 0
    trace = " / ".join(f"{a:.3f}" for a in cell.per_round)
    before = " / ".join(f"{a:.3f}" for a in cell.uncalibrated)
    assert f"| iid | 8 | {cell.accuracy:.4f} | {trace} | {before} |" in capsys.readouterr().out
