"""The audit log: typed round trip, restart, every kind of tampering, concurrent appends."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from policies.audit import (
    AUDIT_FILE,
    AuditEvent,
    AuditEventError,
    AuditHead,
    AuditIntegrityError,
    AuditLog,
    ExecutionAuthorised,
    ExecutionRefused,
    OutputReleased,
    PrivacySpent,
    RequestApproved,
    RequestDenied,
)
from policies.durable import GENESIS_HASH, HashChainedJournal, JournalEntry, sha256_hex

pytestmark = pytest.mark.unit

CODE_HASH = sha256_hex("def train(): ...\n")
PLAN_DIGEST = sha256_hex('{"rounds":3}')
WHEN = "2025-03-01T12:00:00.000000+00:00"
REQUEST = {"request_id": "req-1", "code_hash": CODE_HASH, "researcher": "r@uni.edu", "dataset": "imdb"}


def one_of_each() -> list[AuditEvent]:
    return [
        RequestApproved(**REQUEST, plan_digest=PLAN_DIGEST, admin="admin@site", timestamp=WHEN),
        RequestDenied(**REQUEST, admin="admin@site", reason="reads files", timestamp=WHEN),
        ExecutionAuthorised(**REQUEST, round=0, timestamp=WHEN),
        ExecutionRefused(**REQUEST, round=None, reason="code hash differs from the approved one", timestamp=WHEN),
        PrivacySpent(request_id="req-1", dataset="imdb", researcher="r@uni.edu", epsilon=0.5, delta=1e-6, round=0),
        OutputReleased(request_id="req-1", output_sha256=sha256_hex(b"update"), round=0),
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
    assert [head.n_entries for head in heads] == [1, 2, 3, 4, 5, 6]
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
        ("execution_authorised", 1),
        ("execution_refused", 1),
        ("output_released", 1),
        ("privacy_spent", 1),
        ("request_approved", 1),
        ("request_denied", 1),
    )


def test_empty_log_has_genesis_head_and_verifies(tmp_path: Path) -> None:
    # Execute
    report = AuditLog(tmp_path).verify()

    # Assert
    assert report.head == AuditHead(0, GENESIS_HASH)
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
    with pytest.raises(AuditIntegrityError, match=r"line 2 was modified after it was written \(hash mismatch\)"):
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
    forged = JournalEntry.seal(4, "f" * 64, forged_event.to_record())
    write_lines(log, [*lines_of(log), forged.to_line() + "\n"])

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 5 breaks the chain"):
        log.events()


def test_truncation_at_a_line_boundary_is_caught_by_the_anchor(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    anchor = log.head()
    write_lines(log, lines_of(log)[:-1])

    # Execute
    unanchored = log.verify()

    # Assert: the shorter chain is intact on its own, only the anchor tells
    assert unanchored.head.n_entries == 3
    assert "no anchor given" in unanchored.warnings[0]
    with pytest.raises(AuditIntegrityError, match=r"has 3 entries but the anchor has 4: entries were removed"):
        log.verify(anchor=anchor)


def test_truncation_inside_the_last_line_is_flagged_and_caught_by_the_anchor(tmp_path: Path) -> None:
    # Prepare
    log = filled_log(tmp_path)
    anchor = log.head()
    raw = log.path.read_bytes()
    last_line_length = len(lines_of(log)[-1].encode("utf-8"))
    log.path.write_bytes(raw[:-10])

    # Execute
    report = log.verify()

    # Assert
    assert report.torn_tail_bytes == last_line_length - 10
    assert report.warnings[0].startswith(f"{last_line_length - 10} bytes after the last complete entry")
    with pytest.raises(AuditIntegrityError, match=r"has 3 entries but the anchor has 4: entries were removed"):
        log.verify(anchor=anchor)


def test_a_rewrite_of_the_whole_chain_is_caught_only_by_the_anchor(tmp_path: Path) -> None:
    # Prepare: recompute every hash after changing the denial reason
    log = filled_log(tmp_path)
    anchor = log.head()
    records = [dict(event.to_record()) for event in log.events()]
    records[1]["reason"] = "looked fine"
    rewritten = HashChainedJournal(tmp_path / "rewritten.jsonl")
    for record in records:
        rewritten.append(record)
    log.path.write_bytes(rewritten.path.read_bytes())

    # Execute
    unanchored = log.verify()

    # Assert
    assert unanchored.head.n_entries == 4
    with pytest.raises(AuditIntegrityError, match=r"entry 4 has hash [0-9a-f]{64} but the anchor has .*rewritten"):
        log.verify(anchor=anchor)


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
    HashChainedJournal(log.path).append({"kind": "budget_reset", "timestamp": WHEN})

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 5: unknown audit event kind 'budget_reset'"):
        log.events()


def test_a_field_of_the_wrong_type_on_disk_is_an_error(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path)
    record = ExecutionAuthorised(**REQUEST, round=2, timestamp=WHEN).to_record()
    HashChainedJournal(log.path).append({**record, "round": "2"})

    # Execute / Assert
    with pytest.raises(AuditIntegrityError, match=r"line 1: round must be an int >= 0, got '2'"):
        log.verify()


def test_a_missing_or_extra_field_on_disk_is_an_error(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path)
    record = OutputReleased(request_id="req-1", output_sha256=CODE_HASH, round=0, timestamp=WHEN).to_record()
    del record["round"]
    HashChainedJournal(log.path).append({**record, "note": "x"})

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
        ({"researcher": " "}, r"researcher must be a non-empty string, got ' '"),
        ({"timestamp": "2025-03-01T12:00:00+02:00"}, r"timestamp must be an ISO 8601 string in UTC"),
        ({"timestamp": "yesterday"}, r"timestamp must be an ISO 8601 string in UTC .* got 'yesterday'"),
    ],
)
def test_privacy_spent_rejects_invalid_fields(changes: dict[str, object], message: str) -> None:
    # Prepare
    valid: dict[str, object] = {
        "request_id": "req-1", "dataset": "imdb", "researcher": "r@uni.edu", "epsilon": 0.5, "delta": 1e-6, "round": 0,
    }

    # Execute / Assert
    with pytest.raises(AuditEventError, match=message):
        PrivacySpent(**{**valid, **changes})  # type: ignore[arg-type]


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
