"""`fedsite run init | submit | status | train | report`: a researcher's run from a run.toml file.

A thin layer over ``researcher.federation_api.Federation``: parse the flags, call one method, print
its result. Errors of the file or of a step become one ``fedsite: error:`` line naming the fix.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasites.errors import FedsiteError

DEFAULT_TOML = "run.toml"


@contextmanager
def _as_cli_errors() -> Iterator[None]:
    """The researcher side's refusals, as the CLI's one-line errors."""
    from policies.federated_plan import FederatedPlanError
    from policies.submission import SubmissionError
    from researcher.calibration import CalibrationError
    from researcher.evaluation import EvaluationError
    from researcher.federation import RoundFailedError, SiteRefusedError
    from researcher.federation_api import FederationError
    from researcher.run_config import RunConfigError

    try:
        yield
    except (RunConfigError, FederationError, SiteRefusedError, RoundFailedError, SubmissionError, FederatedPlanError,
            EvaluationError, CalibrationError) as exc:
        raise FedsiteError(str(exc)) from None


def _federation(args: argparse.Namespace) -> Any:
    from researcher.federation_api import Federation

    return Federation.from_toml(args.toml)


def _site_arg(text: str) -> Any:
    from researcher.run_template import TemplateSite

    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--site {text!r} must be NAME,URL,KEY, e.g. "
                                         "site-a,https://site-a.example.org:8443,<the key `fedsite admin identity` prints>")
    return TemplateSite(*(part.strip() for part in parts))


def cmd_init(args: argparse.Namespace) -> None:
    from researcher.run_template import render_run_toml

    path = Path(args.toml)
    if path.exists():
        raise FedsiteError(f"{path} exists: `fedsite run init` never overwrites; pass another PATH or remove it")
    imdb = args.imdb or os.environ.get("FEDSITE_IMDB") or "data/imdb"
    text = render_run_toml(sites=args.site, imdb=imdb, email=args.email, output_dir=args.output_dir, quick=args.quick)
    if args.site:  # the sites given must make a file that loads: check before writing anything
        import tomllib

        from researcher.run_config import parse_run_config

        with _as_cli_errors():
            parse_run_config(tomllib.loads(text), path.resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as handle:  # "x": never replace a file that appeared meanwhile
        handle.write(text)
    todo = "" if args.site else " (replace the example [[sites]] with yours first)"
    print(f"wrote {path}: edit it{todo}, then `fedsite run submit {path}`")


def cmd_submit(args: argparse.Namespace) -> None:
    with _as_cli_errors():
        federation = _federation(args)
        outcome = federation.submit()
        run_id = federation.run_id()
    for site, what in outcome.items():
        print(f"{site}: {what}")
    print(f"run {run_id}: plan in {federation.output_dir / 'plan.json'}; each admin now reviews it "
          f"(`fedsite run status {args.toml}`)")


def render_status(status: Any) -> str:
    """The table of `fedsite run status`: one line per site, then the rounds."""
    from policies.review import printable

    lines = [f"run {status.run_id}", f"{'site':<20} {'status':<14} reason"]
    lines += [f"{site.site:<20} {site.state:<14} {site.reason or ''}".rstrip() for site in status.sites]
    rounds = f"rounds: {status.rounds_done} done"
    if status.rounds_lost is not None:
        rounds += f", {status.rounds_lost} lost"
    lines.append(f"{rounds} of {status.rounds_planned}")
    return printable("\n".join(lines))  # a denial reason is an admin's free text: no terminal escapes


def cmd_status(args: argparse.Namespace) -> None:
    with _as_cli_errors():
        print(render_status(_federation(args).status()))


def cmd_train(args: argparse.Namespace) -> None:
    with _as_cli_errors():
        federation = _federation(args)
        report = federation.train(progress=not args.no_progress)
    lost = f", {len(report.lost_rounds)} lost" if report.lost_rounds else ""
    print(f"run {report.run_id}: {len(report.rounds)} rounds done{lost}; `fedsite run report {args.toml}`")


def _standard_error(round_: Mapping[str, Any], test_size: int) -> float:
    """The accuracy's standard error: the report's own where it has one, else the binomial sqrt(p(1-p)/n)."""
    for key in ("accuracy_se", "accuracy_stderr", "accuracy_standard_error"):
        if isinstance(round_.get(key), int | float):
            return float(round_[key])
    accuracy = float(round_["accuracy"])
    return math.sqrt(accuracy * (1 - accuracy) / test_size)


def render_report(document: Mapping[str, Any], *, test_size: int) -> str:
    """Accuracy (+- its standard error) and each site's cumulative epsilon, per round."""
    rounds: Sequence[Mapping[str, Any]] = document.get("rounds", [])
    sites = sorted({site for r in rounds for site in r.get("epsilon_spent", {})})
    header = f"{'round':>5}  {'accuracy':>16}  {'loss':>7}  " + "  ".join(f"{'eps ' + s:>12}" for s in sites)
    lines = [f"run {document.get('run_id')}: {len(rounds)} rounds (accuracy on {test_size} public test reviews, "
             "+- its standard error; epsilon spent per site, cumulative, as each site's ledger reported it)", header]
    for r in rounds:
        accuracy = f"{r['accuracy']:.3f} +- {_standard_error(r, test_size):.3f}"
        epsilons = "  ".join(f"{r['epsilon_spent'][s]:>12.3f}" if s in r["epsilon_spent"] else f"{'-':>12}"
                             for s in sites)
        dropped = f"  dropped: {', '.join(r['dropped'])}" if r.get("dropped") else ""
        lines.append(f"{r['round_index']:>5}  {accuracy:>16}  {r['mean_loss']:>7.4f}  {epsilons}{dropped}")
    lines += [f"lost: {_lost_summary(entry)}" for entry in document.get("lost_rounds", [])]
    return "\n".join(lines)


