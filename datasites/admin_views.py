"""What `fedsite admin` prints: the request table, an approval, the audit log, the privacy ledgers.

Every text that came from a researcher (function names, e-mails, reasons) is shown through
``policies.review.printable``, so it cannot carry terminal escapes. The ledger views open each ledger
with the accountant it was written with and replay it for ``--verify``; a ledger that does not verify is
a FedsiteError naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from datasites.errors import FedsiteError
from datasites.request_ids import SHORT_ID
from datasites.sitedir import SiteDir
from policies.review import printable


def render_requests(site_name: str, requests: Sequence[Any]) -> str:
    """The table of ``fedsite admin requests``."""
    if not requests:
        return f"site {site_name}: no requests yet"
    lines = [f"site {site_name}",
             f"{'request':<{SHORT_ID}}  {'function':<30} {'researcher (e-mail, id)':<45} status"]
    lines += [f"{r.request_id[:SHORT_ID]}  {r.function:<30} {f'{r.researcher_email} {r.researcher[:12]}':<45} {r.status}"
              for r in requests]
    return printable("\n".join(lines))


def render_approval(approval: Any) -> str:
    calibrated, dp = approval.calibrated, approval.plan["dp"]
    return (f"approved request {approval.request_id[:SHORT_ID]} from {approval.researcher} on {approval.dataset}: "
            f"run {approval.plan['run_id']}, {dp['rounds']} rounds x {dp['local_steps']} local steps, noise "
            f"multiplier {calibrated['noise_multiplier']:.3f}, projected epsilon "
            f"{calibrated['projected_epsilon']:.3f} of budget {calibrated['budget_epsilon']:g}")


# The fields of an audit event worth a column, in print order; hashes and ids are shortened.
_EVENT_FIELDS = ("request_id", "researcher", "dataset", "admin", "epsilon", "delta", "output_sha256", "code_hash",
                 "reason")
_SHORTENED = {"request_id", "output_sha256", "code_hash"}
_ANCHOR = re.compile(r"(?P<count>[0-9]+):(?P<digest>[0-9a-f]{64})")


def parse_anchor(text: str) -> Any:
    """``N:HASH`` as written down from an earlier ``audit --verify``."""
    from policies.audit import AuditHead

    match = _ANCHOR.fullmatch(text)
    if match is None:
        raise FedsiteError(f"--anchor {text!r} is not N:HASH (entries, then 64 lowercase hex digits): copy it from "
                           "the `write down this anchor` line of an earlier `fedsite admin audit --verify`")
    return AuditHead(int(match["count"]), match["digest"])


def render_event(number: int, event: Any) -> str:
    """One audit event: its line number, time, kind, round and key fields."""
    record = event.to_record()
    round_ = record.get("round")
    fields = [f"{name}={str(record[name])[:SHORT_ID] if name in _SHORTENED else record[name]}"
              for name in _EVENT_FIELDS if name in record]
    return (f"{number:>5}  {event.timestamp[:19]}Z  {event.kind:<20} "
            f"{'-' if round_ is None else round_:>5}  {' '.join(fields)}")


def render_events(events: Sequence[Any]) -> str:
    if not events:
        return "the audit log is empty"
    header = f"{'line':>5}  {'time (UTC)':<20}  {'kind':<20} {'round':>5}  fields"
    return printable("\n".join([header, *(render_event(n, e) for n, e in enumerate(events, start=1))]))


def _ledgers(site: Any) -> list[Any]:
    """Every privacy ledger of the site, opened with the accountant it was written with."""
    from policies.durable import site_journal
    from policies.ledger import LEDGER_DIR, PrivacyLedger

    ledgers = []
    for path in sorted((site.path / LEDGER_DIR).glob("*/*.jsonl")):
        try:
            entries = site_journal(site.path, path.relative_to(site.path)).entries()
            accountant = str(entries[0].record["accountant"]) if entries else "prv"
            ledgers.append(PrivacyLedger(site.path, path.parent.name, path.stem, site=site.meta().name,
                                         accountant=accountant))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise FedsiteError(f"privacy ledger {path} failed verification: {exc}") from None
    return ledgers


def _spent_and_budget(ledger: Any) -> tuple[float, float]:
    from policies.budget import BudgetError

    try:
        return ledger.spent(), ledger.budget.epsilon
    except BudgetError as exc:
        raise FedsiteError(f"privacy ledger {ledger.path}: {exc}") from None


def render_ledgers(site: Any) -> str:
    """The table of ``fedsite admin ledger``: what each researcher spent of each dataset's budget."""
    ledgers = _ledgers(site)
    if not ledgers:
        return f"site {site.meta().name}: no privacy spent yet"
    emails = _researcher_emails(site)
    lines = [f"site {site.meta().name}",
             f"{'dataset':<16} {'researcher (id, e-mail)':<50} {'records':>7} {'spent':>9} {'budget':>9}"]
    for ledger in ledgers:
        spent, budget = _spent_and_budget(ledger)
        who = f"{ledger.researcher} {emails.get(ledger.researcher, '?')}"
        lines.append(f"{ledger.dataset:<16} {who:<50} {len(ledger.records()):>7} {spent:>9.4f} {budget:>9g}")
    return "\n".join(lines)


