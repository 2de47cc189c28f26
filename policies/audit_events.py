"""The events of a site's audit log (``policies.audit``): frozen values, checked when made and when read back.

Decoding is strict: an unknown ``kind``, a missing or extra field, or a field of the wrong type is an
error, never skipped, because an auditor must be able to account for every line.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from policies.durable import JournalCorruptError
from policies.identity import check_researcher_id

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class AuditEventError(ValueError):
    """An audit event was built with a missing or invalid field."""


class AuditIntegrityError(JournalCorruptError):
    """The audit log on disk was tampered with, damaged, or does not match an anchor."""


def utc_now() -> str:
    """The current time as an ISO 8601 string in UTC, to the microsecond."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise AuditEventError(f"{name} must be a non-empty string, got {value!r}")


def _check_sha256(name: str, value: object) -> None:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise AuditEventError(f"{name} must be a SHA-256 as 64 lowercase hex digits, got {value!r}")


def _check_researcher(name: str, value: object) -> None:
    try:
        check_researcher_id(value)
    except ValueError as exc:
        raise AuditEventError(f"{name}: {exc}") from None


def _check_round(name: str, value: object) -> None:
    # bool is an int: refuse round=True explicitly
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AuditEventError(f"{name} must be an int >= 0, got {value!r}")


