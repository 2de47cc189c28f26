"""The audit log: typed round trip, restart, every kind of tampering, concurrent appends."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
from pathlib import Path

import pytest

from policies import durable
from policies.audit import (
    AUDIT_FILE,
    ApiCallRefused,
    AuditEvent,
    AuditEventError,
    AuditHead,
    AuditIntegrityError,
    AuditLog,
    ExecutionAuthorised,
    ExecutionRefused,
    LogMigrated,
    OutputReleased,
    PrivacySpent,
    RequestApproved,
    RequestDenied,
)
from policies.durable import (
    HashChainedJournal,
    JournalEntry,
    canonical_json,
    journal_key,
    sha256_hex,
    site_journal,
)

pytestmark = pytest.mark.unit

CODE_HASH = sha256_hex("def train(): ...\n")
OTHER_KEY = b"m" * 32  # a forger's key: not the site's journal key
PLAN_DIGEST = sha256_hex('{"rounds":3}')
WHEN = "2025-03-01T12:00:00.000000+00:00"
RESEARCHER_ID = "3f2a9c41d7e84b0c9a1f5e6d2b7c8a90"
REQUEST = {"request_id": "req-1", "code_hash": CODE_HASH, "researcher": RESEARCHER_ID,
           "researcher_email": "r@uni.edu", "dataset": "imdb"}


def one_of_each() -> list[AuditEvent]:
    return [
        RequestApproved(**REQUEST, plan_digest=PLAN_DIGEST, admin="admin@site", timestamp=WHEN),
        RequestDenied(**REQUEST, admin="admin@site", reason="reads files", timestamp=WHEN),
        ExecutionAuthorised(**REQUEST, round=0, timestamp=WHEN),
        ExecutionRefused(**REQUEST, round=None, reason="code hash differs from the approved one", timestamp=WHEN),
        PrivacySpent(request_id="req-1", dataset="imdb", researcher=RESEARCHER_ID, epsilon=0.5, delta=1e-6, round=0),
        OutputReleased(request_id="req-1", output_sha256=sha256_hex(b"update"), round=0),
        ApiCallRefused(path="dataset.get_all", caller=RESEARCHER_ID, caller_email="r@uni.edu", role="DATA_SCIENTIST",
                       reason="only the site's admin may call dataset.get_all", timestamp=WHEN),
        LogMigrated(from_format=1, to_format=2, old_entries=4, old_head="a" * 64, backup="migrated-from-format-1",
                    timestamp=WHEN),
    ]


def filled_log(directory: Path) -> AuditLog:
    log = AuditLog(directory)
    for event in one_of_each()[:4]:
        log.record(event)
    return log


def lines_of(log: AuditLog) -> list[str]:
    return log.path.read_text(encoding="utf-8").splitlines(keepends=True)


def write_lines(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("".join(lines), encoding="utf-8")


# --- round trip and restart ---------------------------------------------------------------------


def test_events_come_back_typed_and_equal_for_every_kind(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path)
    recorded = one_of_each()

    # Execute
    heads = [log.record(event) for event in recorded]
    read_back = log.events()

    # Assert
    assert read_back == recorded
    assert [type(event) for event in read_back] == [type(event) for event in recorded]
    assert [head.n_entries for head in heads] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert heads[-1] == log.head()
    assert log.path == tmp_path / AUDIT_FILE


def test_a_new_audit_log_on_the_same_dir_replays_identically(tmp_path: Path) -> None:
    # Prepare
    first = AuditLog(tmp_path)
    for event in one_of_each():
        first.record(event)

    # Execute
    restarted = AuditLog(tmp_path)

    # Assert
    assert restarted.events() == first.events()
    assert restarted.head() == first.head()
    assert restarted.verify().by_kind == (
        ("api_call_refused", 1),
        ("execution_authorised", 1),
        ("execution_refused", 1),
        ("log_migrated", 1),
        ("output_released", 1),
        ("privacy_spent", 1),
        ("request_approved", 1),
        ("request_denied", 1),
    )


def test_empty_log_has_the_keyed_genesis_head_and_verifies(tmp_path: Path) -> None:
    # Execute
    report = AuditLog(tmp_path).verify()

    # Assert: the genesis is HMAC-SHA256 under the site's journal key of the log's label
    genesis = hmac.new(journal_key(tmp_path), canonical_json({"genesis": AUDIT_FILE}).encode(), hashlib.sha256)
    assert report.head == AuditHead(0, genesis.hexdigest())
    assert report.head.last_hash != "0" * 64
    assert report.torn_tail_bytes == 0
    assert AuditLog(tmp_path).events() == []


def test_report_renders_counts_anchor_and_warnings(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    anchor = log.head()

    # Execute
    text = log.verify(anchor=anchor).render_text()

    # Assert
    assert text.splitlines() == [
        f"audit log {log.path}: 4 entries, chain intact, head {anchor.last_hash}",
        "  execution_authorised: 1",
        "  execution_refused: 1",
        "  request_approved: 1",
        "  request_denied: 1",
        f"  matches anchor (4, {anchor.last_hash})",
    ]


# --- tampering ----------------------------------------------------------------------------------


def test_an_edited_line_is_named(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    lines = lines_of(log)
    lines[1] = lines[1].replace("reads files", "looked fine")
    write_lines(log, lines)

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 2 was modified after it was written, or written without "
                                                  r"this site's journal key \(MAC mismatch\)"):
        log.verify()


def test_a_deleted_line_breaks_the_chain(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    lines = lines_of(log)
    write_lines(log, lines[:1] + lines[2:])

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 2 breaks the chain \(an entry was removed, reordered"):
        log.verify()


def test_reordered_lines_break_the_chain(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    lines = lines_of(log)
    write_lines(log, [lines[0], lines[2], lines[1], lines[3]])

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 2 breaks the chain"):
        log.verify()


def test_an_appended_forged_line_with_a_wrong_prev_hash_breaks_the_chain(tmp_path: Path) -> None:
    # Prepare: a well-formed entry that claims to follow some other chain
    log = filled_log(tmp_path)
    forged_event = RequestApproved(**REQUEST, plan_digest=PLAN_DIGEST, admin="mallory", timestamp=WHEN)
    forged = JournalEntry.seal(OTHER_KEY, 4, "f" * 64, forged_event.to_record())
    write_lines(log, [*lines_of(log), forged.to_line() + "\n"])

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 5 breaks the chain"):
        log.events()


@pytest.mark.parametrize("forger", ["another key", "unkeyed sha-256"])
def test_a_forger_without_the_key_cannot_append_a_valid_line(tmp_path: Path, forger: str) -> None:
    # Prepare: a well-formed entry chained to the real last MAC, sealed without the site's key
    log = filled_log(tmp_path)
    last = log.head().last_hash
    record = RequestApproved(**REQUEST, plan_digest=PLAN_DIGEST, admin="mallory", timestamp=WHEN).to_record()
    if forger == "another key":
        forged = JournalEntry.seal(OTHER_KEY, 4, last, record)
    else:
        forged = JournalEntry(4, last, record, sha256_hex(canonical_json({"seq": 4, "prev": last, "record": record})))
    write_lines(log, [*lines_of(log), forged.to_line() + "\n"])

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 5 was modified after it was written, or written without "
                                                  r"this site's journal key \(MAC mismatch\)"):
        log.verify()
    with pytest.raises(AuditIntegrityError, match=r"nothing recorded: .*line 5 .*\(MAC mismatch\)"):
        log.record(ExecutionAuthorised(**REQUEST, round=1))


def test_truncation_at_a_line_boundary_is_caught_by_the_head_file(tmp_path: Path) -> None:
    # Prepare: the shorter chain is intact on its own (the unkeyed format accepted it)
    log = filled_log(tmp_path)
    write_lines(log, lines_of(log)[:-1])
    before = log.path.read_bytes()

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"has 3 entries but its head file records 4: its last entries "
                                                  r"were removed \(truncated or rolled back\)"):
        log.verify()
    with pytest.raises(AuditIntegrityError, match=r"nothing recorded: .*has 3 entries but its head file records 4"):
        log.record(ExecutionAuthorised(**REQUEST, round=1))
    assert log.path.read_bytes() == before


def test_truncation_inside_the_last_line_is_caught_by_the_head_file(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    log.path.write_bytes(log.path.read_bytes()[:-10])

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"has 3 entries but its head file records 4"):
        log.verify()


def test_a_torn_tail_from_a_crash_is_flagged_and_the_anchor_still_matches(tmp_path: Path) -> None:
    # Prepare: a crash mid-append leaves part of a line and the head unchanged
    log = filled_log(tmp_path)
    anchor = log.head()
    with open(log.path, "ab") as handle:
        handle.write(b'{"seq":4,"prev":"ab')

    # Execute
    report = log.verify(anchor=anchor)

    # Assert
    assert report.head == anchor
    assert report.torn_tail_bytes == 19
    assert report.warnings[0].startswith("19 bytes after the last complete entry are ignored")


def test_a_rollback_of_log_and_head_is_caught_in_process_and_by_the_anchor_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: copy log and head after 3 entries, record a 4th, restore both copies
    log = AuditLog(tmp_path)
    for event in one_of_each()[:3]:
        log.record(event)
    saved = log.path.read_bytes(), log.path.with_name(AUDIT_FILE + ".head").read_bytes()
    log.record(one_of_each()[3])
    anchor = log.head()
    log.path.write_bytes(saved[0])
    log.path.with_name(AUDIT_FILE + ".head").write_bytes(saved[1])

    # Execute / Assert: this process remembers the longer head
    with pytest.raises(AuditIntegrityError, match=r"has 3 entries but its last head seen by this process records 4"):
        log.verify()

    # Execute: a restarted site has forgotten it; the copy is consistent on its own
    monkeypatch.setattr(durable, "_seen_heads", {})
    unanchored = AuditLog(tmp_path).verify()

    # Assert: only the anchor tells
    assert unanchored.head.n_entries == 3
    assert "no anchor given" in unanchored.warnings[0]
    with pytest.raises(AuditIntegrityError, match=r"has 3 entries but the anchor has 4: entries were removed"):
        AuditLog(tmp_path).verify(anchor=anchor)


def test_a_rewrite_by_a_key_holder_is_caught_in_process_and_by_the_anchor_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: someone holding the journal key recomputes every MAC after changing the denial reason
    log = filled_log(tmp_path)
    anchor = log.head()
    records = [dict(event.to_record()) for event in log.events()]
    records[1]["reason"] = "looked fine"
    rewritten = HashChainedJournal(tmp_path / "elsewhere" / AUDIT_FILE, key=journal_key(tmp_path), label=AUDIT_FILE)
    for record in records:
        rewritten.append(record)
    log.path.write_bytes(rewritten.path.read_bytes())
    log.path.with_name(AUDIT_FILE + ".head").write_bytes(rewritten.head_path.read_bytes())

    # Execute / Assert: this process remembers the MAC of entry 4
    with pytest.raises(AuditIntegrityError, match=r"entry 4 differs from its last head seen by this process: the "
                                                  r"journal was rewritten"):
        log.verify()

    # Execute: after a restart
    monkeypatch.setattr(durable, "_seen_heads", {})
    unanchored = AuditLog(tmp_path).verify()

    # Assert
    assert unanchored.head.n_entries == 4
    assert AuditLog(tmp_path).events()[1].reason == "looked fine"  # type: ignore[attr-defined]
    with pytest.raises(AuditIntegrityError, match=r"entry 4 has hash [0-9a-f]{64} but the anchor has .*rewritten"):
        AuditLog(tmp_path).verify(anchor=anchor)


def test_an_anchor_from_an_earlier_point_still_matches_a_longer_log(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    anchor = log.head()
    log.record(ExecutionAuthorised(**REQUEST, round=1))

    # Execute
    report = log.verify(anchor=anchor)

    # Assert
    assert report.head.n_entries == 5
    assert report.anchor == anchor


def test_record_refuses_to_extend_a_tampered_log(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    lines = lines_of(log)
    lines[0] = lines[0].replace("admin@site", "someone-else")
    write_lines(log, lines)
    before = log.path.read_bytes()

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"nothing recorded: .*line 1 was modified"):
        log.record(ExecutionAuthorised(**REQUEST, round=1))
    assert log.path.read_bytes() == before


# --- strict decoding ----------------------------------------------------------------------------


def test_an_unknown_kind_with_an_intact_chain_is_an_error(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    site_journal(tmp_path, AUDIT_FILE).append({"kind": "budget_reset", "timestamp": WHEN})

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 5: unknown audit event kind 'budget_reset'"):
        log.events()


def test_a_field_of_the_wrong_type_on_disk_is_an_error(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path)
    record = ExecutionAuthorised(**REQUEST, round=2, timestamp=WHEN).to_record()
    site_journal(tmp_path, AUDIT_FILE).append({**record, "round": "2"})

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 1: round must be an int >= 0, got '2'"):
        log.verify()


def test_a_missing_or_extra_field_on_disk_is_an_error(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path)
    record = OutputReleased(request_id="req-1", output_sha256=CODE_HASH, round=0, timestamp=WHEN).to_record()
    del record["round"]
    site_journal(tmp_path, AUDIT_FILE).append({**record, "note": "x"})

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"missing fields \['round'\] and unexpected fields \['note'\]"):
        log.events()


# --- event validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epsilon": float("nan")}, r"epsilon must be a finite number >= 0, got nan"),
        ({"epsilon": -0.1}, r"epsilon must be a finite number >= 0, got -0.1"),
        ({"delta": 1.0}, r"delta must be < 1, got 1.0"),
        ({"round": True}, r"round must be an int >= 0, got True"),
        ({"researcher": " "}, r"researcher: a researcher id is a syft user id of 32 lowercase hex digits, got ' '"),
        ({"researcher": "r@uni.edu"}, r"researcher: a researcher id is a syft user id .* got 'r@uni.edu'"),
        ({"researcher": RESEARCHER_ID.upper()}, r"researcher: a researcher id is a syft user id of 32 lowercase hex"),
        ({"timestamp": "2025-03-01T12:00:00+02:00"}, r"timestamp must be an ISO 8601 string in UTC"),
        ({"timestamp": "yesterday"}, r"timestamp must be an ISO 8601 string in UTC .* got 'yesterday'"),
    ],
)
def test_privacy_spent_rejects_invalid_fields(changes: dict[str, object], message: str) -> None:
    # Prepare
    valid: dict[str, object] = {
        "request_id": "req-1", "dataset": "imdb", "researcher": RESEARCHER_ID, "epsilon": 0.5, "delta": 1e-6, "round": 0,
    }

    # Execute / Assert
    with pytest.raises(AuditEventError, match=message):
        PrivacySpent(**{**valid, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"researcher": "r@uni.edu"}, r"researcher: a researcher id is a syft user id .* got 'r@uni.edu'"),
        ({"researcher": 42}, r"researcher: a researcher id is a syft user id of 32 lowercase hex digits, got 42"),
        ({"researcher_email": ""}, r"researcher_email must be a non-empty string, got ''"),
    ],
)
@pytest.mark.parametrize("event_type", [RequestApproved, RequestDenied, ExecutionAuthorised, ExecutionRefused])
def test_request_events_key_the_researcher_by_id_and_carry_the_email(
    event_type: type[AuditEvent], changes: dict[str, object], message: str
) -> None:
    # Prepare
    extra = {RequestApproved: {"plan_digest": PLAN_DIGEST, "admin": "admin@site"},
             RequestDenied: {"admin": "admin@site", "reason": "no"},
             ExecutionAuthorised: {"round": 0},
             ExecutionRefused: {"round": 0, "reason": "no"}}[event_type]

    # Execute / Assert
    with pytest.raises(AuditEventError, match=message):
        event_type(**{**REQUEST, **changes}, **extra)


@pytest.mark.parametrize(
    ("event_type", "valid", "changes", "message"),
    [
        (ApiCallRefused, {"path": "p", "caller": "unknown", "caller_email": "unknown", "role": "GUEST", "reason": "r"},
         {"caller_email": " "}, r"caller_email must be a non-empty string, got ' '"),
        (ApiCallRefused, {"path": "p", "caller": "unknown", "caller_email": "unknown", "role": "GUEST", "reason": "r"},
         {"path": ""}, r"path must be a non-empty string, got ''"),
        (LogMigrated, {"from_format": 1, "to_format": 2, "old_entries": 0, "old_head": "0" * 64, "backup": "b"},
         {"old_entries": True}, r"old_entries must be an int >= 0, got True"),
        (LogMigrated, {"from_format": 1, "to_format": 2, "old_entries": 0, "old_head": "0" * 64, "backup": "b"},
         {"backup": ""}, r"backup must be a non-empty string, got ''"),
    ],
)
def test_new_events_reject_invalid_fields(event_type: type[AuditEvent], valid: dict[str, object],
                                          changes: dict[str, object], message: str) -> None:
    with pytest.raises(AuditEventError, match=message):
        event_type(**{**valid, **changes})


def test_code_hash_must_be_a_lowercase_sha256() -> None:
    with pytest.raises(AuditEventError, match=r"code_hash must be a SHA-256 as 64 lowercase hex digits"):
        ExecutionAuthorised(**{**REQUEST, "code_hash": CODE_HASH.upper()}, round=0)


def test_record_refuses_anything_but_a_concrete_event(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"record\(\) takes one of request_approved, .* got AuditEvent"):
        AuditLog(tmp_path).record(AuditEvent())
    assert not (tmp_path / AUDIT_FILE).exists()


# --- concurrency --------------------------------------------------------------------------------

PER_WRITER = 150


def _append_many(data_dir: str, writer: str) -> None:
    log = AuditLog(Path(data_dir))
    for number in range(PER_WRITER):
        log.record(ExecutionAuthorised(**{**REQUEST, "request_id": f"{writer}-{number}"}, round=number))


def test_concurrent_appends_from_two_processes_keep_the_chain_intact(tmp_path: Path) -> None:
    # Prepare
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), name)) for name in ("a", "b")]

    # Execute
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    # Assert
    assert [worker.exitcode for worker in workers] == [0, 0]
    report = AuditLog(tmp_path).verify()
    assert report.head.n_entries == 2 * PER_WRITER
    ids = [event.request_id for event in AuditLog(tmp_path).events() if isinstance(event, ExecutionAuthorised)]
    for name in ("a", "b"):
        assert [i for i in ids if i.startswith(f"{name}-")] == [f"{name}-{n}" for n in range(PER_WRITER)]
