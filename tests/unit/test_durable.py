"""Durable storage: atomic documents, and the MAC-chained journal with its head file and keyed genesis."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path

import pytest

from policies import durable
from policies.durable import (
    HashChainedJournal,
    JournalCorruptError,
    JournalEntry,
    JournalHead,
    canonical_json,
    journal_key,
    read_json,
    sha256_hex,
    site_journal,
    write_json_atomic,
)

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _journal(path: Path, *, key: bytes = KEY, label: str | None = None) -> HashChainedJournal:
    return HashChainedJournal(path, key=key, label=label)


def _reference_mac(key: bytes, value: object) -> str:
    """HMAC-SHA256 of the canonical JSON of ``value``, computed without policies.durable's helpers."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _filled(path: Path, count: int) -> HashChainedJournal:
    journal = _journal(path)
    for i in range(count):
        journal.append({"epsilon": i})
    return journal


# --- atomic documents ---------------------------------------------------------------------------


def test_atomic_write_replaces_the_whole_document_owner_only(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "doc.json"

    # Execute
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2]})

    # Assert
    assert read_json(path) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]
    assert path.stat().st_mode & 0o777 == 0o600


# --- the chain ----------------------------------------------------------------------------------


def test_journal_chains_from_a_keyed_genesis_and_replays(tmp_path: Path) -> None:
    # Prepare
    journal = _journal(tmp_path / "j.jsonl")

    # Execute
    first = journal.append({"event": "a"})
    second = journal.append({"event": "b"})
    replayed = _journal(tmp_path / "j.jsonl").entries()

    # Assert: genesis and MACs equal an independent HMAC-SHA256 computation
    genesis = _reference_mac(KEY, {"genesis": "j.jsonl"})
    assert journal.genesis == genesis
    assert first.prev == genesis
    assert first.digest == _reference_mac(KEY, {"seq": 0, "prev": genesis, "record": {"event": "a"}})
    assert second.prev == first.digest
    assert second.digest == _reference_mac(KEY, {"seq": 1, "prev": first.digest, "record": {"event": "b"}})
    assert [e.record for e in replayed] == [{"event": "a"}, {"event": "b"}]
    assert replayed == [first, second]
    assert journal.head() == JournalHead(2, second.digest)
    assert read_json(journal.head_path) == {
        "entries": 2, "last": second.digest,
        "mac": _reference_mac(KEY, {"head": "j.jsonl", "entries": 2, "last": second.digest}),
    }


def test_an_empty_journal_has_the_genesis_as_head(tmp_path: Path) -> None:
    # Execute
    journal = _journal(tmp_path / "j.jsonl", label="ledger/imdb/x.jsonl")

    # Assert
    assert journal.head() == JournalHead(0, _reference_mac(KEY, {"genesis": "ledger/imdb/x.jsonl"}))
    assert journal.verify() == 0


@pytest.mark.parametrize("key", [b"", b"k" * 31, "0" * 64, bytes(33)])
def test_a_journal_key_of_the_wrong_size_or_type_is_refused(tmp_path: Path, key: object) -> None:
    with pytest.raises(ValueError, match=r"a journal key must be 32 bytes \(policies.durable.journal_key\)"):
        HashChainedJournal(tmp_path / "j.jsonl", key=key)  # type: ignore[arg-type]


def test_edited_entry_is_detected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 3)
    lines = _lines(path)
    lines[1] = lines[1].replace('"epsilon":1', '"epsilon":0')
    path.write_text("\n".join(lines) + "\n")

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"line 2 was modified after it was written, or written without "
                                                  r"this site's journal key \(MAC mismatch\)"):
        journal.verify()


def test_deleted_entry_is_detected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 3)
    lines = _lines(path)
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"line 2 breaks the chain"):
        journal.append({"epsilon": 9})
    assert len(_lines(path)) == 2


def test_torn_tail_from_a_crash_is_dropped_on_next_append(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 1)
    with open(path, "a") as handle:
        handle.write('{"seq":1,"prev":"ab')  # the process died mid-write

    # Execute
    before = len(journal.entries())
    journal.append({"epsilon": 2})

    # Assert
    assert before == 1
    assert [e.record for e in journal.entries()] == [{"epsilon": 0}, {"epsilon": 2}]
    assert read_json(journal.head_path)["entries"] == 2


def test_garbage_line_is_corruption(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "j.jsonl"
    path.write_text("not json\n")

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"line 1 is not a journal entry"):
        _journal(path).entries()


def test_non_json_record_is_refused_before_writing(tmp_path: Path) -> None:
    # Prepare
    journal = _journal(tmp_path / "j.jsonl")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"Out of range float values are not JSON compliant"):
        journal.append({"epsilon": float("nan")})
    assert not (tmp_path / "j.jsonl").exists()
    assert not journal.head_path.exists()


# --- forgery without the key --------------------------------------------------------------------


