"""`fedsite demo`: three data owners and one researcher, end to end, on this machine.

Every step is the real one: three syft datasites (in this process, or with ``--http`` as separate
`fedsite serve` processes on loopback ports) each upload a private IMDB partition with its mock
twin and a privacy budget; the researcher plans a run and submits the round function to each site;
each admin reviews and approves the request (the first review is printed in full, and a later one as
one line when its code hash and plan are the first's); then R rounds of per-site DP-SGD whose
updates leave only through the secure sum; finally the accuracy, each site's epsilon (read from its
own ledger) and the report and plot.
"""

from __future__ import annotations

import argparse
import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datasites.admin import add_researcher, connect_admin, pin_each_other, upload_partition
from datasites.data import load_imdb, resolve_source
from datasites.errors import FedsiteError
from datasites.partition import partition_indices
from datasites.review_queue import ReviewReport, approve_request, list_requests, review_request
from datasites.server import check_site_device, launch_in_process
from datasites.sitedir import SiteDir
from fedsite.processes import ServedSite, free_port
from models import build_from_spec, recipe_tail_tokens, with_public_start
from policies.budget import PrivacyBudget
from policies.ledger import PrivacyLedger
from policies.syft_client import login
from researcher.evaluation import load_test_subset
from researcher.fedavg import flatten_trainable
from researcher.federation import SiteHandle, make_plan, submit
from researcher.trainer import FederatedTrainer, TrainerSettings

RESEARCHER = "researcher@fedsite-demo.org"
SITE_NAMES = ("site-a", "site-b", "site-c")


CENTRE_REVIEWS = 256


@dataclass(frozen=True)
class DemoSize:
    """How big the demo runs; ``default`` takes ~10 minutes on 2 CPU cores, ``quick`` about one."""

    reviews_per_site: int
    model: dict[str, Any]
    dp: dict[str, Any]
    test_size: int


