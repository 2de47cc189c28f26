"""bench/federated.py's no-DP cell starts as the centralised non-private row, or from the DP cells' start."""

import pytest

from tests.conftest import bench_script

pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture(scope="module")
def bench():
    with bench_script("federated") as module:
        yield module


def test_the_no_dp_cell_starts_from_the_checkpoint_unless_asked_for_the_dp_start(bench, imdb_dir):
    # Prepare: the quick preset, once as it is and once with the DP cells' start and its own trainable set
    plain = bench.parse_args(["--quick", "--data", str(imdb_dir)])
    recipe = bench.parse_args(["--quick", "--data", str(imdb_dir), "--np-start", "dp", "--np-trainable", "head",
                               "--dropout", "0.05"])

    # Execute
    checkpoint_start = bench.no_dp_start(plain)
    dp_start = bench.no_dp_start(recipe)

    # Assert: the default keeps the checkpoint's dropout and a random head (centred on the public reviews);
    # --np-start dp is the DP cells' start (prompt head, --dropout) with the no-DP cell's trainable set
    assert "centre" in checkpoint_start
    assert "dropout" not in checkpoint_start and "head_init" not in checkpoint_start
    assert dp_start["dropout"] == 0.05 and "head_init" in dp_start and "centre" in dp_start
    assert dp_start["trainable"] == {"kind": "head"}
    assert bench.dp_start(recipe)["trainable"]["kind"] == "lora"
    assert dp_start == bench.dp_start(recipe, "head")
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--np-start", "prompts"])
