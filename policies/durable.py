"""Durable storage primitives shared by the ledger, the audit log and the site's metadata.

Two shapes cover everything a site must not lose across a crash:

* ``write_json_atomic`` replaces a small JSON document all-or-nothing (write a temporary file in
  the same directory, fsync it, rename over the old one, fsync the directory). A reader sees the
  old or the new document, never half of one.
* ``HashChainedJournal`` is an append-only JSON-lines file in which every entry carries a MAC
  (HMAC-SHA256 under the site's journal key) over itself and the MAC of the entry before it; the
  first entry chains to a genesis value keyed by the journal's name, so an entry cannot be moved
  to another journal. Appends take an exclusive ``flock`` and fsync before returning, so a record
  that ``append`` returned is on disk, and two processes cannot interleave or fork the chain.
  Reading recomputes the chain, so an edited, deleted, reordered or inserted line is detected, and
  without the key nobody can compute a valid replacement chain.
* Beside each journal a *head* file (``<journal>.head``) holds the number of entries and the last
  MAC, itself MACed. A journal shorter than its head (its last lines cut off: in the old,
  unkeyed format that refunded privacy budget and still verified) is refused before the next
  append, i.e. before the next spend. The process also remembers the highest head it has seen of
  each journal, so rolling back journal *and* head file together to an older copy is caught while
  the site runs; across a restart only an anchor written down elsewhere (``policies.audit``) catches that.

A crash in the middle of an append leaves at most one final line without its newline. Such a torn
tail was never acknowledged to the caller (``append`` had not returned, so no output was released
on its strength) and is dropped on the next append; anything else that fails to parse is
corruption and raises.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOURNAL_KEY_FILE = Path("secrets") / "journal_key"
KEY_BYTES = 32


class JournalCorruptError(RuntimeError):
    """The journal on disk does not form an intact chain, or is shorter than its head."""


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


def private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents 0700, whatever the process's umask: a site's folders are
    its owner's alone (the admin's own tools write into them from a shell with umask 022)."""
    directory = Path(directory)
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    ``mode`` defaults to owner-only (0600): what a site writes is private (records, keys, ledgers).
    """
    path = Path(path)
    private_dirs(path.parent)
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


def write_json_atomic(path: Path, document: Any, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``document`` (JSON) all-or-nothing."""
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def journal_key(data_dir: Path) -> bytes:
    """The site's journal MAC key (``secrets/journal_key``, 0600), created on first use.

    Creating it when missing is safe: a journal written under another key fails verification, so a
    deleted or replaced key makes the site refuse its journals (fail closed), never accept forged ones.
    """
    path = Path(data_dir) / JOURNAL_KEY_FILE
    private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(os.urandom(KEY_BYTES).hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(path.parent)
    text = path.read_text(encoding="utf-8").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise JournalCorruptError(f"{path} is not a {KEY_BYTES}-byte hex key: restore it from the site's backup")
    return key


def site_journal(data_dir: Path, relative: str | Path) -> HashChainedJournal:
    """The journal at ``data_dir/relative``, keyed with the site's journal key and labelled by ``relative``."""
    relative = Path(relative)
    return HashChainedJournal(Path(data_dir) / relative, key=journal_key(data_dir), label=relative.as_posix())


def _mac(key: bytes, data: str) -> str:
    return hmac.new(key, data.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class JournalEntry:
    """One line of a MAC-chained journal."""

    seq: int  # 0-based position in the journal
    prev: str  # hex MAC of the previous entry (the journal's genesis value for the first)
    record: Mapping[str, Any]  # the caller's payload
    digest: str  # hex HMAC-SHA256 over canonical_json({"seq", "prev", "record"}) under the journal key

    @staticmethod
    def seal(key: bytes, seq: int, prev: str, record: Mapping[str, Any]) -> JournalEntry:
        body = {"seq": seq, "prev": prev, "record": dict(record)}
        return JournalEntry(seq=seq, prev=prev, record=dict(record), digest=_mac(key, canonical_json(body)))

    def to_line(self) -> str:
        return canonical_json({"seq": self.seq, "prev": self.prev, "record": self.record, "hash": self.digest})


@dataclass(frozen=True)
class JournalHead:
    """How long a journal was when last written, and its last MAC (``genesis`` when empty)."""

    entries: int
    last: str


# The highest head each journal reached in this process: catches a rollback of journal and head together.
_seen_heads: dict[str, JournalHead] = {}


class HashChainedJournal:
    """Append-only, fsync'd, MAC-chained JSON-lines file with a MACed head (see the module docstring)."""

    def __init__(self, path: Path, *, key: bytes, label: str | None = None) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a journal key must be {KEY_BYTES} bytes (policies.durable.journal_key), got {key!r:.20}")
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._key = key
        self.label = label if label is not None else self.path.name
        self.genesis = _mac(key, canonical_json({"genesis": self.label}))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        private_dirs(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with os.fdopen(os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as lock:
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
        prev = self.genesis
        for number, line in enumerate(lines):
            where = f"{self.path}: line {number + 1}"
            try:
                obj = json.loads(line)
                entry = JournalEntry.seal(self._key, int(obj["seq"]), str(obj["prev"]), obj["record"])
                stored = str(obj["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise JournalCorruptError(f"{where} is not a journal entry ({exc}); restore it from a backup") from exc
            if entry.seq != number or entry.prev != prev:
                raise JournalCorruptError(f"{where} breaks the chain (an entry was removed, reordered or inserted)")
            if not hmac.compare_digest(entry.digest, stored):
                raise JournalCorruptError(
                    f"{where} was modified after it was written, or written without this site's journal key "
                    "(MAC mismatch)"
                )
            entries.append(entry)
            prev = entry.digest
        return entries

    # ---- the head ----------------------------------------------------------------------------
    def _head_mac(self, head: JournalHead) -> str:
        return _mac(self._key, canonical_json({"head": self.label, "entries": head.entries, "last": head.last}))

    def _stored_head(self) -> JournalHead | None:
        if not self.head_path.exists():
            return None
        try:
            raw = read_json(self.head_path)
            head = JournalHead(entries=int(raw["entries"]), last=str(raw["last"]))
            mac = str(raw["mac"])
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalCorruptError(f"{self.head_path} is not a journal head ({exc}); restore it from a backup") from exc
        if not hmac.compare_digest(mac, self._head_mac(head)):
            raise JournalCorruptError(f"{self.head_path} was modified or written without this site's journal key")
        return head

    def _check_against(self, head: JournalHead | None, entries: list[JournalEntry], *, what: str) -> None:
        """``entries`` must reach ``head``: at least as long, and the same MAC at the head's position."""
        if head is None:
            return
        if len(entries) < head.entries:
            raise JournalCorruptError(
                f"{self.path} has {len(entries)} entries but its {what} records {head.entries}: its last entries "
                "were removed (truncated or rolled back); restore the journal from a backup before the site goes on"
            )
        found = entries[head.entries - 1].digest if head.entries else self.genesis
        if not hmac.compare_digest(found, head.last):
            raise JournalCorruptError(f"{self.path}: entry {head.entries} differs from its {what}: the journal was rewritten")

    def _checked_entries(self, lines: list[str]) -> list[JournalEntry]:
        entries = self._parse(lines)
        stored = self._stored_head()
        if stored is None and entries:
            raise JournalCorruptError(f"{self.head_path} is missing for a journal of {len(entries)} entries: "
                                      "the head was deleted or the journal replaced; restore both from a backup")
        self._check_against(stored, entries, what="head file")
        self._check_against(_seen_heads.get(str(self.path)), entries, what="last head seen by this process")
        return entries

    def _remember(self, entries: list[JournalEntry]) -> None:
        _seen_heads[str(self.path)] = JournalHead(len(entries), entries[-1].digest if entries else self.genesis)

    def head(self) -> JournalHead:
        """Entries and last MAC of the verified journal."""
        entries = self.entries()
        return JournalHead(len(entries), entries[-1].digest if entries else self.genesis)

    # ---- reading and appending ---------------------------------------------------------------
    def entries(self) -> list[JournalEntry]:
        """All entries, verified against the chain and the head. Raises JournalCorruptError otherwise."""
        with self._locked():
            lines, _ = self._read_lines()
            entries = self._checked_entries(lines)
            self._remember(entries)
            return entries

    def verify(self) -> int:
        """Verify the whole chain and the head; return the number of entries."""
        return len(self.entries())

    def append(self, record: Mapping[str, Any]) -> JournalEntry:
        """Durably append ``record``; returns only once it and the new head are on disk."""
        canonical_json(record)  # refuse non-JSON values before touching the file
        with self._locked():
            lines, intact = self._read_lines()
            entries = self._checked_entries(lines)
            prev = entries[-1].digest if entries else self.genesis
            entry = JournalEntry.seal(self._key, len(entries), prev, record)
            if not entries and not self.head_path.exists():
                # A head before the first line: a crash between that line and its head then leaves a journal
                # one entry ahead of its head (accepted), not a line without any head (refused as tampering).
                self._write_head(JournalHead(0, self.genesis))
            with os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as handle:
                handle.truncate(intact)  # drop a torn tail from an earlier crash
                handle.seek(intact)
                handle.write((entry.to_line() + "\n").encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            if intact == 0:
                _fsync_dir(self.path.parent)
            # A crash between the line and the head leaves the journal one entry ahead of its head:
            # accepted on the next read (the entry carries a valid MAC), and the head catches up here.
            self._write_head(JournalHead(entry.seq + 1, entry.digest))
            self._remember([*entries, entry])
            return entry

    def _write_head(self, head: JournalHead) -> None:
        write_json_atomic(self.head_path, {"entries": head.entries, "last": head.last, "mac": self._head_mac(head)},
                          mode=0o600)

    def rewrite(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Replace the whole journal by ``records`` (only for a data-dir migration, under the lock)."""
        for record in records:
            canonical_json(record)
        with self._locked():
            prev, lines, entries = self.genesis, [], []
            for seq, record in enumerate(records):
                entry = JournalEntry.seal(self._key, seq, prev, record)
                lines.append(entry.to_line() + "\n")
                entries.append(entry)
                prev = entry.digest
            write_bytes_atomic(self.path, "".join(lines).encode("utf-8"), mode=0o600)
            self._write_head(JournalHead(len(entries), prev))
            self._remember(entries)
