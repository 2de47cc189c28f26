"""Migrating a data dir from format 1 to format 2 at the site's start, losing no spend.

Format 1 keyed researchers by e-mail (which syft lets a user change: a renamed account started a
fresh ledger) and chained its journals with plain SHA-256 from a fixed genesis (a cut-off or
recomputed chain still verified). Format 2 keys them by syft's immutable user id and MACs every
journal under the site's journal key (``policies.durable``). The migration needs syft's user table
to map each e-mail to its id, so it runs in ``launch_in_process`` after syft's store is open and
before the site answers anyone.

Steps, each re-runnable after a crash: copy every journal to ``migrated-from-format-1/`` (once: the
copy is then the source), verify each copy's old SHA-256 chain, rewrite it re-keyed and MACed,
append a ``log_migrated`` event to the audit log with the old log's head (so an anchor written down
before still checks against the copy), and write ``fedsite.json`` with format 2 last.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from datasites.errors import FedsiteError
from datasites.sitedir import FORMAT, SiteDir
from policies.approvals import APPROVALS_FILE
from policies.audit import AUDIT_FILE, EVENT_TYPES, AuditLog, LogMigrated
from policies.durable import canonical_json, private_dirs, read_json, site_journal, write_json_atomic
from policies.ledger import LEDGER_DIR

BACKUP_DIR = "migrated-from-format-1"
_FORMAT1_GENESIS = "0" * 64
# Audit event kinds that named the requesting researcher by e-mail and now carry id and e-mail.
_REQUEST_KINDS = frozenset({"request_approved", "request_denied", "execution_authorised", "execution_refused"})


def read_format1_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a format-1 journal, after checking its SHA-256 chain; raises naming the bad line."""
    records: list[dict[str, Any]] = []
    prev = _FORMAT1_GENESIS
    raw = path.read_bytes() if path.exists() else b""
    intact = raw[: raw.rfind(b"\n") + 1].decode("utf-8")  # a torn tail was never acknowledged
    for number, line in enumerate(intact.splitlines()):
        try:
            obj = json.loads(line)
            body = {"seq": int(obj["seq"]), "prev": str(obj["prev"]), "record": obj["record"]}
            stored = str(obj["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FedsiteError(f"cannot migrate {path}: line {number + 1} is not a journal entry ({exc}); "
                               "restore the file from a backup, then start the site again") from None
        digest = hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()
        if body["seq"] != number or body["prev"] != prev or digest != stored:
            raise FedsiteError(f"cannot migrate {path}: line {number + 1} breaks its hash chain; restore the file "
                               "from a backup, then start the site again")
        records.append(dict(body["record"]))
        prev = digest
    return records


def format1_head(path: Path) -> tuple[int, str]:
    """(entries, last hash) of a verified format-1 journal: its old anchor."""
    records = read_format1_journal(path)
    raw = path.read_bytes() if path.exists() else b""
    lines = raw[: raw.rfind(b"\n") + 1].decode("utf-8").splitlines()
    return len(records), (str(json.loads(lines[-1])["hash"]) if lines else _FORMAT1_GENESIS)


def _journals(root: Path) -> list[Path]:
    """Every journal of a format-1 data dir, relative to it."""
    found = [Path(APPROVALS_FILE), Path(AUDIT_FILE)]
    found += sorted(p.relative_to(root) for p in (root / LEDGER_DIR).glob("*/*.jsonl"))
    found += sorted(p.relative_to(root) for p in (root / "runs").glob("*/sessions.jsonl"))
    return [p for p in found if (root / p).exists()]


def _copy_once(site: SiteDir) -> Path:
    backup = site.path / BACKUP_DIR
    if (backup / "complete").exists():
        return backup
    shutil.rmtree(backup, ignore_errors=True)  # a copy cut short by a crash is made again
    for relative in _journals(site.path):
        target = backup / relative
        private_dirs(target.parent)
        shutil.copy2(site.path / relative, target)
    (backup / "complete").write_text("every format-1 journal of this data dir, before the migration\n")
    return backup


def _researcher(ids: Mapping[str, str], email: object, where: str) -> str:
    if not isinstance(email, str) or email not in ids:
        raise FedsiteError(
            f"cannot migrate {where}: it names researcher {email!r}, who has no account on this site any more, so "
            "its spend cannot be tied to an immutable id; re-create the account with that e-mail "
            "(`fedsite admin add-researcher`) and start the site again"
        )
    return ids[email]


def _rekey(record: Mapping[str, Any], ids: Mapping[str, str], where: str) -> dict[str, Any]:
    """One format-1 record with its researcher e-mail replaced by the id (and kept beside it where shown)."""
    out = dict(record)
    kind = out.get("kind")
    if "researcher" not in out or kind == "revocation":
        return out
    email = out["researcher"]
    out["researcher"] = _researcher(ids, email, where)
    if kind == "approval" or kind in _REQUEST_KINDS:
        out["researcher_email"] = email
    return out


def _ledger_target(relative: Path, ids: Mapping[str, str], root: Path) -> Path:
    email = relative.stem
    return relative.with_name(f"{_researcher(ids, email, str(root / relative))}.jsonl")


def _migrated(source: Path, relative: Path, ids: Mapping[str, str]) -> tuple[Path, list[dict[str, Any]]]:
    """Where one journal goes and its re-keyed records; raises, naming the file, before anything is written."""
    where = source / relative
    records = [_rekey(record, ids, str(where)) for record in read_format1_journal(where)]
    if relative.name == AUDIT_FILE:
        unknown = {r.get("kind") for r in records} - set(EVENT_TYPES)
        if unknown:
            raise FedsiteError(f"cannot migrate {where}: unknown event kinds {sorted(map(str, unknown))}")
    target = _ledger_target(relative, ids, source) if relative.parts[0] == LEDGER_DIR else relative
    return target, records


def migrate_format1(site: SiteDir, researcher_ids: Mapping[str, str]) -> list[str]:
    """Migrate ``site`` from format 1 (see the module docstring); returns what was done, line by line.

    ``researcher_ids`` maps every e-mail of syft's user table to its user id (hex). Every journal is read,
    checked and re-keyed before the first is written: a refusal changes nothing, and names the file to
    restore. A copy of the originals is made once, after they all checked out; a migration cut short by a
    crash starts again from that copy.
    """
    meta = site.meta(current=False)
    if meta.format == FORMAT:
        return []
    backup = site.path / BACKUP_DIR
    source = backup if (backup / "complete").exists() else site.path
    planned = {relative: _migrated(source, relative, researcher_ids) for relative in _journals(source)}
    owners = _run_owners(planned.get(Path(APPROVALS_FILE), (None, []))[1])
    planned = {relative: (_run_target(target, owners), records) for relative, (target, records) in planned.items()}
    old_entries, old_head = format1_head(source / AUDIT_FILE)
    _copy_once(site)
    done = []
    for relative, (target, records) in planned.items():
        (site.path / relative).unlink(missing_ok=True)
        site_journal(site.path, target).rewrite(records)
        done.append(f"{relative} -> {target}")
    done += _move_round_states(site.path, owners)
    AuditLog(site.path).record(LogMigrated(from_format=meta.format, to_format=FORMAT, old_entries=old_entries,
                                           old_head=old_head, backup=BACKUP_DIR))
    write_json_atomic(site.meta_path, {**read_json(site.meta_path), "format": FORMAT}, mode=0o600)
    return done


def _run_owners(approvals: list[dict[str, Any]]) -> dict[str, str]:
    """Run id -> the researcher id it was approved for (format 2 keeps runs under runs/<researcher>/<run>/)."""
    return {str(r["plan"]["run_id"]): str(r["researcher"]) for r in approvals
            if r.get("kind") == "approval" and isinstance(r.get("plan"), dict) and "run_id" in r["plan"]}


def _run_target(target: Path, owners: Mapping[str, str]) -> Path:
    if target.parts[0] == "runs" and len(target.parts) == 3 and target.parts[1] in owners:
        return Path("runs") / owners[target.parts[1]] / target.parts[1] / target.name
    return target  # a run no approval names (a dry run's leftovers): left where it was


def _move_round_states(root: Path, owners: Mapping[str, str]) -> list[str]:
    """Each run's secure-sum state files, to where format 2 keeps them (the journals already moved)."""
    moved = []
    for run, researcher in owners.items():
        old, new = root / "runs" / run, root / "runs" / researcher / run
        for state in sorted(old.glob("round-*.state")) if old.is_dir() else []:
            private_dirs(new)
            state.rename(new / state.name)
            moved.append(f"{state.relative_to(root)} -> {(new / state.name).relative_to(root)}")
    return moved


def researcher_ids(users: Iterable[Any]) -> dict[str, str]:
    """E-mail -> immutable id of syft's users (its stash's User objects)."""
    return {str(user.email): str(user.id.no_dash) for user in users}
