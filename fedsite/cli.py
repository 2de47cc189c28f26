"""The `fedsite` command line: data owners' commands (partition, serve, admin ...)."""

from __future__ import annotations

import argparse
import os
import re
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasites.errors import FedsiteError
from fedsite.run_cli import add_run_parser

RESEARCHER_PASSWORD_ENV = "FEDSITE_RESEARCHER_PASSWORD"


def printable(text: str) -> str:
    """Researchers' text (function names, e-mails, audit reasons) without terminal escapes (policies.review)."""
    from policies.review import printable as escape

    return escape(text)


def _add_partition_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--imdb", default=None, help="IMDB source: folder, aclImdb/ or HF name (default $FEDSITE_IMDB)")
    parser.add_argument("--sites", type=int, required=required, help="number of sites to partition into")
    parser.add_argument("--scheme", default="iid", choices=["iid", "label-skew", "quantity-skew"])
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the skewed schemes")
    parser.add_argument("--seed", type=int, default=0, help="partition seed (the same on every site)")


def cmd_partition(args: argparse.Namespace) -> None:
    from datasites.data import load_imdb
    from datasites.partition import partition_indices, partition_stats, render_stats

    reviews = load_imdb(args.imdb, split="train")
    parts = partition_indices(reviews["label"].to_numpy(), n_sites=args.sites, scheme=args.scheme,
                              seed=args.seed, alpha=args.alpha)
    if args.stats or not args.out:
        print(render_stats(partition_stats(parts, reviews["label"].to_numpy())))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for site, rows in enumerate(parts):
            reviews.iloc[rows].reset_index(drop=True).to_parquet(out / f"site-{site}.parquet")
        print(f"wrote {len(parts)} partitions to {out}/site-<i>.parquet")


def cmd_serve(args: argparse.Namespace) -> None:
    """`fedsite serve`: the flags are checked (database URL, host and TLS, admin password) before the site starts."""
    from datasites.secrets import admin_password, database_url
    from datasites.server import check_transport, serve

    db_url = database_url(url=args.db_url, file=args.db_url_file)
    scheme = check_transport(args.host, tls_cert=args.tls_cert, tls_key=args.tls_key,
                             insecure_http=args.insecure_http)
    password = admin_password(args.admin_password_file)
    print(f"serving {args.name or args.data_dir} on {scheme}://{args.host}:{args.port} (Ctrl-C or SIGTERM stops it)",
          flush=True)
    serve(args.data_dir, admin_password=password, name=args.name, port=args.port, host=args.host,
          admin_email=args.admin_email, db_url=db_url, n_consumers=args.workers, device=args.device,
          tls_cert=args.tls_cert, tls_key=args.tls_key, insecure_http=args.insecure_http)


def _admin_client(args: argparse.Namespace) -> tuple[Any, Any]:
    from datasites.admin import connect_admin
    from datasites.secrets import admin_password
    from datasites.sitedir import SiteDir

    site = SiteDir(args.data_dir)
    site.meta()
    return site, connect_admin(site, password=admin_password(args.admin_password_file), ca=args.ca)


def cmd_add_researcher(args: argparse.Namespace) -> None:
    from datasites.admin import add_researcher
    from datasites.secrets import read_secret

    password = read_secret(env=RESEARCHER_PASSWORD_ENV, file=args.password_file, what="researcher password")
    site, client = _admin_client(args)
    researcher_id = add_researcher(client, name=args.name, email=args.email, password=password)
    print(f"added researcher {args.email} to site {site.meta().name}: id {researcher_id} (its approvals, ledgers and "
          "audit records are keyed by this id, which never changes)")


