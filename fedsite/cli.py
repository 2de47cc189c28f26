"""The `fedsite` command line: data owners' commands (partition, serve, admin ...)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from datasites.admin_views import render_approval, render_ledgers, render_requests
from datasites.errors import FedsiteError
from datasites.request_ids import MIN_PREFIX, SHORT_ID, find_request, pending_request, request_prefix
from fedsite.run_cli import add_run_parser
from policies.syft_patches import SyftVersionError

RESEARCHER_PASSWORD_ENV = "FEDSITE_RESEARCHER_PASSWORD"


def _add_partition_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--imdb", default=None, help="IMDB source: folder, aclImdb/ or HF name (default $FEDSITE_IMDB)")
    parser.add_argument("--sites", type=int, required=required, help="number of sites to partition into")
    parser.add_argument("--scheme", default="iid", choices=["iid", "label-skew", "quantity-skew"])
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the skewed schemes")
    parser.add_argument("--seed", type=int, default=0, help="partition seed (the same on every site)")


def cmd_partition(args: argparse.Namespace) -> None:
    from datasites.partition import partition_command

    print(partition_command(args.imdb, sites=args.sites, scheme=args.scheme, seed=args.seed, alpha=args.alpha,
                            stats=args.stats, out=args.out))


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
    from datasites.admin import upload_partition
    from datasites.partition import partition_to_upload
    from policies.budget import BudgetError, PrivacyBudget

    try:
        budget = PrivacyBudget(epsilon=args.epsilon, delta=args.delta)
    except BudgetError as exc:
        raise FedsiteError(str(exc)) from None
    reviews = partition_to_upload(args.data, imdb=args.imdb, sites=args.sites, site_index=args.site_index,
                                  scheme=args.scheme, seed=args.seed, alpha=args.alpha)
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

def cmd_requests(args: argparse.Namespace) -> None:
    from datasites.review_queue import list_requests

    site, client = _admin_client(args)
    print(render_requests(site.meta().name, list_requests(client)))


def cmd_show(args: argparse.Namespace) -> None:
    from datasites.review_queue import review_request

    request_prefix(args.request_id)  # a malformed id is refused before logging in
    site, client = _admin_client(args)
    summary = find_request(client, args.request_id)
    report = review_request(client, site, summary.request_id, with_dry_run=not args.no_dry_run)
    print(report.render_text(full=args.full))


def cmd_approve(args: argparse.Namespace) -> None:
    from datasites.review_queue import approve_request
    from policies.approvals import ExecutionRefusedError

    request_prefix(args.request_id)  # a malformed id is refused before logging in
    site, client = _admin_client(args)
    summary = pending_request(client, args.request_id)
    try:
        approval = approve_request(client, site, summary.request_id, admin=site.meta().admin_email)
    except ExecutionRefusedError as exc:
        raise FedsiteError(f"request {summary.request_id[:SHORT_ID]} was not approved: {exc}") from None
    print(render_approval(approval))


def cmd_deny(args: argparse.Namespace) -> None:
    from datasites.review_queue import deny_request

    request_prefix(args.request_id)  # a malformed id is refused before logging in
    site, client = _admin_client(args)
    summary = pending_request(client, args.request_id)
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

def cmd_audit(args: argparse.Namespace) -> None:
    from datasites.admin_views import audit_report

    print(audit_report(args.data_dir, verify=args.verify, anchor=args.anchor))


def cmd_identity(args: argparse.Namespace) -> None:
    from datasites.sitedir import SiteDir

    site = SiteDir(args.data_dir)
    name, key = site.meta().name, site.identity_public_hex()
    print(f"site {name}\nidentity key (Ed25519 public, hex): {key}\nroster entry: [\"{name}\", \"{key}\"]")


def cmd_peers(args: argparse.Namespace) -> None:
    from datasites.admin_views import update_peers

    print(update_peers(args.peers_data_dir or args.data_dir, args.peers_command, name=getattr(args, "name", None),
                       key=getattr(args, "key", None), threshold=getattr(args, "threshold", None)))


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
    srv.add_argument("--verbose", action="store_true", help="let syft's own log lines and prints through (silent by default)")
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
            cmd.add_argument("--verbose", action="store_true", help="let syft's own log lines and prints through (silent by default)")
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
    request_id = f"a request id or a unique prefix of >= {MIN_PREFIX} hex digits"
    admin_command("requests", cmd_requests, "list the code requests: id, function, researcher, status")
    show = admin_command("show", cmd_show, "review one request: code, findings, plan, privacy, dry run on the mock")
    show.add_argument("request_id", help=request_id)
    show.add_argument("--no-dry-run", action="store_true", help="skip running the code on the mock twin")
    show.add_argument("--full", action="store_true", help="print the plan's long vectors in full, not summarised")
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
    demo.add_argument("--out", default=None, help="a new folder for the sites and the report "
                      "(default runs/demo-UTCTIME, which git ignores)")
    demo.add_argument("--imdb", default=None, help="IMDB source (default $FEDSITE_IMDB, else stanfordnlp/imdb)")
    demo.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    demo.add_argument("--epsilon", type=float, default=8.0, help="each site's privacy budget")
    demo.add_argument("--scheme", default="iid", choices=["iid", "label-skew", "quantity-skew"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--site-device", default="cpu",
                      help="where the sites train: cpu (default), cuda or cuda:N (`fedsite serve --device`)")
    demo.add_argument("--verbose", action="store_true",
                      help="let syft's own log lines and prints through (silent by default); with --http, also into "
                           "each site's <name>.log")
    demo.set_defaults(func=cmd_demo)


def _install_syft_patches(args: argparse.Namespace) -> None:
    """Once, for the commands that start or talk to a site (those with --verbose): the version check and patches."""
    if hasattr(args, "verbose"):
        from datasites.syft_patches import install

        install(verbose=args.verbose)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        os.umask(0o077)  # what an admin command writes into a data dir (journals, budgets) is the owner's alone
    try:
        _install_syft_patches(args)
        args.func(args)
    except (FedsiteError, SyftVersionError) as exc:
        print(f"fedsite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