DEFAULT = DemoSize(
    reviews_per_site=1000,
    # The default DP recipe: LoRA on query/value + a classifier on mean-pooled tokens that starts from
    # label prompts (see below), no dropout, Poisson batch 64, AdamW 1e-2, head + tail truncation (a
    # long review keeps its first 32 and last 94 tokens); 12 of the 16 steps that one local epoch would
    # take, so the demo fits ~10 minutes.
    model={"name": "all-MiniLM-L6-v2", "trainable": {"kind": "lora", "lora_rank": 8}, "seed": 0, "pooling": "mean",
           "dropout": 0.0},
    dp={"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 64, "local_steps": 12, "rounds": 3,
        "target_epsilon": 8.0, "learning_rate": 1e-2, "max_length": 128, "tail_tokens": recipe_tail_tokens(128),
        "max_physical_batch_size": 32},
    test_size=500,
)
QUICK = DemoSize(
    reviews_per_site=200,
    model={"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
           "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0},
    dp={"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 32, "local_steps": 3, "rounds": 2,
        "target_epsilon": 8.0, "learning_rate": 5e-3, "max_length": 64, "tail_tokens": recipe_tail_tokens(64),
        "max_physical_batch_size": 32},
    test_size=200,
)


@dataclass
class DemoSite:
    name: str
    site: SiteDir
    admin: Any  # the admin's client
    researcher: SiteHandle
    researcher_id: str  # the researcher's immutable id at this site (its ledger's key)


def say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def in_process_sites(out: Path, passwords: dict[str, str], *, device: str = "cpu",
                     verbose: bool = False) -> Iterator[dict[str, tuple[SiteDir, Any, Any]]]:
    del verbose  # in this process: `fedsite demo --verbose` already let syft's lines through
    with ExitStack() as stack:
        sites = {}
        for name in SITE_NAMES:
            running = launch_in_process(out / name, admin_password=passwords[name], name=name, device=device)
            stack.callback(running.stop)
            sites[name] = (running.site, lambda r=running, n=name: r.login(email=r.meta.admin_email,
                                                                           password=passwords[n]),
                           lambda email, password, r=running: r.login(email=email, password=password))
        yield sites


@contextmanager
def http_sites(out: Path, passwords: dict[str, str], *, device: str = "cpu",
               verbose: bool = False) -> Iterator[dict[str, tuple[SiteDir, Any, Any]]]:
    served = [ServedSite(name=name, data_dir=out / name, port=free_port(), log=out / f"{name}.log",
                         admin_password=passwords[name], device=device, verbose=verbose) for name in SITE_NAMES]
    try:
        for server in served:
            server.start()
        for server in served:
            server.wait_ready()
            say(f"  {server.name}: fedsite serve on http://127.0.0.1:{server.port} (pid {server.process.pid})"
                if server.process else "")
        yield {s.name: (SiteDir(s.data_dir),
                        lambda s=s: connect_admin(SiteDir(s.data_dir), password=passwords[s.name]),
                        lambda email, password, s=s: login("http://127.0.0.1", port=s.port, email=email,
                                                           password=password))
               for s in served}
    finally:
        for server in served:
            server.terminate()


def set_up_sites(raw_sites: dict[str, tuple[SiteDir, Any, Any]], *, size: DemoSize, imdb: str, epsilon: float,
                 scheme: str, seed: int) -> list[DemoSite]:
    """Each data owner uploads its partition (with mock twin and budget) and onboards the researcher."""
    reviews = load_imdb(imdb, split="train")
    parts = partition_indices(reviews["label"].to_numpy(), n_sites=len(SITE_NAMES), scheme=scheme, seed=seed)
    researcher_password = secrets.token_urlsafe(18)
    sites = []
    for index, (name, (site_dir, admin_login, researcher_login)) in enumerate(raw_sites.items()):
        admin = admin_login()
        rows = reviews.iloc[parts[index][: size.reviews_per_site]].reset_index(drop=True)
        report = upload_partition(admin, site_dir, dataset="imdb", reviews=rows,
                                  budget=PrivacyBudget(epsilon=epsilon, delta=1e-5))
        researcher_id = add_researcher(admin, name="Demo Researcher", email=RESEARCHER, password=researcher_password)
        say(f"  {name}: {report.n_records} private reviews ({report.positive_fraction:.0%} positive), "
            f"{report.n_mock} mock reviews, budget epsilon={epsilon:g}")
        handle = SiteHandle(name=name, client=researcher_login(RESEARCHER, researcher_password),
                            identity_key=site_dir.identity_public_hex())
        sites.append(DemoSite(name, site_dir, admin, handle, researcher_id))
    # Each admin pins the other sites' identity keys (`fedsite admin peers add`), as real admins do after
    # comparing the keys out of band; a site refuses any roster entry it has not pinned.
    pin_each_other([site.site for site in sites])
    return sites


def review_and_approve(sites: list[DemoSite]) -> None:
    """Each admin reviews and approves; a review the same as the first site's is printed as one line."""
    first: ReviewReport | None = None
    for site in sites:
        request_id = next(r.request_id for r in list_requests(site.admin) if r.status == "pending")
        report = review_request(site.admin, site.site, request_id)
        if first is not None and same_request(report, first):
            say(f"  {site.name}: review of {request_id[:12]}: same code hash {report.code_review.code_sha256}, "
                "same plan" + _site_line(report))
        else:
            say(f"  {site.name}: review of {request_id[:12]}:")
            say(report.render_text())
        first = first or report
        approve_request(site.admin, site.site, request_id, admin=site.site.meta().admin_email)
        say(f"  {site.name}: approved")


def same_request(report: ReviewReport, first: ReviewReport) -> bool:
    """The same code (hash of the exact source) and the same plan as ``first``."""
    return (report.code_review.code_sha256 == first.code_review.code_sha256 and report.plan is not None
            and first.plan is not None and report.plan == first.plan)


def _site_line(report: ReviewReport) -> str:
    """What differs between sites though the code is the same: the privacy spent there, the problems."""
    privacy = (f"; projected epsilon {report.calibrated.projected_epsilon:.2f} of {report.budget_epsilon:g}"
               if report.calibrated is not None else "")
    problems = "; ".join(report.problems) or "no problems"
    return f"{privacy}; {problems}"


def default_out() -> Path:
    """``runs/demo-<UTC time>``: a new folder each run, under the checkout's ignored /runs/."""
    return Path("runs") / f"demo-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


def run_demo(args: argparse.Namespace) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the "newly initialised classifier" report, once per model build
    transformers_logging.disable_progress_bar()  # "Loading weights" at every model build
    # Known, harmless library notices that would otherwise repeat at every site and round: Opacus's hooks
    # on a frozen embedding layer, and a transformers deprecation inside peft.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    check_site_device(args.site_device)
    size = QUICK if args.quick else DEFAULT
    if args.rounds is not None:
        size = DemoSize(size.reviews_per_site, size.model, {**size.dp, "rounds": args.rounds}, size.test_size)
    out = (Path(args.out) if args.out is not None else default_out()).resolve()
    if out.exists() and any(out.iterdir()):
        raise FedsiteError(f"{out} is not empty: pass --out to a new folder (the demo creates fresh sites)")
    imdb = resolve_source(args.imdb)
    passwords = {name: secrets.token_urlsafe(18) for name in SITE_NAMES}
    started = time.perf_counter()
    say(f"Fedsite demo in {out} ({'3 fedsite serve processes over HTTP' if args.http else '3 in-process datasites'})")
    sites_context = http_sites if args.http else in_process_sites
    out.mkdir(parents=True, exist_ok=True)
    with sites_context(out, passwords, device=args.site_device, verbose=args.verbose) as raw_sites:
        say("1. Data owners upload their partitions")
        sites = set_up_sites(raw_sites, size=size, imdb=imdb, epsilon=args.epsilon, scheme=args.scheme, seed=args.seed)
        # Mean pooling is centred on public test reviews (seed 1; the evaluation draws with seed 0), and
        # the classifier starts as a zero-shot one from descriptions of the two labels, scaled on them.
        public = load_test_subset(imdb, CENTRE_REVIEWS, seed=1)["text"].tolist()
        spec = with_public_start(size.model, public, max_length=int(size.dp["max_length"]),
                                 tail_tokens=int(size.dp["tail_tokens"]))
        model, _ = build_from_spec(spec)
        vector_length = len(flatten_trainable(model)[0])
        plan = make_plan(sites=[s.researcher for s in sites], model=spec, dp=size.dp, vector_length=vector_length)
        say(f"2. The researcher submits run {plan.run_id} ({vector_length} trainable parameters) to every site")
        for site in sites:
            submit(site.researcher, plan, out / "researcher" / "functions")
        say("3. Each admin reviews the request")
        review_and_approve(sites)
        say(f"4. {size.dp['rounds']} rounds of DP-SGD at every site, summed securely")
        # After each round the researcher shifts the classifier's bias so that half of the same public
        # reviews are predicted positive (IMDB's prior): DP noise moves the threshold, not the ranking.
        trainer = FederatedTrainer([s.researcher for s in sites], plan, TrainerSettings(
            run_dir=out / "researcher" / plan.run_id, imdb_source=imdb, test_size=size.test_size,
            calibration_texts=tuple(public)))
        report = trainer.run()
        final = report.rounds[-1]
        say(f"5. Done in {time.perf_counter() - started:.0f} s: test accuracy {final.accuracy:.3f} "
            f"on {size.test_size} public test reviews ({final.uncalibrated_accuracy:.3f} before the last bias "
            "calibration on public reviews)")
        for site in sites:
            ledger = PrivacyLedger(site.site.path, "imdb", site.researcher_id, site=site.name)
            say(f"  {site.name}: epsilon spent {ledger.spent():.2f} of {ledger.budget.epsilon:g} "
                f"(delta {ledger.budget.delta:g}), per its own ledger")
        say(f"  report: {trainer.run_dir / 'report.json'}\n  plot:   {trainer.run_dir / 'report.png'}")
