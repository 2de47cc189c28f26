"""`fedsite demo --quick`, the README's main command, run as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from policies.review_render import vector_digest
from policies.submission import canonical_plan
from tests.conftest import IMDB_DIR

pytestmark = pytest.mark.e2e


def test_the_quick_demo_reviews_trains_and_reports_the_spend_of_every_site(tmp_path: Path) -> None:
    # Execute: as a user runs it, without --out, from a checkout (here tmp_path)
    done = subprocess.run([sys.executable, "-m", "fedsite", "demo", "--quick", "--imdb", str(IMDB_DIR)],
                          capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)

    # Assert: the default --out is a new runs/demo-<UTC time>/ (git ignores /runs/)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    (out,) = (tmp_path / "runs").glob("demo-*")
    assert re.fullmatch(r"demo-\d{8}T\d{6}Z", out.name) and f"Fedsite demo in {out.resolve()}" in text
    # One review in full, at site-a; the other two sites, whose code and plan are the same, in one line each
    assert len(text.splitlines()) < 200, f"{len(text.splitlines())} lines"
    assert text.count("no problems: the request can be approved") == 1 and "dry run on the mock twin:" in text
    code_sha = re.search(r"^code sha256: ([0-9a-f]{64})$", text, re.MULTILINE)
    assert code_sha is not None
    for site in ("site-b", "site-c"):
        assert re.search(rf"^  {site}: review of [0-9a-f]{{12}}: same code hash {code_sha[1]}, same plan; projected "
                         r"epsilon \d\.\d\d of 8; no problems$", text, re.MULTILINE), site
    # The plan's vectors are summarised by shape, norm and the digest of their exact values, never printed
    (function,) = (out / "researcher" / "functions").glob("fedsite_run_*.py")
    model = canonical_plan(function.read_text(encoding="utf-8"))["model"]
    assert re.search(rf"'centre': <32 numbers, L2 norm [0-9.e+-]+, sha256 {vector_digest(model['centre'])}>", text)
    assert "'weight': <2 x 32 numbers, L2 norm " in text and vector_digest(model["head_init"]["weight"]) in text
    printed = [repr(v) for v in [*model["centre"], *model["head_init"]["weight"][0]] if len(repr(v)) >= 7]
    assert len(printed) > 20 and not [v for v in printed if v in text]
    assert re.search(r"'centre': '<32 values, norm \d+\.\d{3}>'", text)  # the plan line, summarised as before
    assert "'head_init': '<2 x 32 weights and 2 biases>'" in text
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
