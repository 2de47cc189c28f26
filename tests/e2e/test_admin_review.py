"""The admin's review over HTTP: pin a peer, list, show, approve, refuse a forged roster, deny, audit.

The review commands run in this process (``fedsite.cli.main``), against a `fedsite serve` process over
HTTP; a fresh interpreter per command would spend most of the test importing syft and torch again.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsite.cli import main
from models import build_from_spec
from policies.identity import key_fingerprint
from policies.submission import function_name
from policies.syft_client import login, quiet
from researcher.fedavg import flatten_trainable
from researcher.federation import SiteHandle, make_plan, submit
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD
from tests.e2e.conftest import ServedSite, fedsite

pytestmark = pytest.mark.e2e

RESEARCHER = "rita@uni.org"
SPEC = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
        "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 2,
      "target_epsilon": 3.0, "max_length": 64, "max_physical_batch_size": 16}
DENIAL = "the roster pins the wrong key for site-a: check it with the other admins"


def _admin(site: ServedSite, *args: str) -> Any:
    """`fedsite admin ...` in a fresh interpreter."""
    return fedsite("admin", *args, "--data-dir", str(site.data_dir))


class AdminCli:
    """`fedsite admin ...` in this process: (exit code, stdout, stderr)."""

    def __init__(self, site: ServedSite, capsys: pytest.CaptureFixture[str]) -> None:
        self.site, self.capsys = site, capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["admin", *args, "--data-dir", str(self.site.data_dir)])
        out, err = self.capsys.readouterr()
        return code, out, err


def _onboard(site: ServedSite, imdb_dir: Path) -> tuple[str, str]:
    """Upload a 500-review partition, add the researcher; return the identity key the admin publishes and the
    researcher's id that `add-researcher` printed."""
    upload = _admin(site, "upload", "--imdb", str(imdb_dir), "--sites", "50", "--site-index", "0", "--epsilon", "8",
                    "--delta", "1e-5")
    assert upload.returncode == 0, upload.stderr
    added = fedsite("admin", "add-researcher", "--data-dir", str(site.data_dir), "--name", "Rita", "--email",
                    RESEARCHER, env={"FEDSITE_RESEARCHER_PASSWORD": RESEARCHER_PASSWORD})
    assert added.returncode == 0, added.stderr
    researcher_id = re.search(r": id ([0-9a-f]{32}) ", added.stdout)
    assert researcher_id is not None, added.stdout
    identity = _admin(site, "identity")
    assert identity.returncode == 0, identity.stderr
    return str(identity.stdout.splitlines()[1].rsplit(" ", 1)[1]), researcher_id.group(1)


def _other_key() -> str:
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()


PEER_KEY = _other_key()  # the identity key of site-z, the second site of every plan here


def _submit(site: ServedSite, client: Any, key: str, workdir: Path) -> str:
    """Submit a plan for this site (with ``key`` for it) plus site-z; return its run id."""
    model, _ = build_from_spec(SPEC)
    vector, _ = flatten_trainable(model)
    own = SiteHandle(name=site.name, client=client, identity_key=key)
    other = SiteHandle(name="site-z", client=None, identity_key=PEER_KEY)
    plan = make_plan(sites=[own, other], model=SPEC, dp=DP, vector_length=len(vector), clip=0.5)
    submit(own, plan, workdir)
    return plan.run_id


def _listed_ids(admin: AdminCli, researcher_id: str, *run_ids: str) -> list[str]:
    """The short ids `fedsite admin requests` lists for the runs' functions, checking they are pending
    requests of the researcher (its e-mail and the first digits of its id)."""
    code, out, err = admin("requests")
    assert code == 0, err
    rows = {line.split()[1]: line.split() for line in out.splitlines()[2:]}
    assert [rows[function_name(run)][2:] for run in run_ids] == \
        [[RESEARCHER, researcher_id[:12], "pending"]] * len(run_ids), out
    return [rows[function_name(run)][0] for run in run_ids]


def test_admin_reviews_approves_refuses_a_forged_roster_denies_and_audits(  # type: ignore[no-untyped-def]
        serve_site, imdb_dir, tmp_path, capsys, monkeypatch) -> None:
    # Prepare: one site, a researcher, an honest plan and one whose roster pins another key for this site
    monkeypatch.setenv("FEDSITE_ADMIN_PASSWORD", ADMIN_PASSWORD)
    site = serve_site("site-a")
    site.start()
    site.wait_ready()
    key, researcher_id = _onboard(site, imdb_dir)
    admin = AdminCli(site, capsys)
    pinned = admin("peers", "add", "site-z", PEER_KEY)  # site-z's admin told us its key out of band
    researcher = login("http://127.0.0.1", port=site.port, email=RESEARCHER, password=RESEARCHER_PASSWORD)
    run_id = _submit(site, researcher, key, tmp_path / "functions")
    forged_key = _other_key()
    forged_run = _submit(site, researcher, forged_key, tmp_path / "functions")
    honest, forged = _listed_ids(admin, researcher_id, run_id, forged_run)

    # Execute
    shown = admin("show", honest[:8])
    approved = admin("approve", honest)
    refused = admin("approve", forged)
    denied = admin("deny", forged, "--reason", DENIAL)
    audit = admin("audit")
    verified = _admin(site, "audit", "--verify")

    # Assert: the peer was pinned; the honest request was shown clean, its roster pinned, and approved
    assert pinned[0] == 0, pinned[2]
    assert "pinned site-z" in pinned[1] and f"key {key_fingerprint(PEER_KEY)}  {PEER_KEY}" in pinned[1]
    assert shown[0] == 0, shown[2]
    assert f"def {function_name(run_id)}" in shown[1] and "dry run on the mock twin: the model built with" in shown[1]
    assert f"from {RESEARCHER} (id {researcher_id})" in shown[1]
    assert re.search(rf"^ +site-a +key {key_fingerprint(key)}  this site$", shown[1], re.MULTILINE), shown[1]
    assert re.search(rf"^ +site-z +key {key_fingerprint(PEER_KEY)}  pinned$", shown[1], re.MULTILINE), shown[1]
    assert "WARNING" not in shown[1]  # secure noise is on by default
    assert shown[1].rstrip().endswith("no problems: the request can be approved")
    assert approved[0] == 0, approved[2]
    assert approved[1].startswith(f"approved request {honest} from ")
    assert researcher_id in approved[1] and f" on imdb: run {run_id}, 2 rounds" in approved[1]
    assert float(approved[1].split("projected epsilon ")[1].split()[0]) == pytest.approx(3.0, abs=0.05)
    # the forged roster was refused with one line, then denied with a reason the researcher sees
    assert refused[0] == 2
    assert refused[2].startswith(f"fedsite: error: request {forged}")
    assert (f"cannot be approved: roster entry site-a carries key {key_fingerprint(forged_key)}: KEY DIFFERS from "
            f"this site's {key_fingerprint(key)} (a substituted or outdated key)") in refused[2], refused[2]
    assert len(refused[2].strip().splitlines()) == 1, refused[2]
    assert denied[0] == 0, denied[2]
    with quiet():
        reasons = {r.code.service_func_name: r.deny_reason for r in researcher.requests}
    assert reasons[function_name(forged_run)] == DENIAL
    # and the audit trail holds both decisions, intact
    assert [line.split()[2] for line in audit[1].splitlines()[1:]] == ["request_approved", "request_denied"]
    assert verified.returncode == 0, verified.stderr
    assert "2 entries, chain intact" in verified.stdout and "request_denied: 1" in verified.stdout
    assert "approvals journal" in verified.stdout and "1 entries, chain intact" in verified.stdout