def cmd_upload(args: argparse.Namespace) -> None:
    import pandas as pd

    from datasites.admin import upload_partition
    from datasites.data import load_imdb
    from datasites.partition import partition_indices
    from policies.budget import BudgetError, PrivacyBudget

    try:
        budget = PrivacyBudget(epsilon=args.epsilon, delta=args.delta)
    except BudgetError as exc:
        raise FedsiteError(str(exc)) from None
    if args.data:
        if not Path(args.data).is_file():
            raise FedsiteError(f"--data {args.data} does not exist: pass a parquet file with text and label")
        reviews = pd.read_parquet(args.data)
    else:
        if args.sites is None or args.site_index is None:
            raise FedsiteError("pass --data FILE.parquet, or --sites N and --site-index I to take a partition")
        if not 0 <= args.site_index < args.sites:
            raise FedsiteError(f"--site-index {args.site_index} is outside 0..{args.sites - 1}")
        full = load_imdb(args.imdb, split="train")
        parts = partition_indices(full["label"].to_numpy(), n_sites=args.sites, scheme=args.scheme,
                                  seed=args.seed, alpha=args.alpha)
        reviews = full.iloc[parts[args.site_index]].reset_index(drop=True)
    site, client = _admin_client(args)
    report = upload_partition(client, site, dataset=args.dataset, reviews=reviews, budget=budget,
                              mock_seed=args.mock_seed, mock_epsilon=args.mock_epsilon)
    print(f"uploaded {report.dataset}: {report.n_records} private reviews ({report.positive_fraction:.1%} positive), "
          f"{report.n_mock} mock reviews; budget epsilon={budget.epsilon:g} delta={budget.delta:g}")
    print(f"mock twin: {report.mock.describe()}")


def cmd_budget(args: argparse.Namespace) -> None:
    from datasites.admin import render_budgets
    from datasites.sitedir import SiteDir

    print(render_budgets(SiteDir(args.data_dir)))


# ---- reviewing requests (the site must be running) ---------------------------------------------

MIN_REQUEST_PREFIX = 6
SHORT_ID = 12


def _request_prefix(given: str) -> str:
    """A request id or prefix, normalised; checked before any connection is made."""
    prefix = given.replace("-", "").lower()
    if len(prefix) < MIN_REQUEST_PREFIX or any(c not in string.hexdigits for c in prefix):
        raise FedsiteError(f"request id {given!r} must be at least {MIN_REQUEST_PREFIX} hex digits: "
                           "copy it from `fedsite admin requests`")
    return prefix


def _resolve_request(client: Any, prefix: str) -> Any:
    """The one request whose id starts with ``prefix``; an ambiguous prefix names every match."""
    from datasites.review_queue import list_requests

    matches = [r for r in list_requests(client) if r.request_id.startswith(prefix)]
    if not matches:
        raise FedsiteError(f"no request {prefix!r} on this site: list them with `fedsite admin requests`")
    if len(matches) > 1:
        ids = ", ".join(r.request_id for r in matches)
        raise FedsiteError(f"request id {prefix!r} is ambiguous, it matches {len(matches)} requests ({ids}): "
                           "give more digits")
    return matches[0]


def _pending_request(client: Any, prefix: str) -> Any:
    """Only a pending request may be decided; a decided one is never silently decided again."""
    summary = _resolve_request(client, prefix)
    if summary.status != "pending":
        raise FedsiteError(f"request {summary.request_id[:SHORT_ID]} is already {summary.status}: "
                           "only pending requests can be approved or denied")
    return summary


def render_requests(site_name: str, requests: Sequence[Any]) -> str:
    """The table of ``fedsite admin requests``."""
    if not requests:
        return f"site {site_name}: no requests yet"
    lines = [f"site {site_name}",
             f"{'request':<{SHORT_ID}}  {'function':<30} {'researcher (e-mail, id)':<45} status"]
    lines += [f"{r.request_id[:SHORT_ID]}  {r.function:<30} {f'{r.researcher_email} {r.researcher[:12]}':<45} {r.status}"
              for r in requests]
    return printable("\n".join(lines))


def cmd_requests(args: argparse.Namespace) -> None:
    from datasites.review_queue import list_requests

    site, client = _admin_client(args)
    print(render_requests(site.meta().name, list_requests(client)))


def cmd_show(args: argparse.Namespace) -> None:
    from datasites.review_queue import review_request

    prefix = _request_prefix(args.request_id)
    site, client = _admin_client(args)
    summary = _resolve_request(client, prefix)
    print(review_request(client, site, summary.request_id, with_dry_run=not args.no_dry_run).render_text())


def render_approval(approval: Any) -> str:
    calibrated, dp = approval.calibrated, approval.plan["dp"]
    return (f"approved request {approval.request_id[:SHORT_ID]} from {approval.researcher} on {approval.dataset}: "
            f"run {approval.plan['run_id']}, {dp['rounds']} rounds x {dp['local_steps']} local steps, noise "
            f"multiplier {calibrated['noise_multiplier']:.3f}, projected epsilon "
            f"{calibrated['projected_epsilon']:.3f} of budget {calibrated['budget_epsilon']:g}")


