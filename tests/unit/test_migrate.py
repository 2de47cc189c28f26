"""Migrating a format-1 data dir (SHA-256 chains, researchers keyed by e-mail) to format 2, losing no spend."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from datasites.errors import FedsiteError
from datasites.migrate import BACKUP_DIR, migrate_format1
from datasites.sitedir import SiteDir
from policies.accounting import epsilon_of
from policies.approvals import Approval, ApprovalRegistry
from policies.audit import AuditLog, ExecutionAuthorised, LogMigrated, PrivacySpent, RequestApproved
from policies.budget import BudgetBook, PrivacyBudget
from policies.durable import site_journal
from policies.ledger import PrivacyLedger

pytestmark = pytest.mark.unit

RITA = "rita@uni.org"
RITA_ID = "9b2e4f6a8c0d4e1f9a3b5c7d9e1f3a5b"
ADMIN = "admin@site-a.fedsite.org"
WHEN = "2026-01-15T10:00:00.000000+00:00"
CODE_KEPT = hashlib.sha256(b"def kept(): ...\n").hexdigest()
CODE_REVOKED = hashlib.sha256(b"def revoked(): ...\n").hexdigest()
RUN = "run-00112233"
REQUEST_ID = "0123456789abcdef0123456789abcdef"
OLD_LEDGER = Path("ledger") / "imdb" / f"{RITA}.jsonl"
NEW_LEDGER = Path("ledger") / "imdb" / f"{RITA_ID}.jsonl"
SESSIONS = Path("runs") / RUN / "sessions.jsonl"
NEW_SESSIONS = Path("runs") / RITA_ID / RUN / "sessions.jsonl"  # format 2 keeps a run under its researcher
ROUNDS = [(1.1, 0.032, 20), (1.1, 0.032, 20)]  # (noise multiplier, sample rate, steps) of the two spends


# --- the format-1 layout, reproduced here exactly ----------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def write_format1_journal(path: Path, records: list[dict[str, Any]]) -> str:
    """Write ``records`` as a format-1 journal (plain SHA-256 chain from "0" * 64); returns the last hash."""
    prev, lines = "0" * 64, []
    for seq, record in enumerate(records):
        digest = hashlib.sha256(_canonical({"seq": seq, "prev": prev, "record": record}).encode()).hexdigest()
        lines.append(_canonical({"seq": seq, "prev": prev, "record": record, "hash": digest}) + "\n")
        prev = digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return prev


def approval_record(code_hash: str) -> dict[str, Any]:
    return {"kind": "approval", "request_id": REQUEST_ID, "code_hash": code_hash, "researcher": RITA,
            "dataset": "imdb", "plan": {"run_id": RUN}, "calibrated": {"noise_multiplier": 1.1}, "admin": ADMIN,
            "approved_at": WHEN}


def ledger_records() -> list[dict[str, Any]]:
    records, history = [], []
    for index, (sigma, rate, steps) in enumerate(ROUNDS):
        before = epsilon_of(history, delta=1e-5, accountant="prv")
        history.append((sigma, rate, steps))
        records.append({"site": "site-a", "dataset": "imdb", "researcher": RITA, "accountant": "prv",
                        "noise_multiplier": sigma, "sample_rate": rate, "steps": steps, "run_id": RUN,
                        "round_index": index, "delta": 1e-5, "epsilon_before": before,
                        "epsilon_after": epsilon_of(history, delta=1e-5, accountant="prv"), "budget_epsilon": 8.0,
                        "recorded_at": WHEN})
    return records


def audit_records(researcher: str = RITA) -> list[dict[str, Any]]:
    request = {"request_id": REQUEST_ID, "code_hash": CODE_KEPT, "researcher": researcher, "dataset": "imdb",
               "timestamp": WHEN}
    return [
        {"kind": "request_approved", **request, "plan_digest": "b" * 64, "admin": ADMIN},
        {"kind": "execution_authorised", **request, "round": 0},
        {"kind": "privacy_spent", "request_id": REQUEST_ID, "dataset": "imdb", "researcher": researcher,
         "epsilon": 0.4, "delta": 1e-6, "round": 0, "timestamp": WHEN},
        {"kind": "output_released", "request_id": REQUEST_ID, "output_sha256": "c" * 64, "round": 0,
         "timestamp": WHEN},
    ]


def format1_site(root: Path, *, audit_researcher: str = RITA) -> tuple[SiteDir, str]:
    """A format-1 data dir with approvals, an audit log, a ledger and a run; returns it and the audit's last hash."""
    site = SiteDir(root / "site-a")
    site.create(name="site-a", admin_email=ADMIN)
    site.meta_path.write_text(json.dumps({**json.loads(site.meta_path.read_text()), "format": 1}))
    BudgetBook(site.path).set("imdb", PrivacyBudget(epsilon=8.0, delta=1e-5), n_records=500)
    write_format1_journal(site.path / "approvals.jsonl", [
        approval_record(CODE_KEPT), approval_record(CODE_REVOKED),
        {"kind": "revocation", "code_hash": CODE_REVOKED, "reason": "plan changed", "admin": ADMIN},
    ])
    audit_head = write_format1_journal(site.path / "audit.jsonl", audit_records(audit_researcher))
    write_format1_journal(site.path / OLD_LEDGER, ledger_records())
    write_format1_journal(site.path / SESSIONS, [{"session_id": f"{RUN}/0/0", "round": 0, "attempt": 0}])
    return site, audit_head


