"""The site's audit log: who approved which code, what ran, what it spent and what left the site.

Every datasite keeps ``<data-dir>/audit.jsonl``, an append-only ``HashChainedJournal`` (see
``policies/durable.py``) of frozen events: approvals and denials of researchers' requests,
executions that were authorised or refused, API calls the site's gate refused, privacy spent, and
the SHA-256 of every output released. Each line carries a MAC (under the site's journal key) over
itself and the line before it, so editing, deleting, reordering or inserting a line breaks the chain
and ``verify`` names the first bad line; a MACed head file catches lines cut off the end.

Notes
-----
Someone who holds the site's journal key (i.e. can read the data dir's secrets) can still rewrite
the whole log, and someone who can restore an older copy of log *and* head can roll it back
between two runs of the site. Both are caught by anchoring: ``head()`` returns ``(n_entries,
last_hash)``, the admin writes it down somewhere the site cannot rewrite (a ticket, a notebook, a
signed e-mail), and a later ``verify(anchor=...)`` refuses a log that is shorter than the anchor or
whose entry at that position has a different hash.

Decoding is strict: an unknown ``kind``, a missing or extra field, or a field of the wrong type is an
error, never skipped, because an auditor must be able to account for every line (the events and
their checks are in ``policies.audit_events``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from policies.audit_events import (
    _SHA256_HEX,
    EVENT_TYPES,
    ApiCallRefused,
    AuditEvent,
    AuditEventError,
    AuditIntegrityError,
    ExecutionAuthorised,
    ExecutionRefused,
    LogMigrated,
    OutputReleased,
    PrivacySpent,
    RequestApproved,
    RequestDenied,
    decode_event,
    utc_now,
)
from policies.durable import JournalCorruptError, JournalEntry, site_journal

AUDIT_FILE = "audit.jsonl"


class AuditHead(NamedTuple):
    """What an admin writes down to detect later truncation or a rewrite of the whole chain."""

    n_entries: int  # number of entries in the log
    last_hash: str  # MAC of the last entry, the journal's genesis value for an empty log


@dataclass(frozen=True)
class AuditReport:
    """Outcome of ``AuditLog.verify``: reached only if the chain (and the anchor, if given) is intact."""

    path: Path
    head: AuditHead
    by_kind: tuple[tuple[str, int], ...]  # (kind, number of events), sorted by kind
    anchor: AuditHead | None  # the anchor that was checked, None if none was given
    torn_tail_bytes: int  # bytes after the last newline: a crash mid-append, or a truncated last line

    @property
    def warnings(self) -> tuple[str, ...]:
        found = []
        if self.torn_tail_bytes:
            found.append(
                f"{self.torn_tail_bytes} bytes after the last complete entry are ignored: a crash (or an append "
                "still in progress) or a truncated last line; verify with an anchor to tell them apart"
            )
        if self.anchor is None:
            found.append("no anchor given: removal of the last entries or a rewrite of the whole chain goes unseen")
        return tuple(found)

    def render_text(self) -> str:
        lines = [f"audit log {self.path}: {self.head.n_entries} entries, chain intact, head {self.head.last_hash}"]
        lines += [f"  {kind}: {count}" for kind, count in self.by_kind]
        if self.anchor is not None:
            lines.append(f"  matches anchor ({self.anchor.n_entries}, {self.anchor.last_hash})")
        lines += [f"  warning: {text}" for text in self.warnings]
        return "\n".join(lines)


class AuditLog:
    """The site's audit log in ``<data-dir>/audit.jsonl`` (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / AUDIT_FILE
        self._journal = site_journal(Path(data_dir), AUDIT_FILE)

    def _entries(self) -> list[JournalEntry]:
        try:
            return self._journal.entries()
        except JournalCorruptError as exc:
            raise AuditIntegrityError(f"audit log failed verification: {exc}") from exc

    def record(self, event: AuditEvent) -> AuditHead:
        """Durably append ``event``; returns the head including it, once it is on disk.

        Refuses to extend a log whose chain is already broken, so tampering cannot be buried
        under new entries.
        """
        if type(event) not in EVENT_TYPES.values():
            raise TypeError(f"record() takes one of {', '.join(EVENT_TYPES)} events, got {type(event).__name__}")
        try:
            entry = self._journal.append(event.to_record())
        except JournalCorruptError as exc:
            raise AuditIntegrityError(f"audit log failed verification, nothing recorded: {exc}") from exc
        return AuditHead(entry.seq + 1, entry.digest)

    def events(self) -> list[AuditEvent]:
        """Every event, typed, oldest first; raises AuditIntegrityError on any bad line."""
        return [
            decode_event(entry.record, where=f"{self.path}: line {entry.seq + 1}") for entry in self._entries()
        ]

    def head(self) -> AuditHead:
        """``(n_entries, last_hash)`` of the verified chain: the value an admin writes down as an anchor."""
        entries = self._entries()
        return AuditHead(len(entries), entries[-1].digest if entries else self._journal.genesis)

    def verify(self, *, anchor: AuditHead | None = None) -> AuditReport:
        """Check the chain, every event's type and fields, and ``anchor`` if given.

        Raises AuditIntegrityError naming the first bad line, or the way the log departs from the anchor.
        """
        entries = self._entries()
        events = [decode_event(e.record, where=f"{self.path}: line {e.seq + 1}") for e in entries]
        if anchor is not None:
            _check_anchor(anchor, entries, self.path, genesis=self._journal.genesis)
        head = AuditHead(len(entries), entries[-1].digest if entries else self._journal.genesis)
        raw = self.path.read_bytes() if self.path.exists() else b""
        return AuditReport(
            path=self.path,
            head=head,
            by_kind=tuple(sorted(Counter(event.kind for event in events).items())),
            anchor=anchor,
            torn_tail_bytes=len(raw) - (raw.rfind(b"\n") + 1),
        )


def _check_anchor(anchor: AuditHead, entries: list[JournalEntry], path: Path, *, genesis: str) -> None:
    n_entries, last_hash = anchor
    if isinstance(n_entries, bool) or not isinstance(n_entries, int) or n_entries < 0:
        raise ValueError(f"anchor n_entries must be an int >= 0, got {n_entries!r}")
    if not isinstance(last_hash, str) or not _SHA256_HEX.fullmatch(last_hash):
        raise ValueError(f"anchor last_hash must be 64 lowercase hex digits, got {last_hash!r}")
    if len(entries) < n_entries:
        raise AuditIntegrityError(
            f"{path}: has {len(entries)} entries but the anchor has {n_entries}: "
            "entries were removed from the end (truncated)"
        )
    found = entries[n_entries - 1].digest if n_entries else genesis
    if found != last_hash:
        raise AuditIntegrityError(
            f"{path}: entry {n_entries} has hash {found} but the anchor has {last_hash}: "
            "the log was rewritten up to that entry"
        )


__all__ = ["AUDIT_FILE", "EVENT_TYPES", "ApiCallRefused", "AuditEvent", "AuditEventError", "AuditHead", "AuditIntegrityError",
           "AuditLog", "AuditReport", "ExecutionAuthorised", "ExecutionRefused", "LogMigrated", "OutputReleased",
           "PrivacySpent", "RequestApproved", "RequestDenied", "decode_event", "utc_now"]