def _check_number(name: str, value: object, *, below_one: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise AuditEventError(f"{name} must be a finite number >= 0, got {value!r}")
    if below_one and value >= 1:
        raise AuditEventError(f"{name} must be < 1, got {value!r}")


def _check_timestamp(value: object) -> None:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() != timedelta(0):
        raise AuditEventError(
            f"timestamp must be an ISO 8601 string in UTC such as {utc_now()!r}, got {value!r}"
        )


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """Base of every audit event. Subclasses set ``kind``, the tag stored on disk."""

    kind: ClassVar[str] = ""
    timestamp: str = field(default_factory=utc_now)  # when the site recorded it, ISO 8601 UTC

    def __post_init__(self) -> None:
        _check_timestamp(self.timestamp)

    def to_record(self) -> dict[str, Any]:
        """The JSON object written to the journal: ``kind`` plus every field."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class _RequestEvent(AuditEvent):
    """Fields shared by the events about one researcher's code request."""

    request_id: str  # syft's id of the code request
    code_hash: str  # policies.review.code_hash of the submitted source
    researcher: str  # the requesting user's immutable id (syft user id, policies.identity)
    researcher_email: str  # the requesting user's e-mail at the time (shown beside the id; never a key)
    dataset: str  # the site's dataset the code runs on

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text("request_id", self.request_id)
        _check_sha256("code_hash", self.code_hash)
        _check_researcher("researcher", self.researcher)
        _check_text("researcher_email", self.researcher_email)
        _check_text("dataset", self.dataset)


@dataclass(frozen=True, kw_only=True)
class RequestApproved(_RequestEvent):
    """An admin approved exactly this code, for exactly this training plan."""

    kind: ClassVar[str] = "request_approved"
    plan_digest: str  # SHA-256 of the approved plan (rounds, epsilon, ...)
    admin: str  # who approved it

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sha256("plan_digest", self.plan_digest)
        _check_text("admin", self.admin)


@dataclass(frozen=True, kw_only=True)
class RequestDenied(_RequestEvent):
    """An admin denied a request; ``reason`` is what the researcher is told."""

    kind: ClassVar[str] = "request_denied"
    admin: str
    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text("admin", self.admin)
        _check_text("reason", self.reason)


@dataclass(frozen=True, kw_only=True)
class ExecutionAuthorised(_RequestEvent):
    """The site's policy let one round of approved code run on private data."""

    kind: ClassVar[str] = "execution_authorised"
    round: int  # the federated round the execution belongs to

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_round("round", self.round)


@dataclass(frozen=True, kw_only=True)
class ExecutionRefused(_RequestEvent):
    """The site's policy blocked a run (changed code, stale round, budget spent, ...)."""

    kind: ClassVar[str] = "execution_refused"
    round: int | None  # None when the request did not even carry a valid round
    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.round is not None:
            _check_round("round", self.round)
        _check_text("reason", self.reason)


@dataclass(frozen=True, kw_only=True)
class PrivacySpent(AuditEvent):
    """Record-level DP spent by one round; written before the round's output leaves the site."""

    kind: ClassVar[str] = "privacy_spent"
    request_id: str
    dataset: str
    researcher: str  # the researcher's immutable id
    epsilon: float  # epsilon of this round alone, >= 0
    delta: float  # delta of this round alone, in [0, 1)
    round: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text("request_id", self.request_id)
        _check_text("dataset", self.dataset)
        _check_researcher("researcher", self.researcher)
        _check_number("epsilon", self.epsilon)
        _check_number("delta", self.delta, below_one=True)
        _check_round("round", self.round)


@dataclass(frozen=True, kw_only=True)
class OutputReleased(AuditEvent):
    """The digest of the exact bytes that left the site, so a leaked output can be traced."""

    kind: ClassVar[str] = "output_released"
    request_id: str
    output_sha256: str
    round: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text("request_id", self.request_id)
        _check_sha256("output_sha256", self.output_sha256)
        _check_round("round", self.round)


@dataclass(frozen=True, kw_only=True)
class ApiCallRefused(AuditEvent):
    """The site's API gate refused a call of a caller below the data-owner role (datasites.gate)."""

    kind: ClassVar[str] = "api_call_refused"
    path: str  # the syft service path (or HTTP route) that was called
    caller: str  # the caller's immutable id, or "unknown" when its key belongs to no account
    caller_email: str  # the caller's e-mail at the time, or "unknown"
    role: str  # the caller's syft role
    reason: str  # what the caller was told

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("path", "caller", "caller_email", "role", "reason"):
            _check_text(name, getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class LogMigrated(AuditEvent):
    """The data dir was migrated to a new format; the old log's head is kept so an old anchor still checks."""

    kind: ClassVar[str] = "log_migrated"
    from_format: int
    to_format: int
    old_entries: int  # entries of the log before the migration (its old anchor's N)
    old_head: str  # the old log's last hash (its old anchor's HASH)
    backup: str  # where the old files were kept, relative to the data dir

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_round("from_format", self.from_format)
        _check_round("to_format", self.to_format)
        _check_round("old_entries", self.old_entries)
        _check_text("old_head", self.old_head)
        _check_text("backup", self.backup)


EVENT_TYPES: dict[str, type[AuditEvent]] = {
    cls.kind: cls
    for cls in (RequestApproved, RequestDenied, ExecutionAuthorised, ExecutionRefused, PrivacySpent, OutputReleased,
                ApiCallRefused, LogMigrated)
}


def decode_event(record: object, *, where: str = "record") -> AuditEvent:
    """Rebuild a typed event from its journal record; refuse anything that is not exactly one."""
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        raise AuditIntegrityError(f"{where}: not an audit event (no 'kind'): {record!r}")
    cls = EVENT_TYPES.get(record["kind"])
    if cls is None:
        raise AuditIntegrityError(
            f"{where}: unknown audit event kind {record['kind']!r} (known: {', '.join(sorted(EVENT_TYPES))}); "
            "it was written by another Fedsite version or forged"
        )
    expected = {f.name for f in fields(cls)}
    given = set(record) - {"kind"}
    if given != expected:
        raise AuditIntegrityError(
            f"{where}: {cls.kind} has missing fields {sorted(expected - given)} "
            f"and unexpected fields {sorted(given - expected)}"
        )
    try:
        return cls(**{name: record[name] for name in expected})
    except AuditEventError as exc:
        raise AuditIntegrityError(f"{where}: {exc}") from exc
