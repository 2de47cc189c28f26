"""The `fedsite` command line: data owners' commands (partition, serve, admin ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasites.errors import FedsiteError

RESEARCHER_PASSWORD_ENV = "FEDSITE_RESEARCHER_PASSWORD"


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
    from datasites.secrets import admin_password
    from datasites.server import serve

    password = admin_password(args.admin_password_file)
    print(f"serving {args.name or args.data_dir} on http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops it)",
          flush=True)
    serve(args.data_dir, admin_password=password, name=args.name, port=args.port, host=args.host,
          admin_email=args.admin_email, db_url=args.db_url, n_consumers=args.workers)


def _admin_client(args: argparse.Namespace) -> tuple[Any, Any]:
    from datasites.admin import connect_admin
    from datasites.secrets import admin_password
    from datasites.sitedir import SiteDir

    site = SiteDir(args.data_dir)
    site.meta()
    return site, connect_admin(site, password=admin_password(args.admin_password_file))


def cmd_add_researcher(args: argparse.Namespace) -> None:
    from datasites.admin import add_researcher
    from datasites.secrets import read_secret

    password = read_secret(env=RESEARCHER_PASSWORD_ENV, file=args.password_file, what="researcher password")
    site, client = _admin_client(args)
    add_researcher(client, name=args.name, email=args.email, password=password)
    print(f"added researcher {args.email} to site {site.meta().name}")


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
                              mock_seed=args.mock_seed)
    print(f"uploaded {report.dataset}: {report.n_records} private reviews ({report.positive_fraction:.1%} positive), "
          f"{report.n_mock} mock reviews; budget epsilon={budget.epsilon:g} delta={budget.delta:g}")


def cmd_budget(args: argparse.Namespace) -> None:
    from datasites.admin import render_budgets
    from datasites.sitedir import SiteDir

    print(render_budgets(SiteDir(args.data_dir)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    part = sub.add_parser("partition", help="partition IMDB into N sites and print each site's stats")
    _add_partition_flags(part, required=True)
    part.add_argument("--stats", action="store_true", help="print each site's size and label balance")
    part.add_argument("--out", default=None, help="write site-<i>.parquet files here")
    part.set_defaults(func=cmd_partition)

    srv = sub.add_parser("serve", help="run a datasite over HTTP (creates the data dir on first start)")
    srv.add_argument("--name", default=None, help="site name (required on first start), e.g. site-a")
    srv.add_argument("--data-dir", required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    srv.add_argument("--db-url", default=None, help="postgresql://user:pw@host:5432/db instead of SQLite")
    srv.add_argument("--admin-email", default=None, help="admin login (default admin@NAME.fedsite.org)")
    srv.add_argument("--admin-password-file", default=None, help="else $FEDSITE_ADMIN_PASSWORD")
    srv.add_argument("--workers", type=int, default=0, help="syft job workers (for non-blocking jobs)")
    srv.set_defaults(func=cmd_serve)

    admin = sub.add_parser("admin", help="site admin commands (the site must be running)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)

    def admin_command(name: str, func: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        cmd = admin_sub.add_parser(name, help=help_)
        cmd.add_argument("--data-dir", required=True)
        cmd.add_argument("--admin-password-file", default=None, help="else $FEDSITE_ADMIN_PASSWORD")
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
    up.add_argument("--mock-seed", type=int, default=0)

    bud = admin_sub.add_parser("budget", help="show the privacy budget of each dataset")
    bud.add_argument("--data-dir", required=True)
    bud.set_defaults(func=cmd_budget)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