@pytest.mark.parametrize("forger", ["another key", "unkeyed sha-256"])
def test_a_line_written_without_the_key_is_refused_naming_the_mac(tmp_path: Path, forger: str) -> None:
    # Prepare: the forger sees the last MAC in the file and chains to it correctly
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 2)
    last = journal.entries()[-1]
    if forger == "another key":
        forged = JournalEntry.seal(OTHER_KEY, 2, last.digest, {"epsilon": -1})
    else:
        body = {"seq": 2, "prev": last.digest, "record": {"epsilon": -1}}
        forged = JournalEntry(2, last.digest, {"epsilon": -1}, sha256_hex(canonical_json(body)))
    with open(path, "a") as handle:
        handle.write(forged.to_line() + "\n")
    before = path.read_bytes()

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"line 3 was modified after it was written, or written without "
                                                  r"this site's journal key \(MAC mismatch\)"):
        journal.entries()
    with pytest.raises(JournalCorruptError, match=r"line 3 .*\(MAC mismatch\)"):
        journal.append({"epsilon": 3})
    assert path.read_bytes() == before


def test_a_journal_read_with_another_key_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "j.jsonl"
    _filled(path, 2)

    # Execute / Assert: another key has another genesis, so line 1 does not chain
    with pytest.raises(JournalCorruptError, match=r"j.jsonl: line 1 breaks the chain"):
        _journal(path, key=OTHER_KEY).entries()


def test_entries_cannot_be_moved_to_a_journal_with_another_label(tmp_path: Path) -> None:
    # Prepare: same key, same records, two labels
    source = _journal(tmp_path / "a" / "j.jsonl", label="ledger/imdb/a.jsonl")
    target = _journal(tmp_path / "b" / "j.jsonl", label="ledger/imdb/b.jsonl")
    source.append({"epsilon": 0.1})
    target.path.parent.mkdir()
    shutil.copy(source.path, target.path)

    # Execute / Assert
    assert source.genesis != target.genesis
    with pytest.raises(JournalCorruptError, match=r"b/j.jsonl: line 1 breaks the chain"):
        target.entries()
    shutil.copy(source.head_path, target.head_path)
    with pytest.raises(JournalCorruptError, match=r"line 1 breaks the chain"):
        target.append({"epsilon": 0.2})


def test_a_head_file_moved_from_another_label_is_refused(tmp_path: Path) -> None:
    # Prepare: two empty-then-filled journals with the same records, differing only by label
    first = _journal(tmp_path / "a.jsonl", label="one")
    second = _journal(tmp_path / "b.jsonl", label="two")
    first.append({"x": 1})
    second.append({"x": 1})
    shutil.copy(first.head_path, second.head_path)

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"b.jsonl.head was modified or written without this site's"):
        second.entries()


# --- the head: truncation, deletion, rollback, crash ---------------------------------------------


def test_cutting_the_last_lines_off_is_refused_before_the_next_append(tmp_path: Path) -> None:
    # Prepare: the cut chain is intact on its own (the unkeyed format accepted it)
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 3)
    path.write_text("\n".join(_lines(path)[:1]) + "\n")
    before = path.read_bytes()

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"j.jsonl has 1 entries but its head file records 3: its last "
                                                  r"entries were removed \(truncated or rolled back\)"):
        journal.append({"epsilon": 9})
    assert path.read_bytes() == before
    assert read_json(journal.head_path)["entries"] == 3


def test_cutting_inside_the_last_line_is_refused_as_truncation(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 2)
    path.write_bytes(path.read_bytes()[:-10])

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"has 1 entries but its head file records 2"):
        journal.entries()


def test_a_deleted_head_file_of_a_non_empty_journal_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 2)
    journal.head_path.unlink()

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"j.jsonl.head is missing for a journal of 2 entries: the head "
                                                  r"was deleted or the journal replaced"):
        journal.append({"epsilon": 9})
    assert len(_lines(path)) == 2


def test_an_edited_head_file_is_refused(tmp_path: Path) -> None:
    # Prepare: claim one entry fewer, so that a later truncation would pass
    journal = _filled(tmp_path / "j.jsonl", 2)
    head = read_json(journal.head_path)
    first = journal.entries()[0]
    write_json_atomic(journal.head_path, {**head, "entries": 1, "last": first.digest})

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"j.jsonl.head was modified or written without this site's"):
        journal.entries()


def test_rolling_back_journal_and_head_together_is_caught_in_the_same_process(tmp_path: Path) -> None:
    # Prepare: keep a copy after 2 entries, spend a third, restore the copy of both files
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 2)
    saved_lines, saved_head = path.read_bytes(), journal.head_path.read_bytes()
    journal.append({"epsilon": 2})
    path.write_bytes(saved_lines)
    journal.head_path.write_bytes(saved_head)

    # Execute / Assert: the copy is consistent on its own, the remembered head is not
    with pytest.raises(JournalCorruptError, match=r"j.jsonl has 2 entries but its last head seen by this process "
                                                  r"records 3: its last entries were removed"):
        _journal(path).append({"epsilon": 9})
    assert path.read_bytes() == saved_lines


