"""bench/federated.py --quick runs a real DP cell through in-process datasites and prints its table."""

import pytest

from tests.conftest import bench_script

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture()
def bench():
    with bench_script("federated") as module:
        yield module


def test_quick_benchmark_reports_accuracy_per_round_and_the_time_breakdown(capsys, bench, imdb_dir):
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