def snapshot(site: SiteDir) -> dict[str, bytes]:
    """Every file of the data dir but the backup folder, by relative path."""
    return {str(p.relative_to(site.path)): p.read_bytes() for p in sorted(site.path.rglob("*"))
            if p.is_file() and BACKUP_DIR not in p.parts}


def format_of(site: SiteDir) -> int:
    return int(json.loads(site.meta_path.read_text())["format"])


# --- the migration ----------------------------------------------------------------------------------


def test_a_format1_dir_is_refused_by_meta_naming_fedsite_serve(tmp_path: Path) -> None:
    # Prepare
    site, _ = format1_site(tmp_path)

    # Execute / Assert
    with pytest.raises(FedsiteError, match=rf"data dir {site.path} is in Fedsite data format 1 \(researchers keyed "
                                           rf"by e-mail, unkeyed journals\): start the site once \(`fedsite serve "
                                           rf"--data-dir {site.path}`\) to migrate it to format 2; no spend is lost"):
        site.meta()
    assert site.meta(current=False).format == 1


def test_migration_rekeys_every_journal_and_loses_no_spend(tmp_path: Path) -> None:
    # Prepare
    site, old_audit_head = format1_site(tmp_path)
    spent_before = epsilon_of(ROUNDS, delta=1e-5, accountant="prv")
    old_files = {relative: (site.path / relative).read_bytes()
                 for relative in ("approvals.jsonl", "audit.jsonl", str(OLD_LEDGER), str(SESSIONS))}

    # Execute
    done = migrate_format1(site, {RITA: RITA_ID, "bob@uni.org": "0" * 32})

    # Assert: the format
    assert done == ["approvals.jsonl -> approvals.jsonl", "audit.jsonl -> audit.jsonl",
                    f"{OLD_LEDGER} -> {NEW_LEDGER}", f"{SESSIONS} -> {NEW_SESSIONS}"]
    assert format_of(site) == 2
    assert site.meta().format == 2
    # the ledger: moved to the id, every record re-keyed, nothing else changed, the same epsilon
    assert not (site.path / OLD_LEDGER).exists()
    ledger = PrivacyLedger(site.path, "imdb", RITA_ID, site="site-a", accountant="prv")
    assert [dict(r.__dict__) for r in ledger.replay()] == [{**r, "researcher": RITA_ID} for r in ledger_records()]
    assert ledger.spent() == spent_before
    # approvals: found by id, e-mail kept, the revocation still in force
    registry = ApprovalRegistry(site.path)
    assert registry.find(CODE_KEPT, researcher=RITA_ID) == Approval(
        request_id=REQUEST_ID, code_hash=CODE_KEPT, researcher=RITA_ID, researcher_email=RITA, dataset="imdb",
        plan={"run_id": RUN}, calibrated={"noise_multiplier": 1.1}, admin=ADMIN, approved_at=WHEN)
    assert registry.find(CODE_REVOKED, researcher=RITA_ID) is None
    # the audit log: verifies, re-keyed, ends with the old log's head
    report = AuditLog(site.path).verify()
    events = AuditLog(site.path).events()
    assert report.head.n_entries == 5
    assert events[-1] == LogMigrated(from_format=1, to_format=2, old_entries=4, old_head=old_audit_head,
                                     backup=BACKUP_DIR, timestamp=events[-1].timestamp)
    assert isinstance(events[0], RequestApproved) and isinstance(events[1], ExecutionAuthorised)
    assert (events[0].researcher, events[0].researcher_email) == (RITA_ID, RITA)
    assert (events[1].researcher, events[1].researcher_email) == (RITA_ID, RITA)
    assert isinstance(events[2], PrivacySpent) and events[2].researcher == RITA_ID
    # the run's sessions, and the backup of every old journal
    assert not (site.path / SESSIONS).exists()
    sessions = site_journal(site.path, NEW_SESSIONS).entries()
    assert [dict(e.record) for e in sessions] == [{"session_id": f"{RUN}/0/0", "round": 0, "attempt": 0}]
    backup = site.path / BACKUP_DIR
    assert {relative: (backup / relative).read_bytes() for relative in old_files} == old_files


