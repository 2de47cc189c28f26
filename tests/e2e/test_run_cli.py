"""`fedsite run init | submit | status | train | report` against two `fedsite serve` sites over HTTP.

The researcher's commands run as a researcher runs them, each in a fresh interpreter (so the run's state
must live in the output dir); the admins' commands run in this process (``fedsite.cli.main``), as in
test_admin_review.py, to spare the imports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedsite.cli import main
from policies.submission import function_name
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD
from tests.e2e.conftest import ServedSite, fedsite

pytestmark = pytest.mark.e2e

RESEARCHER = "rita@uni.org"
DENIAL = "two rounds are too many for this dataset this month: ask again in March"


class Admins:
    """`fedsite admin ...` in this process, for any site: (exit code, stdout, stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, site: ServedSite, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["admin", *args, "--data-dir", str(site.data_dir)])
        out, err = self.capsys.readouterr()
        return code, out, err

    def request_id(self, site: ServedSite, run_id: str) -> str:
        code, out, err = self(site, "requests")
        assert code == 0, err
        ids = [line.split()[0] for line in out.splitlines()[2:] if line.split()[1] == function_name(run_id)]
        assert len(ids) == 1, out
        return ids[0]


def _onboard(admin: Admins, site: ServedSite, index: int) -> str:
    """Upload a 500-review partition and add the researcher; return the site's identity key."""
    uploaded = admin(site, "upload", "--sites", "50", "--site-index", str(index), "--epsilon", "8", "--delta", "1e-5")
    assert uploaded[0] == 0, uploaded[2]
    added = admin(site, "add-researcher", "--name", "Rita", "--email", RESEARCHER)
    assert added[0] == 0, added[2]
    identity = admin(site, "identity")
    assert identity[0] == 0, identity[2]
    return identity[1].splitlines()[1].rsplit(" ", 1)[1]


def run(*args: str) -> tuple[int, str, str]:
    """`fedsite run ...` in a fresh interpreter, with the researcher's password in its variable."""
    done = fedsite("run", *args, env={"FEDSITE_RESEARCHER_PASSWORD": RESEARCHER_PASSWORD}, timeout=600)
    return done.returncode, done.stdout, done.stderr


def _init(toml: Path, sites: list[ServedSite], keys: list[str], imdb_dir: Path, output_dir: str) -> None:
    given = [f"--site={s.name},http://127.0.0.1:{s.port},{key}" for s, key in zip(sites, keys, strict=True)]
    code, out, err = run("init", str(toml), "--quick", "--imdb", str(imdb_dir), "--email", RESEARCHER,
                         "--output-dir", output_dir, *given)
    assert code == 0, err
    assert out.startswith(f"wrote {toml}: edit it, then `fedsite run submit {toml}`")


def _status_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines()[2:-1]}


def test_a_researcher_runs_a_federation_from_run_toml(  # type: ignore[no-untyped-def]
        serve_site, imdb_dir, tmp_path, capsys, monkeypatch) -> None:
    # Prepare: two sites, each with a partition, the researcher's account, and the other's key pinned
    monkeypatch.setenv("FEDSITE_ADMIN_PASSWORD", ADMIN_PASSWORD)
    monkeypatch.setenv("FEDSITE_IMDB", str(imdb_dir))
    monkeypatch.setenv("FEDSITE_RESEARCHER_PASSWORD", RESEARCHER_PASSWORD)
    sites = [serve_site("site-a"), serve_site("site-b")]
    for site in sites:
        site.start()
    for site in sites:
        site.wait_ready()
    admin = Admins(capsys)
    keys = [_onboard(admin, site, index) for index, site in enumerate(sites)]
    assert admin(sites[0], "peers", "add", "site-b", keys[1])[0] == 0
    assert admin(sites[1], "peers", "add", "site-a", keys[0])[0] == 0
    toml = tmp_path / "run.toml"
    _init(toml, sites, keys, imdb_dir, "out")

    # Execute: submit (twice), status before and after both admins approve, train, report
    submitted = run("submit", str(toml))
    again = run("submit", str(toml))
    run_id = json.loads((tmp_path / "out" / "run.json").read_text())["run_id"]
    pending = run("status", str(toml))
    for site in sites:
        approved = admin(site, "approve", admin.request_id(site, run_id))
        assert approved[0] == 0, approved[2]
    approved_status = run("status", str(toml))
    trained = run("train", str(toml), "--no-progress")
    reported = run("report", str(toml))
    final_status = run("status", str(toml))

    # Assert: one request per site, pending until approved; two rounds trained, reported and on disk
    assert submitted[0] == 0, submitted[2]
    assert submitted[1].splitlines()[:2] == ["site-a: submitted", "site-b: submitted"]
    assert f"run {run_id}: plan in {tmp_path / 'out' / 'plan.json'}" in submitted[1]
    assert again[0] == 0, again[2]
    assert again[1].splitlines()[:2] == ["site-a: already submitted", "site-b: already submitted"]
    assert pending[0] == 0, pending[2]
    assert pending[1].splitlines()[0] == f"run {run_id}"
    assert _status_rows(pending[1]) == {"site-a": ["pending"], "site-b": ["pending"]}
    assert pending[1].rstrip().endswith("rounds: 0 done of 2")
    assert _status_rows(approved_status[1]) == {"site-a": ["approved"], "site-b": ["approved"]}, approved_status
    assert trained[0] == 0, trained[2]
    assert trained[1].strip().endswith(f"run {run_id}: 2 rounds done; `fedsite run report {toml}`")
    assert final_status[1].rstrip().endswith("rounds: 2 done, 0 lost of 2")
    document = json.loads((tmp_path / "out" / "train" / "report.json").read_text())
    assert document["run_id"] == run_id and [r["round_index"] for r in document["rounds"]] == [0, 1]
    assert (tmp_path / "out" / "train" / "report.png").stat().st_size > 0
    assert reported[0] == 0, reported[2]
    rows = re.findall(r"^ +([01]) +(0\.\d{3}) \+- (0\.\d{3}) +\d+\.\d{4} +(\d+\.\d{3}) +(\d+\.\d{3})$",
                      reported[1], re.MULTILINE)
    assert [row[0] for row in rows] == ["0", "1"], reported[1]
    assert [float(row[1]) for row in rows] == [pytest.approx(r["accuracy"], abs=5e-4) for r in document["rounds"]]
    assert float(rows[-1][3]) == pytest.approx(document["rounds"][-1]["epsilon_spent"]["site-a"], abs=5e-4)
    assert 0 < float(rows[-1][3]) <= 8.0
    assert f"report: {tmp_path / 'out' / 'train' / 'report.json'}" in reported[1]

    # Execute: a second run from another file, which site-b's admin denies
    second = tmp_path / "second.toml"
    _init(second, sites, keys, imdb_dir, "out-second")
    assert run("submit", str(second))[0] == 0
    second_id = json.loads((tmp_path / "out-second" / "run.json").read_text())["run_id"]
    denied = admin(sites[1], "deny", admin.request_id(sites[1], second_id), "--reason", DENIAL)
    assert denied[0] == 0, denied[2]
    denied_status = run("status", str(second))
    refused = run("train", str(second))

    # Assert: status shows the denial with the admin's reason; train says who has not approved
    assert _status_rows(denied_status[1]) == {"site-a": ["pending"], "site-b": ["denied", DENIAL]}, denied_status
    assert refused[0] == 2
    assert refused[2].strip() == (f"fedsite: error: run {second_id} cannot train yet: site-a pending; site-b denied "
                                  f"({DENIAL}). Training needs every site's approval (`fedsite run status` shows them)")