def _lost_summary(entry: Any) -> str:
    """One lost round in words (``LostRound.summary``): the stage, why, and who spent on it."""
    from researcher.report import LostRound

    return LostRound.from_dict(entry).summary()


def cmd_report(args: argparse.Namespace) -> None:
    with _as_cli_errors():
        federation = _federation(args)
        document = federation.report_document()
    print(render_report(document, test_size=federation.config.test_size))
    print(f"report: {federation.report_path}")
    if federation.plot_path.is_file():
        print(f"plot:   {federation.plot_path}")


def add_run_parser(sub: Any) -> None:
    """The `run` command group, added to `fedsite`'s subcommands."""
    run = sub.add_parser("run", help="a researcher's federated run from a run.toml: init, submit, status, train, "
                                     "report")
    run_sub = run.add_subparsers(dest="run_command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], None], help_: str, *,
                talks_to_sites: bool = False) -> argparse.ArgumentParser:
        parser = run_sub.add_parser(name, help=help_)
        parser.add_argument("toml", nargs="?", default=DEFAULT_TOML, metavar="RUN.TOML",
                            help=f"the run file (default ./{DEFAULT_TOML})")
        if talks_to_sites:  # fedsite.cli installs the syft patches for commands with --verbose
            parser.add_argument("--verbose", action="store_true",
                                help="let syft's own log lines and prints through (silent by default)")
        parser.set_defaults(func=func)
        return parser

    init = command("init", cmd_init, "write a commented run.toml to edit (never overwrites)")
    init.add_argument("--site", action="append", type=_site_arg, default=[], metavar="NAME,URL,KEY",
                      help="a site as its admin handed it over (repeat per site); else two examples to replace")
    init.add_argument("--email", default="you@example.org", help="your login at the sites")
    init.add_argument("--imdb", default=None, help="folder with IMDB's test.parquet (default $FEDSITE_IMDB)")
    init.add_argument("--output-dir", default="fedsite-run", help="where the run keeps its state and report")
    init.add_argument("--quick", action="store_true", help="a tiny random model and 2 short rounds: a smoke test")
    command("submit", cmd_submit, "plan the run and send its round function to every site (once)",
            talks_to_sites=True)
    command("status", cmd_status, "each site's decision (pending, approved, denied and why) and rounds done",
            talks_to_sites=True)
    train = command("train", cmd_train, "run the rounds once every site approved; resumes after a stop",
                    talks_to_sites=True)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    command("report", cmd_report, "accuracy per round and epsilon per site; where report.json and .png are")
