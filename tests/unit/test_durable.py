from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.durable import (
    GENESIS_HASH,
    HashChainedJournal,
    JournalCorruptError,
    read_json,
    write_json_atomic,
)

pytestmark = pytest.mark.unit


def test_atomic_write_replaces_the_whole_document(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"

    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2]})

    assert read_json(path) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_journal_chains_and_replays(tmp_path: Path) -> None:
    journal = HashChainedJournal(tmp_path / "j.jsonl")

    first = journal.append({"event": "a"})
    second = journal.append({"event": "b"})
    replayed = HashChainedJournal(tmp_path / "j.jsonl").entries()

    assert first.prev == GENESIS_HASH and second.prev == first.digest
    assert [e.record for e in replayed] == [{"event": "a"}, {"event": "b"}]
    assert replayed == [first, second]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_edited_entry_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = HashChainedJournal(path)
    for i in range(3):
        journal.append({"epsilon": i})
    lines = _lines(path)
    lines[1] = lines[1].replace('"epsilon":1', '"epsilon":0')
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(JournalCorruptError, match=r"line 2 was modified after it was written"):
        journal.verify()


def test_deleted_entry_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = HashChainedJournal(path)
    for i in range(3):
        journal.append({"epsilon": i})
    lines = _lines(path)
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")

    with pytest.raises(JournalCorruptError, match=r"line 2 breaks the chain"):
        journal.append({"epsilon": 9})
    assert len(_lines(path)) == 2


def test_torn_tail_from_a_crash_is_dropped_on_next_append(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = HashChainedJournal(path)
    journal.append({"epsilon": 1})
    with open(path, "a") as handle:
        handle.write('{"seq":1,"prev":"ab')  # the process died mid-write

    assert len(journal.entries()) == 1
    journal.append({"epsilon": 2})
    assert [e.record for e in journal.entries()] == [{"epsilon": 1}, {"epsilon": 2}]


def test_garbage_line_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text("not json\n")

    with pytest.raises(JournalCorruptError, match=r"line 1 is not a journal entry"):
        HashChainedJournal(path).entries()


def test_non_json_record_is_refused_before_writing(tmp_path: Path) -> None:
    journal = HashChainedJournal(tmp_path / "j.jsonl")

    with pytest.raises(ValueError, match=r"Out of range float values are not JSON compliant"):
        journal.append({"epsilon": float("nan")})
    assert not (tmp_path / "j.jsonl").exists()
    json.dumps({})