def cmd_approve(args: argparse.Namespace) -> None:
    from datasites.review_queue import approve_request
    from policies.approvals import ExecutionRefusedError

    prefix = _request_prefix(args.request_id)
    site, client = _admin_client(args)
    summary = _pending_request(client, prefix)
    try:
        approval = approve_request(client, site, summary.request_id, admin=site.meta().admin_email)
    except ExecutionRefusedError as exc:
        raise FedsiteError(f"request {summary.request_id[:SHORT_ID]} was not approved: {exc}") from None
    print(render_approval(approval))


def cmd_deny(args: argparse.Namespace) -> None:
    from datasites.review_queue import deny_request

    prefix = _request_prefix(args.request_id)
    site, client = _admin_client(args)
    summary = _pending_request(client, prefix)
    deny_request(client, site, summary.request_id, reason=args.reason, admin=site.meta().admin_email)
    print(f"denied request {summary.request_id[:SHORT_ID]} ({summary.function}) from {summary.researcher}; "
          f"they see the reason: {args.reason}")


def cmd_revoke(args: argparse.Namespace) -> None:
    from datasites.review_queue import revoke_approval
    from datasites.sitedir import SiteDir

    site = SiteDir(args.data_dir)
    approval = revoke_approval(site, args.request_id, reason=args.reason, admin=site.meta().admin_email)
    print(f"revoked the approval of request {approval.request_id[:SHORT_ID]} (run "
          f"{approval.plan.get('run_id', '?')}) from {approval.researcher}: its code no longer runs here")


# ---- auditing (reads the data dir; the site need not run) ---------------------------------------

# The fields of an audit event worth a column, in print order; hashes and ids are shortened.
_EVENT_FIELDS = ("request_id", "researcher", "dataset", "admin", "epsilon", "delta", "output_sha256", "code_hash",
                 "reason")
_SHORTENED = {"request_id", "output_sha256", "code_hash"}
_ANCHOR = re.compile(r"(?P<count>[0-9]+):(?P<digest>[0-9a-f]{64})")


def _parse_anchor(text: str) -> Any:
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


def _verify_all(site: Any, log: Any, anchor: Any) -> str:
    report = log.verify(anchor=anchor)
    return "\n".join([report.render_text(), _verify_approvals(site), *_verify_ledgers(site),
                      f"write down this anchor: --anchor {report.head.n_entries}:{report.head.last_hash}"])


def cmd_audit(args: argparse.Namespace) -> None:
    from datasites.sitedir import SiteDir
    from policies.audit import AuditIntegrityError, AuditLog

    if args.anchor is not None and not args.verify:
        raise FedsiteError("--anchor is checked only by --verify: pass both")
    anchor = _parse_anchor(args.anchor) if args.anchor is not None else None
    site = SiteDir(args.data_dir)
    site.meta()
    log = AuditLog(site.path)
    try:
        print(render_events(log.events()))
        if args.verify:
            print()
            print(_verify_all(site, log, anchor))
    except AuditIntegrityError as exc:
        raise FedsiteError(f"{exc}: restore audit.jsonl from a backup and find out who changed it") from None


def cmd_identity(args: argparse.Namespace) -> None:
    from datasites.sitedir import SiteDir

    site = SiteDir(args.data_dir)
    name, key = site.meta().name, site.identity_public_hex()
    print(f"site {name}\nidentity key (Ed25519 public, hex): {key}\nroster entry: [\"{name}\", \"{key}\"]")


def cmd_peers(args: argparse.Namespace) -> None:
    from datasites.admin import render_peers
    from datasites.sitedir import SiteDir
    from policies.peers import PeerPinError, PeerPins

    data_dir = args.peers_data_dir or args.data_dir
    if data_dir is None:
        raise FedsiteError("which site? pass --data-dir DIR")
    site = SiteDir(data_dir)
    pins = PeerPins(site.path, own_name=site.meta().name)
    try:
        if args.peers_command == "add":
            pins.add(args.name, args.key.strip().lower())
        elif args.peers_command == "remove":
            pins.remove(args.name)
        elif args.peers_command == "threshold":
            pins.set_min_threshold(args.threshold)
        print(render_peers(pins.load()))
    except PeerPinError as exc:
        raise FedsiteError(str(exc)) from None


