"""The secure-sum benchmark runs and prints its tables (a smoke test at toy sizes)."""

import pytest

from tests.conftest import bench_script

pytestmark = pytest.mark.unit


@pytest.fixture()
def bench():
    with bench_script("secure_sum") as module:
        yield module


def test_benchmark_prints_generator_and_protocol_tables(capsys, bench):
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
