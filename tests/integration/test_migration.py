"""A site whose data dir is of format 1 (researchers keyed by e-mail, unkeyed journals) migrates at start, losing no spend."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from datasites.admin import add_researcher, upload_partition
from datasites.server import launch_in_process
from datasites.sitedir import SiteDir
from policies.accounting import PrivacyEvent
from policies.approvals import ApprovalRegistry
from policies.audit import AuditLog, LogMigrated
from policies.budget import PrivacyBudget
from policies.durable import canonical_json
from policies.ledger import PrivacyLedger
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD

pytestmark = pytest.mark.integration

RITA = "rita@uni.org"
CODE = "c" * 64


def write_format1(path: Path, records: list[dict[str, Any]]) -> tuple[int, str]:
    """A journal as Fedsite format 1 wrote it: SHA-256 chained from 64 zeros; returns its (entries, last hash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prev, lines = "0" * 64, []
    for seq, record in enumerate(records):
        digest = hashlib.sha256(canonical_json({"seq": seq, "prev": prev, "record": record}).encode()).hexdigest()
        lines.append(canonical_json({"seq": seq, "prev": prev, "record": record, "hash": digest}) + "\n")
        prev = digest
    path.write_text("".join(lines), encoding="utf-8")
    return len(records), prev


def spends(scratch: Path, researcher: str) -> list[dict[str, Any]]:
    """Two real ledger records (composed by the accountant), keyed as format 1 keyed them: by e-mail."""
    ledger = PrivacyLedger(scratch, "imdb", researcher, site="site-m")
    for round_index in (0, 1):
        ledger.spend(PrivacyEvent(noise_multiplier=1.1, sample_rate=0.1, steps=20, run_id="run-0123456789ab",
                                  round_index=round_index))
    return [{**dict(entry.record), "researcher": RITA} for entry in ledger.journal.entries()]


def test_a_format1_site_migrates_at_start_keyed_by_id_with_every_spend(tmp_path: Path,
                                                                      imdb_train: pd.DataFrame) -> None:
    # Prepare: a site with a researcher and a dataset, then its journals rewritten as format 1 left them
    first = launch_in_process(tmp_path / "site-m", admin_password=ADMIN_PASSWORD, name="site-m")
    admin = first.login(email=first.meta.admin_email, password=ADMIN_PASSWORD)
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    upload_partition(admin, first.site, dataset="imdb", reviews=imdb_train.iloc[:120], budget=budget)
    rita = add_researcher(admin, name="Rita", email=RITA, password=RESEARCHER_PASSWORD)
    first.stop()
    site = SiteDir(tmp_path / "site-m")
    for leftover in [*site.path.glob("*.jsonl*"), *(site.path / "ledger").rglob("*")]:
        if leftover.is_file():
            leftover.unlink()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "budgets.json").write_text((site.path / "budgets.json").read_text())
    ledger_records = spends(scratch, "0" * 32)
    write_format1(site.path / "ledger" / "imdb" / f"{RITA}.jsonl", ledger_records)
    write_format1(site.path / "approvals.jsonl", [
        {"kind": "approval", "request_id": "r" * 32, "code_hash": CODE, "researcher": RITA, "dataset": "imdb",
         "plan": {"run_id": "run-0123456789ab"}, "calibrated": {}, "admin": first.meta.admin_email,
         "approved_at": "2026-11-20T00:00:00+00:00"}])
    old_head = write_format1(site.path / "audit.jsonl", [
        {"kind": "request_approved", "timestamp": "2026-11-20T00:00:00+00:00", "request_id": "r" * 32,
         "code_hash": CODE, "researcher": RITA, "dataset": "imdb", "plan_digest": "d" * 64,
         "admin": first.meta.admin_email},
        {"kind": "privacy_spent", "timestamp": "2026-11-20T00:01:00+00:00", "request_id": "r" * 32,
         "dataset": "imdb", "researcher": RITA, "epsilon": 1.5, "delta": 1e-5, "round": 0}])
    meta = json.loads(site.meta_path.read_text())
    site.meta_path.write_text(json.dumps({**meta, "format": 1}))
    spent_before = PrivacyLedger(scratch, "imdb", "0" * 32, site="site-m").spent()

    # Execute: the next start
    second = launch_in_process(site.path, admin_password=ADMIN_PASSWORD)
    try:
        # Assert: format 2, the ledger under the researcher's id with every spend, approvals and audit re-keyed
        assert second.meta.format == 2
        ledger = PrivacyLedger(site.path, "imdb", rita, site="site-m")
        assert [r.round_index for r in ledger.records()] == [0, 1]
        assert ledger.spent() == pytest.approx(spent_before, rel=1e-9) and ledger.spent() > 0
        assert not (site.path / "ledger" / "imdb" / f"{RITA}.jsonl").exists()
        approval = ApprovalRegistry(site.path).find(CODE, researcher=rita)
        assert approval is not None and approval.researcher_email == RITA
        events = AuditLog(site.path).events()
        assert [e.kind for e in events] == ["request_approved", "privacy_spent", "log_migrated"]
        assert events[0].to_record()["researcher"] == rita and events[0].to_record()["researcher_email"] == RITA
        assert isinstance(events[2], LogMigrated) and (events[2].old_entries, events[2].old_head) == old_head
        assert (site.path / "migrated-from-format-1" / "ledger" / "imdb" / f"{RITA}.jsonl").is_file()
    finally:
        second.stop()
