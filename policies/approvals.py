"""The site's own record of what its admin approved, and the guard that makes syft obey it.

syft 0.9.5 lets approved code run without limit, takes policy source from the researcher, and runs
code with plain ``exec`` (docs/syft.md, "Policies, approval and execution"). So a Fedsite site does not trust syft's
approval flag alone: the admin approves through Fedsite (`fedsite admin approve`), which records an
``Approval`` for the exact code hash in the site's append-only ``approvals.jsonl``, and the datasite
server wraps syft's user-code execution with ``guard_execution``: a run whose code hash, researcher
and dataset do not match a recorded, unrevoked approval is refused *before* any code executes.

Inside an authorised run the guard publishes an ``ExecutionContext`` (site, data dir, approval,
researcher) through a context variable; the site's runtime (``policies``) reads it to find its
ledger and the approved plan, and refuses to work outside a guarded run.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from policies.durable import canonical_json, sha256_hex, site_journal

APPROVALS_FILE = "approvals.jsonl"


class ExecutionRefusedError(PermissionError):
    """A run the site's own records do not authorise."""


def plan_digest(plan: Mapping[str, Any]) -> str:
    """SHA-256 of the plan's canonical JSON: what the admin approved is exactly what runs."""
    return sha256_hex(canonical_json(dict(plan)))


@dataclass(frozen=True)
class Approval:
    """One approved request, as the site recorded it at approval time."""

    request_id: str  # syft request UID (hex)
    code_hash: str  # policies.review.code_hash of the submitted source
    researcher: str  # the researcher's immutable id on this site (syft user id, policies.identity)
    researcher_email: str  # the researcher's e-mail when the admin approved (shown beside the id, never a key)
    dataset: str  # the only dataset this code may read
    plan: Mapping[str, Any] = field(hash=False)  # the approved federated plan (JSON, policies.federated_plan)
    calibrated: Mapping[str, Any] = field(hash=False)  # policies.dp.CalibratedPlan fixed at approval (JSON)
    admin: str  # who approved
    approved_at: str  # UTC ISO time

    @property
    def plan_digest(self) -> str:
        return plan_digest(self.plan)

    def to_record(self) -> dict[str, Any]:
        return {"kind": "approval", **asdict(self), "plan": dict(self.plan), "calibrated": dict(self.calibrated)}


class ApprovalRegistry:
    """Append-only approvals and revocations of one site."""

    def __init__(self, data_dir: Path) -> None:
        self.journal = site_journal(Path(data_dir), APPROVALS_FILE)

    def record(self, approval: Approval) -> None:
        if self.find(approval.code_hash, researcher=approval.researcher) is not None:
            raise ExecutionRefusedError(
                f"code {approval.code_hash[:12]} is already approved for {approval.researcher}: nothing changed"
            )
        self.journal.append(approval.to_record())

    def revoke(self, code_hash: str, *, reason: str, admin: str) -> None:
        self.journal.append({"kind": "revocation", "code_hash": code_hash, "reason": reason, "admin": admin})

    def find(self, code_hash: str, *, researcher: str) -> Approval | None:
        """The live approval of ``code_hash`` for ``researcher``, if any (a revocation ends it)."""
        found: Approval | None = None
        for entry in self.journal.entries():
            record = dict(entry.record)
            if record.get("code_hash") != code_hash:
                continue
            if record["kind"] == "revocation":
                found = None
            elif record["researcher"] == researcher:
                record.pop("kind")
                found = Approval(**record)
        return found

    def all(self) -> list[Approval]:
        approvals = {}
        for entry in self.journal.entries():
            record = dict(entry.record)
            kind = record.pop("kind")
            if kind == "approval":
                approvals[record["code_hash"]] = Approval(**record)
            else:
                approvals.pop(record["code_hash"], None)
        return list(approvals.values())


@dataclass(frozen=True)
class ExecutionContext:
    """What the site's runtime may rely on inside an authorised run."""

    site: str  # this site's name
    data_dir: Path  # this site's data dir (ledger, budgets, audit log, round state)
    approval: Approval  # the approval that authorised this run
    researcher: str  # who called: the caller's immutable id (policies.identity.check_researcher_id)
    researcher_email: str  # the caller's e-mail now (for the audit log's readers; never a key)
    dry_run: bool = False  # the admin's review running the code on the mock twin; never set by the guard
    device: str = "cpu"  # the torch device the site trains on (`fedsite serve --device`)


_current: contextvars.ContextVar[ExecutionContext | None] = contextvars.ContextVar("fedsite_execution", default=None)


def current_execution() -> ExecutionContext:
    """The authorised run this code is part of; refuses to work outside one."""
    execution = _current.get()
    if execution is None:
        raise ExecutionRefusedError(
            "the Fedsite site runtime runs only inside a site-authorised execution (an approved request on a "
            "Fedsite datasite); to try code locally use the researcher's dry run on the mock"
        )
    return execution


@contextmanager
def authorised(execution: ExecutionContext) -> Iterator[ExecutionContext]:
    token = _current.set(execution)
    try:
        yield execution
    finally:
        _current.reset(token)