def test_migrating_twice_changes_nothing(tmp_path: Path) -> None:
    # Prepare
    site, _ = format1_site(tmp_path)
    migrate_format1(site, {RITA: RITA_ID})
    after_first = snapshot(site)

    # Execute
    done = migrate_format1(site, {RITA: RITA_ID})

    # Assert
    assert done == []
    assert snapshot(site) == after_first


def test_a_ledger_of_an_email_without_an_account_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    # Prepare
    site, _ = format1_site(tmp_path)
    before = snapshot(site)

    # Execute / Assert
    # every journal is checked before any is written; the first to name the e-mail is the approvals journal
    with pytest.raises(FedsiteError, match=rf"cannot migrate {site.path / 'approvals.jsonl'}: it names researcher "
                                           rf"'{RITA}', who has no account on this site any more"):
        migrate_format1(site, {"bob@uni.org": "0" * 32})
    assert format_of(site) == 1
    assert snapshot(site) == before


def test_after_a_refusal_the_migration_succeeds_once_the_account_exists(tmp_path: Path) -> None:
    # Prepare
    site, _ = format1_site(tmp_path)
    with pytest.raises(FedsiteError, match=r"who has no account on this site any more"):
        migrate_format1(site, {})

    # Execute
    migrate_format1(site, {RITA: RITA_ID})

    # Assert
    assert format_of(site) == 2
    assert PrivacyLedger(site.path, "imdb", RITA_ID, site="site-a").spent() == epsilon_of(
        ROUNDS, delta=1e-5, accountant="prv")


def test_an_audit_event_of_an_email_without_an_account_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    # Prepare: the ledger's researcher has an account, an audit event names one who has not
    site, _ = format1_site(tmp_path, audit_researcher="bob@uni.org")
    before = snapshot(site)

    # Execute / Assert
    with pytest.raises(FedsiteError, match=r"cannot migrate .*audit.jsonl: it names researcher 'bob@uni.org', who "
                                           r"has no account on this site any more"):
        migrate_format1(site, {RITA: RITA_ID})
    assert format_of(site) == 1
    assert snapshot(site) == before


def test_a_format1_journal_with_a_broken_chain_is_refused_naming_it(tmp_path: Path) -> None:
    # Prepare: an edited record whose hash was not recomputed (a cut-off refund would verify: that is format 1)
    site, _ = format1_site(tmp_path)
    ledger = site.path / OLD_LEDGER
    ledger.write_text(ledger.read_text().replace('"steps":20', '"steps":2', 1))
    before = snapshot(site)

    # Execute / Assert
    with pytest.raises(FedsiteError, match=rf"cannot migrate .*{OLD_LEDGER}: line 1 breaks its hash chain; restore "
                                           r"the file from a backup, then start the site again"):
        migrate_format1(site, {RITA: RITA_ID})
    assert format_of(site) == 1
    assert snapshot(site) == before


def test_after_restoring_a_broken_journal_the_migration_succeeds(tmp_path: Path) -> None:
    # Prepare: broken, refused, then restored from the admin's backup as the message says
    site, _ = format1_site(tmp_path)
    ledger = site.path / OLD_LEDGER
    good = ledger.read_bytes()
    shutil.copy(ledger, tmp_path / "admin-backup.jsonl")
    ledger.write_text(ledger.read_text().replace('"steps":20', '"steps":2', 1))
    with pytest.raises(FedsiteError, match=r"line 1 breaks its hash chain"):
        migrate_format1(site, {RITA: RITA_ID})
    shutil.copy(tmp_path / "admin-backup.jsonl", ledger)

    # Execute
    migrate_format1(site, {RITA: RITA_ID})

    # Assert
    assert format_of(site) == 2
    assert (site.path / BACKUP_DIR / OLD_LEDGER).read_bytes() == good