def _researcher_emails(site: Any) -> dict[str, str]:
    """Each researcher id's e-mail as its latest approval recorded it (ledgers are keyed by id only)."""
    from policies.approvals import ApprovalRegistry

    emails = {}
    for entry in ApprovalRegistry(site.path).journal.entries():
        record = entry.record
        if record.get("kind") == "approval":
            emails[str(record["researcher"])] = str(record["researcher_email"])
    return emails


def _verify_ledgers(site: Any) -> list[str]:
    """Replay every ledger: the chain, and each stored epsilon recomputed from the events."""
    from policies.durable import JournalCorruptError
    from policies.ledger import LedgerReplayError

    lines = []
    for ledger in _ledgers(site):
        try:
            records = ledger.replay()
        except (LedgerReplayError, JournalCorruptError) as exc:
            raise FedsiteError(f"privacy ledger failed verification: {exc}") from None
        spent, budget = _spent_and_budget(ledger)
        lines.append(f"privacy ledger {ledger.dataset} / {ledger.researcher}: {len(records)} records replayed, "
                     f"spent epsilon {spent:.4f} of budget {budget:g}")
    return lines or ["no privacy ledgers yet"]


def _verify_approvals(site: Any) -> str:
    from policies.approvals import ApprovalRegistry
    from policies.durable import JournalCorruptError

    journal = ApprovalRegistry(site.path).journal
    try:
        count = journal.verify()
    except JournalCorruptError as exc:
        raise FedsiteError(f"approvals journal failed verification: {exc}") from None
    return f"approvals journal {journal.path}: {count} entries, chain intact"


def verify_all(site: Any, log: Any, anchor: Any) -> str:
    report = log.verify(anchor=anchor)
    return "\n".join([report.render_text(), _verify_approvals(site), *_verify_ledgers(site),
                      f"write down this anchor: --anchor {report.head.n_entries}:{report.head.last_hash}"])


def audit_report(data_dir: str, *, verify: bool, anchor: str | None) -> str:
    """``fedsite admin audit``: the events; with ``verify``, the chains checked (against ``anchor``) and ledgers replayed."""
    from policies.audit import AuditIntegrityError, AuditLog

    if anchor is not None and not verify:
        raise FedsiteError("--anchor is checked only by --verify: pass both")
    head = parse_anchor(anchor) if anchor is not None else None
    site = SiteDir(data_dir)
    site.meta()
    log = AuditLog(site.path)
    try:
        text = render_events(log.events())
        return f"{text}\n\n{verify_all(site, log, head)}" if verify else text
    except AuditIntegrityError as exc:
        raise FedsiteError(f"{exc}: restore audit.jsonl from a backup and find out who changed it") from None


def update_peers(data_dir: str | None, action: str, *, name: str | None, key: str | None,
                 threshold: int | None) -> str:
    """``fedsite admin peers list | add | remove | threshold``: the change, then the pinned peers as they are now."""
    from datasites.admin import render_peers
    from policies.peers import PeerPinError, PeerPins

    if data_dir is None:
        raise FedsiteError("which site? pass --data-dir DIR")
    site = SiteDir(data_dir)
    pins = PeerPins(site.path, own_name=site.meta().name)
    try:
        if action == "add":
            pins.add(str(name), str(key).strip().lower())
        elif action == "remove":
            pins.remove(str(name))
        elif action == "threshold":
            pins.set_min_threshold(int(threshold))  # type: ignore[arg-type]
        return render_peers(pins.load())
    except PeerPinError as exc:
        raise FedsiteError(str(exc)) from None


__all__ = ["audit_report", "parse_anchor", "render_approval", "render_event", "render_events", "render_ledgers",
           "render_requests", "update_peers", "verify_all"]
