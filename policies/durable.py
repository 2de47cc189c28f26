"""Durable storage primitives shared by the ledger, the audit log and the site's metadata.

Two shapes cover everything a site must not lose across a crash:

* ``write_json_atomic`` replaces a small JSON document all-or-nothing (write a temporary file in
  the same directory, fsync it, rename over the old one, fsync the directory). A reader sees the
  old or the new document, never half of one.
* ``HashChainedJournal`` is an append-only JSON-lines file in which every entry carries the
  SHA-256 of the one before it. Appends take an exclusive ``flock`` and fsync before returning, so
  a record that ``append`` returned is on disk, and two processes (syft forks a worker per job)
  cannot interleave or fork the chain. ``verify`` recomputes the chain, so an edited, deleted or
  reordered line is detected.

A crash in the middle of an append leaves at most one final line without its newline. Such a torn
tail was never acknowledged to the caller (``append`` had not returned, so no output was released
on its strength) and is dropped on the next append; anything else that fails to parse is
corruption and raises.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS_HASH = "0" * 64


class JournalCorruptError(RuntimeError):
    """The journal on disk does not form an intact hash chain."""


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed and signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, document: Any, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``document`` (JSON) all-or-nothing."""
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass(frozen=True)
class JournalEntry:
    """One line of a hash-chained journal."""

    seq: int  # 0-based position in the journal
    prev: str  # hex SHA-256 of the previous entry's line (GENESIS_HASH for the first)
    record: Mapping[str, Any]  # the caller's payload
    digest: str  # hex SHA-256 over canonical_json({"seq", "prev", "record"})

    @staticmethod
    def seal(seq: int, prev: str, record: Mapping[str, Any]) -> JournalEntry:
        body = {"seq": seq, "prev": prev, "record": dict(record)}
        return JournalEntry(seq=seq, prev=prev, record=dict(record), digest=sha256_hex(canonical_json(body)))

    def to_line(self) -> str:
        return canonical_json({"seq": self.seq, "prev": self.prev, "record": self.record, "hash": self.digest})


class HashChainedJournal:
    """Append-only, fsync'd, hash-chained JSON-lines file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read_lines(self) -> tuple[list[str], int]:
        """Complete lines, and the byte length of the intact prefix (a torn tail excluded)."""
        if not self.path.exists():
            return [], 0
        raw = self.path.read_bytes()
        intact = raw.rfind(b"\n") + 1
        lines = raw[:intact].decode("utf-8").splitlines()
        return lines, intact

    def _parse(self, lines: list[str]) -> list[JournalEntry]:
        entries: list[JournalEntry] = []
        prev = GENESIS_HASH
        for number, line in enumerate(lines):
            where = f"{self.path}: line {number + 1}"
            try:
                obj = json.loads(line)
                entry = JournalEntry.seal(int(obj["seq"]), str(obj["prev"]), obj["record"])
                stored = str(obj["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise JournalCorruptError(f"{where} is not a journal entry ({exc}); restore it from a backup") from exc
            if entry.seq != number or entry.prev != prev:
                raise JournalCorruptError(f"{where} breaks the chain (an entry was removed, reordered or inserted)")
            if entry.digest != stored:
                raise JournalCorruptError(f"{where} was modified after it was written (hash mismatch)")
            entries.append(entry)
            prev = entry.digest
        return entries

    def entries(self) -> list[JournalEntry]:
        """All entries, verified. Raises JournalCorruptError if the chain is broken."""
        with self._locked():
            lines, _ = self._read_lines()
            return self._parse(lines)

    def verify(self) -> int:
        """Verify the whole chain; return the number of entries."""
        return len(self.entries())

    def append(self, record: Mapping[str, Any]) -> JournalEntry:
        """Durably append ``record``; returns only once it is on disk."""
        canonical_json(record)  # refuse non-JSON values before touching the file
        with self._locked():
            lines, intact = self._read_lines()
            entries = self._parse(lines)
            prev = entries[-1].digest if entries else GENESIS_HASH
            entry = JournalEntry.seal(len(entries), prev, record)
            with open(self.path, "r+b" if self.path.exists() else "wb") as handle:
                handle.truncate(intact)  # drop a torn tail from an earlier crash
                handle.seek(intact)
                handle.write((entry.to_line() + "\n").encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            if intact == 0:
                _fsync_dir(self.path.parent)
            return entry