def test_a_rollback_is_unseen_by_a_fresh_process_without_an_anchor(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: as above, then forget what this process saw (a restart)
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 2)
    saved_lines, saved_head = path.read_bytes(), journal.head_path.read_bytes()
    journal.append({"epsilon": 2})
    path.write_bytes(saved_lines)
    journal.head_path.write_bytes(saved_head)
    monkeypatch.setattr(durable, "_seen_heads", {})

    # Execute
    count = _journal(path).verify()

    # Assert: this is what the audit log's anchor is for (tests/unit/test_audit.py)
    assert count == 2


def test_a_rewritten_journal_is_caught_by_the_remembered_head(tmp_path: Path) -> None:
    # Prepare: a key holder rewrites a journal of the same length elsewhere and copies it in
    path = tmp_path / "j.jsonl"
    _filled(path, 2)
    elsewhere = _journal(tmp_path / "other" / "j.jsonl")
    elsewhere.append({"epsilon": 0})
    elsewhere.append({"epsilon": 100})
    shutil.copy(elsewhere.path, path)
    shutil.copy(elsewhere.head_path, path.with_name("j.jsonl.head"))

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"j.jsonl: entry 2 differs from its last head seen by this "
                                                  r"process: the journal was rewritten"):
        _journal(path).entries()


def test_a_crash_between_the_line_and_the_head_is_accepted_and_the_head_catches_up(tmp_path: Path) -> None:
    # Prepare: the journal is one entry ahead of its head file
    path = tmp_path / "j.jsonl"
    journal = _filled(path, 2)
    older_head = journal.head_path.read_bytes()
    journal.append({"epsilon": 2})
    journal.head_path.write_bytes(older_head)

    # Execute
    read = journal.entries()
    fourth = journal.append({"epsilon": 3})

    # Assert
    assert [e.record["epsilon"] for e in read] == [0, 1, 2]
    assert fourth.seq == 3
    head = read_json(journal.head_path)
    assert (head["entries"], head["last"]) == (4, fourth.digest)
    assert journal.head() == JournalHead(4, fourth.digest)


def test_rewrite_replaces_the_journal_and_its_head(tmp_path: Path) -> None:
    # Prepare
    journal = _filled(tmp_path / "j.jsonl", 3)

    # Execute
    journal.rewrite([{"epsilon": 7}])
    reopened = _journal(tmp_path / "j.jsonl")

    # Assert
    entries = reopened.entries()
    assert [e.record for e in entries] == [{"epsilon": 7}]
    assert entries[0].prev == reopened.genesis
    assert reopened.head() == JournalHead(1, entries[0].digest)
    assert read_json(journal.head_path)["entries"] == 1


# --- the key ------------------------------------------------------------------------------------


def test_journal_key_is_created_once_32_bytes_owner_only(tmp_path: Path) -> None:
    # Execute
    first = journal_key(tmp_path)
    second = journal_key(tmp_path)

    # Assert
    path = tmp_path / "secrets" / "journal_key"
    assert len(first) == 32
    assert second == first
    assert bytes.fromhex(path.read_text().strip()) == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    assert journal_key(tmp_path / "elsewhere") != first


@pytest.mark.parametrize("content", ["not hex\n", "ab" * 16 + "\n", "ab" * 33 + "\n", ""])
def test_a_malformed_journal_key_is_refused(tmp_path: Path, content: str) -> None:
    # Prepare
    path = tmp_path / "secrets" / "journal_key"
    path.parent.mkdir(mode=0o700)
    path.write_text(content)
    os.chmod(path, 0o600)

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"secrets/journal_key is not a 32-byte hex key: restore it from"):
        journal_key(tmp_path)
    assert path.read_text() == content


def test_site_journal_is_keyed_and_labelled_by_its_relative_path(tmp_path: Path) -> None:
    # Execute
    journal = site_journal(tmp_path, Path("ledger") / "imdb" / "x.jsonl")

    # Assert
    assert journal.path == tmp_path / "ledger" / "imdb" / "x.jsonl"
    assert journal.label == "ledger/imdb/x.jsonl"
    assert journal.genesis == _reference_mac(journal_key(tmp_path), {"genesis": "ledger/imdb/x.jsonl"})


def test_folders_a_site_writes_into_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from policies.durable import site_journal

    old = os.umask(0o022)  # an admin's shell
    try:
        write_json_atomic(tmp_path / "datasets" / "deep" / "imdb.json", {"n": 1})
        site_journal(tmp_path, "ledger/imdb/" + "a" * 32 + ".jsonl").append({"spent": 1})
    finally:
        os.umask(old)

    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert {path: mode for path, mode in modes.items() if (tmp_path / path).is_dir()} == {
        "datasets": 0o700, "datasets/deep": 0o700, "ledger": 0o700, "ledger/imdb": 0o700, "secrets": 0o700}
    assert {mode for path, mode in modes.items() if (tmp_path / path).is_file()} == {0o600}