def cmd_ledger(args: argparse.Namespace) -> None:
    from datasites.sitedir import SiteDir

    site = SiteDir(args.data_dir)
    site.meta()
    print(render_ledgers(site))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    part = sub.add_parser("partition", help="partition IMDB into N sites and print each site's stats")
    _add_partition_flags(part, required=True)
    part.add_argument("--stats", action="store_true", help="print each site's size and label balance")
    part.add_argument("--out", default=None, help="write site-<i>.parquet files here")
    part.set_defaults(func=cmd_partition)

    srv = sub.add_parser("serve", help="run a datasite over HTTP(S) (creates the data dir on first start)")
    srv.add_argument("--name", default=None, help="site name (required on first start), e.g. site-a")
    srv.add_argument("--data-dir", required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default loopback only; any other needs TLS or --insecure-http)")
    srv.add_argument("--tls-cert", default=None, metavar="CERT.pem", help="serve HTTPS with this certificate chain")
    srv.add_argument("--tls-key", default=None, metavar="KEY.pem",
                     help="the certificate's private key (PEM, unencrypted, not readable by others)")
    srv.add_argument("--insecure-http", action="store_true",
                     help="allow plain HTTP on a non-loopback --host (passwords and keys travel in clear)")
    srv.add_argument("--db-url-file", default=None, metavar="PATH",
                     help="a file (mode 0600) holding postgresql://user:pw@host:5432/db, to use PostgreSQL "
                          "instead of SQLite; else $FEDSITE_DB_URL")
    srv.add_argument("--db-url", default=None,
                     help="a PostgreSQL URL without a password (peer or .pgpass login); one with a password is "
                          "refused, as `ps` shows it: use --db-url-file or $FEDSITE_DB_URL")
    srv.add_argument("--admin-email", default=None, help="admin login (default admin@NAME.fedsite.org)")
    srv.add_argument("--admin-password-file", default=None, help="else $FEDSITE_ADMIN_PASSWORD")
    srv.add_argument("--workers", type=int, default=0, help="syft job workers (for non-blocking jobs)")
    srv.add_argument("--device", default="cpu",
                     help="where approved rounds train: cpu (default), cuda or cuda:N (this machine's GPU)")
    srv.set_defaults(func=cmd_serve)

    admin = sub.add_parser("admin", help="site admin commands (those that log in need the site running)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)

    def admin_command(name: str, func: Callable[[argparse.Namespace], None], help_: str, *,
                      logs_in: bool = True, data_dir_required: bool = True) -> argparse.ArgumentParser:
        cmd = admin_sub.add_parser(name, help=help_)
        cmd.add_argument("--data-dir", required=data_dir_required)
        if logs_in:
            cmd.add_argument("--admin-password-file", default=None, help="else $FEDSITE_ADMIN_PASSWORD")
            cmd.add_argument("--ca", default=None, metavar="CA.pem",
                             help="the CA that signed an https site's certificate (else the default trust store)")
        cmd.set_defaults(func=func)
        return cmd

    add = admin_command("add-researcher", cmd_add_researcher, "create a researcher account")
    add.add_argument("--name", required=True)
    add.add_argument("--email", required=True)
    add.add_argument("--password-file", default=None, help=f"else ${RESEARCHER_PASSWORD_ENV}")

    up = admin_command("upload", cmd_upload, "upload a private partition with its mock twin and budget")
    up.add_argument("--dataset", default="imdb")
    up.add_argument("--data", default=None, help="a parquet file (text, label) to upload")
    _add_partition_flags(up, required=False)
    up.add_argument("--site-index", type=int, default=None, help="which partition this site holds")
    up.add_argument("--epsilon", type=float, required=True, help="total privacy budget epsilon")
    up.add_argument("--delta", type=float, required=True, help="total privacy budget delta (<< 1/records)")
    up.add_argument("--mock-seed", type=int, default=0, help="fixes the mock's generated reviews (no private data)")
    up.add_argument("--mock-epsilon", type=float, default=None, metavar="EPSILON",
                    help="size the mock from the private label counts with discrete Laplace noise at this epsilon "
                         "(0 < EPSILON <= 10; a one-off release added to every researcher's training epsilon); "
                         "default: 200 rows, half positive, from public defaults, spending nothing")

    admin_command("budget", cmd_budget, "show the privacy budget of each dataset", logs_in=False)
    _add_review_commands(admin_command)
    _add_audit_commands(admin_command)
    _add_demo_parser(sub)
    add_run_parser(sub)
    return parser


AdminCommand = Callable[..., argparse.ArgumentParser]


def _add_review_commands(admin_command: AdminCommand) -> None:
    request_id = f"a request id or a unique prefix of >= {MIN_REQUEST_PREFIX} hex digits"
    admin_command("requests", cmd_requests, "list the code requests: id, function, researcher, status")
    show = admin_command("show", cmd_show, "review one request: code, findings, plan, privacy, dry run on the mock")
    show.add_argument("request_id", help=request_id)
    show.add_argument("--no-dry-run", action="store_true", help="skip running the code on the mock twin")
    approve = admin_command("approve", cmd_approve, "approve a request whose review shows no problems")
    approve.add_argument("request_id", help=request_id)
    deny = admin_command("deny", cmd_deny, "deny a request; the researcher sees the reason")
    deny.add_argument("request_id", help=request_id)
    deny.add_argument("--reason", required=True, help="what the researcher is told")
    revoke = admin_command("revoke", cmd_revoke, "stop an approved request: its code no longer runs here",
                           logs_in=False)
    revoke.add_argument("request_id", help=request_id)
    revoke.add_argument("--reason", required=True, help="why (recorded in the audit log)")


def _add_audit_commands(admin_command: AdminCommand) -> None:
    audit = admin_command("audit", cmd_audit, "print the audit log; --verify checks it, approvals and ledgers",
                          logs_in=False)
    audit.add_argument("--verify", action="store_true", help="verify the hash chains and replay the ledgers")
    audit.add_argument("--anchor", default=None, metavar="N:HASH", help="an earlier head to check against")
    admin_command("identity", cmd_identity, "print the site's identity key to pin in the roster", logs_in=False)
    admin_command("ledger", cmd_ledger, "privacy spent per dataset and researcher", logs_in=False)
    _add_peers_commands(admin_command)


def _add_peers_commands(admin_command: AdminCommand) -> None:
    peers = admin_command("peers", cmd_peers, "the peer sites this site trusts in a secure sum, and its minimum "
                          "threshold (the site need not run)", logs_in=False, data_dir_required=False)
    # --data-dir goes with each action too, so `peers add NAME KEY --data-dir D` parses as written
    peers_sub = peers.add_subparsers(dest="peers_command", required=True)
    for name, help_ in (("list", "show the pinned peers and the minimum threshold"),
                        ("add", "pin a peer's identity key (check it with its admin out of band first)"),
                        ("remove", "unpin a peer: plans that list it are refused from the next stage on"),
                        ("threshold", "set the minimum secure-sum threshold this site takes part in")):
        command = peers_sub.add_parser(name, help=help_)
        command.add_argument("--data-dir", dest="peers_data_dir", default=None, help="the site's data dir")
        if name in ("add", "remove"):
            command.add_argument("name", help="the peer's site name, e.g. site-b")
        if name == "add":
            command.add_argument("key", help="the peer's identity key, as its `fedsite admin identity` prints it")
        if name == "threshold":
            command.add_argument("threshold", type=int, help="at least 2")


def cmd_demo(args: argparse.Namespace) -> None:
    from fedsite.demo import run_demo

    run_demo(args)


def _add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="three datasites and a researcher: review, approve, DP rounds, secure sum")
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke run with a tiny model")
    demo.add_argument("--http", action="store_true", help="run the sites as separate `fedsite serve` processes")
    demo.add_argument("--out", default="fedsite-demo", help="a new folder for the sites and the report")
    demo.add_argument("--imdb", default=None, help="IMDB source (default $FEDSITE_IMDB, else stanfordnlp/imdb)")
    demo.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    demo.add_argument("--epsilon", type=float, default=8.0, help="each site's privacy budget")
    demo.add_argument("--scheme", default="iid", choices=["iid", "label-skew", "quantity-skew"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--site-device", default="cpu",
                      help="where the sites train: cpu (default), cuda or cuda:N (`fedsite serve --device`)")
    demo.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        os.umask(0o077)  # what an admin command writes into a data dir (journals, budgets) is the owner's alone
    try:
        args.func(args)
    except FedsiteError as exc:
        print(f"fedsite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
