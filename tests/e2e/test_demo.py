"""`fedsite demo --quick`, the README's main command, run as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IMDB_DIR

pytestmark = pytest.mark.e2e


def test_the_quick_demo_reviews_trains_and_reports_the_spend_of_every_site(tmp_path: Path) -> None:
    out = tmp_path / "demo"

    done = subprocess.run([sys.executable, "-m", "fedsite", "demo", "--quick", "--imdb", str(IMDB_DIR), "--out",
                           str(out)], capture_output=True, text=True, timeout=600, check=False)

    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "no problems: the request can be approved" in text and "dry run on the mock twin:" in text
    assert re.search(r"'centre': '<32 values, norm \d+\.\d{3}>'", text)  # summarised, not 32 numbers
    assert "'head_init': '<2 x 32 weights and 2 biases>'" in text  # the prompt head, summarised too
    assert "reads 64 tokens of each review (of a longer one its first 16 and last 46)" in text  # head + tail
    assert re.search(r"5\. Done in \d+ s: test accuracy 0\.\d{3} on 200 public test reviews \(0\.\d{3} before the last bias "
                     r"calibration on public reviews\)", text)
    spent = [float(x) for x in re.findall(r"site-[abc]: epsilon spent (\d+\.\d\d) of 8 ", text)]
    assert len(spent) == 3 and all(0 < x <= 8.0 for x in spent)
    report = json.loads(next(out.glob("researcher/run-*/report.json")).read_text())
    assert [r["round_index"] for r in report["rounds"]] == [0, 1]
    assert all(isinstance(r["calibration_shift"], float) and 0 <= r["uncalibrated_accuracy"] <= 1
               for r in report["rounds"])
    assert {site: round(eps, 2) for site, eps in report["rounds"][-1]["epsilon_spent"].items()} == dict(
        zip(("site-a", "site-b", "site-c"), spent, strict=True))
    assert next(out.glob("researcher/run-*/report.png")).stat().st_size > 0


def test_the_demo_refuses_an_output_folder_that_is_not_new(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep me", encoding="utf-8")

    done = subprocess.run([sys.executable, "-m", "fedsite", "demo", "--quick", "--imdb", str(IMDB_DIR), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode != 0
    assert "is not empty: pass --out to a new folder" in done.stderr + done.stdout
    assert (tmp_path / "old.txt").read_text(encoding="utf-8") == "keep me"
