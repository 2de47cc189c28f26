"""Federated IMDB accuracy vs per-site epsilon, and where a round's time goes.

Every DP cell is a real run: three in-process syft datasites with IMDB partitions, the admins'
review and approval, R rounds of per-site Opacus DP-SGD whose updates leave only through the
SecAgg secure sum, FedAvg and evaluation on the public test split. The "no DP" cell is FedAvg of
plain local training on the same partitions (no syft, no noise). The centralised figures of the
same model come from ``bench/accuracy.py`` with the same sizes.

Round-time breakdown (seconds per round, mean over rounds): dispatch+transfer = the stage calls'
wall time minus what the sites spent training and masking; training and masking as the slowest
site reported them; unmasking = the Unmask stage plus the aggregator's reconstruction.

The setup of the Flower reference measured on this machine (3 clients x 1,000 reviews, seq 128,
1 local epoch, 3 rounds; Flower's clients fine-tuned MiniLM in full at batch 16, which is what the
"no DP" cell runs here too; the DP cells run the default DP recipe: LoRA on query/value + the head on
mean-pooled tokens, the head starting from label prompts, no dropout, Poisson batch 64, AdamW; every
cell truncates a longer review to its first 32 and last 94 tokens, ``--tail-tokens 0`` to its first 126):

    python bench/federated.py --flower-setup --epsilons 8,inf --schemes iid

``--quick`` is a tiny-model smoke run (tests/integration/test_bench_federated.py runs its DP cell).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasites.admin import add_researcher, pin_each_other, upload_partition  # noqa: E402
from datasites.data import load_imdb  # noqa: E402
from datasites.partition import partition_indices  # noqa: E402
from datasites.review_queue import approve_request, list_requests  # noqa: E402
from datasites.server import check_site_device  # noqa: E402
from fedsite.demo import SITE_NAMES, http_sites, in_process_sites  # noqa: E402
from models import SENTIMENT_PROMPTS, build_from_spec, encode_texts, recipe_tail_tokens, with_public_start  # noqa: E402
from policies.budget import PrivacyBudget  # noqa: E402
from policies.site_runtime import timing_log  # noqa: E402
from researcher.calibration import evaluate_and_calibrate  # noqa: E402
from researcher.evaluation import load_test_subset  # noqa: E402
from researcher.fedavg import apply_flat_delta, flatten_trainable  # noqa: E402
from researcher.federation import SiteHandle, make_plan, submit  # noqa: E402
from researcher.trainer import FederatedTrainer, TrainerSettings  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "imdb"
SITES = SITE_NAMES
CENTRE_REVIEWS = 256
DP_LR = 1e-2  # AdamW step of the default DP recipe (LoRA + head on mean pooling, batch 64)


@dataclass(frozen=True)
class Cell:
    scheme: str
    epsilon: float
    per_round: tuple[float, ...]  # test accuracy after each round
    wall_s: float
    breakdown: dict[str, float]
    uncalibrated: tuple[float, ...] = ()  # with --calibrate: the accuracy before each round's bias calibration

    @property
    def accuracy(self) -> float:
        """Test accuracy of the final model."""
        return self.per_round[-1]


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    return _spec(args, args.trainable)


def non_private_spec(args: argparse.Namespace) -> dict[str, Any]:
    return _spec(args, args.np_trainable or args.trainable)


def _spec(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    trainable: dict[str, Any] = {"kind": kind}
    if kind == "lora":
        trainable.update(lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank)
    if args.tiny:
        return {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": args.seq_len},
                "trainable": trainable, "seed": 0, "pooling": args.pooling}
    return {"name": args.model, "trainable": trainable, "seed": 0, "pooling": args.pooling}


def public_reviews(args: argparse.Namespace) -> list[str]:
    """Public test reviews (not the evaluated ones' seed) whose mean embedding centres mean pooling."""
    return load_test_subset(args.data, CENTRE_REVIEWS, seed=args.seed + 1)["text"].tolist()


def dp_start(args: argparse.Namespace, kind: str | None = None) -> dict[str, Any]:
    """The DP cells' model spec: ``--dropout``; centred on public reviews; the head from label prompts (``--head``).

    ``kind`` replaces ``--trainable`` (the no-DP cell's ``--np-start dp`` passes its own trainable set).
    """
    spec = {**_spec(args, kind or args.trainable), "dropout": args.dropout}
    if args.pooling != "mean":
        return spec
    prompts = SENTIMENT_PROMPTS if args.head == "prompts" else None
    return with_public_start(spec, public_reviews(args), label_prompts=prompts, max_length=args.seq_len,
                             tail_tokens=args.tail_tokens)


def local_steps(args: argparse.Namespace) -> int:
    return max(1, round(args.local_epochs * args.reviews_per_site / args.batch))


def partitions(args: argparse.Namespace, scheme: str) -> list[Any]:
    reviews = load_imdb(args.data, split="train")
    parts = partition_indices(reviews["label"].to_numpy(), n_sites=len(SITES), scheme=scheme, seed=args.seed,
                              alpha=args.alpha)
    return [reviews.iloc[p[: args.reviews_per_site]].reset_index(drop=True) for p in parts]


# What a site writes to its own log after each round's training (policies.site_runtime.timing_log). Sites do
# not tell researchers how long private work took; the benchmark, which runs the sites, reads their logs.
_TIMING = re.compile(r"(?P<site>[a-z0-9-]+): round (?P<round>\d+) attempt \d+ trained in (?P<training>[0-9.]+) s, "
                     r"masked in (?P<masking>[0-9.]+) s")


class SiteTimings(logging.Handler):
    """Collects the sites' timing lines: from in-process sites as log records, from served ones out of their logs."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def read_logs(self, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                self.lines += path.read_text(encoding="utf-8", errors="replace").splitlines()

    def per_round(self) -> list[dict[str, float]]:
        """For each round, the slowest site's training and masking seconds."""
        rounds: dict[int, dict[str, float]] = {}
        for match in filter(None, (_TIMING.search(line) for line in self.lines)):
            slowest = rounds.setdefault(int(match["round"]), {"site_training": 0.0, "site_masking": 0.0})
            for key in ("training", "masking"):
                slowest[f"site_{key}"] = max(slowest[f"site_{key}"], float(match[key]))
        return [rounds[index] for index in sorted(rounds)]


def breakdown(seconds: list[dict[str, float]]) -> dict[str, float]:
    stages = ("advertise_keys", "share_keys", "mask_input", "consistency_check", "unmask")
    mean = {key: float(np.mean([s.get(key, 0.0) for s in seconds])) for key in {k for s in seconds for k in s}}
    training, masking = mean.get("site_training", 0.0), mean.get("site_masking", 0.0)
    return {
        "dispatch+transfer": sum(mean.get(s, 0.0) for s in stages) - training - masking - mean.get("unmask", 0.0),
        "training": training,
        "masking": masking,
        "unmasking": mean.get("unmask", 0.0) + mean.get("unmask_aggregate", 0.0),
        "evaluation": mean.get("evaluation", 0.0),
    }


def dp_cell(args: argparse.Namespace, scheme: str, epsilon: float, work: Path) -> Cell:
    """One real federated run through syft datasites (in-process, or ``fedsite serve`` processes) and the secure sum."""
    started = time.perf_counter()
    passwords = {name: secrets.token_urlsafe(18) for name in SITES}
    researcher_password = secrets.token_urlsafe(18)
    sites_context = http_sites if args.http else in_process_sites
    timings = SiteTimings()
    logging.getLogger(timing_log.name).addHandler(timings)
    with sites_context(work, passwords, device=args.site_device) as raw_sites:
        handles, admins = [], []
        for (name, (site_dir, admin_login, researcher_login)), rows in zip(raw_sites.items(), partitions(args, scheme),
                                                                           strict=True):
            admin = admin_login()
            upload_partition(admin, site_dir, dataset="imdb", reviews=rows,
                             budget=PrivacyBudget(epsilon=epsilon, delta=args.delta))
            add_researcher(admin, name="Bench", email="bench@fedsite.org", password=researcher_password)
            admins.append((admin, site_dir))
            handles.append(SiteHandle(name=name, client=researcher_login("bench@fedsite.org", researcher_password),
                                      identity_key=site_dir.identity_public_hex()))
        pin_each_other([site_dir for _, site_dir in admins])
        spec = dp_start(args)
        vector_length = len(flatten_trainable(build_from_spec(spec)[0])[0])
        dp = {"clip_norm": args.clip, "delta": args.delta, "expected_batch_size": args.batch,
              "local_steps": local_steps(args), "rounds": args.rounds, "target_epsilon": epsilon,
              "learning_rate": args.dp_lr, "max_length": args.seq_len, "tail_tokens": args.tail_tokens,
              "max_physical_batch_size": args.physical_batch, "average_last_steps": args.average_last}
        plan = make_plan(sites=handles, model=spec, dp=dp, vector_length=vector_length, clip=args.update_clip)
        for handle in handles:
            submit(handle, plan, work / "functions")
        for admin, site_dir in admins:
            request = next(r.request_id for r in list_requests(admin) if r.status == "pending")
            approve_request(admin, site_dir, request, admin=site_dir.meta().admin_email)
        calibration = tuple(public_reviews(args)) if args.calibrate else ()
        trainer = FederatedTrainer(handles, plan, TrainerSettings(run_dir=work / "run", imdb_source=str(args.data),
                                                                  test_size=args.test_size, progress=False,
                                                                  calibration_texts=calibration))
        report = trainer.run()
    logging.getLogger(timing_log.name).removeHandler(timings)
    timings.read_logs([work / f"{name}.log" for name in SITES] if args.http else [])
    site_seconds = timings.per_round()
    seconds = [{**dict(r.seconds), **(site_seconds[i] if i < len(site_seconds) else {})}
               for i, r in enumerate(report.rounds)]
    return Cell(scheme, epsilon, tuple(r.accuracy for r in report.rounds), time.perf_counter() - started,
                breakdown(seconds),
                tuple(r.uncalibrated_accuracy for r in report.rounds if r.uncalibrated_accuracy is not None))


def no_dp_start(args: argparse.Namespace) -> dict[str, Any]:
    """The no-DP cell's model spec: the checkpoint's dropout and a random head, centred on public reviews, as
    the centralised non-private row (``--np-start checkpoint``); or the DP cells' start (``--np-start dp``)."""
    if args.np_start == "dp":
        return dp_start(args, args.np_trainable or args.trainable)
    spec = non_private_spec(args)
    if spec["pooling"] != "mean":  # a CLS model has no centre
        return spec
    return with_public_start(spec, public_reviews(args), label_prompts=None, max_length=args.seq_len,
                             tail_tokens=args.tail_tokens)


def non_private_cell(args: argparse.Namespace, scheme: str) -> Cell:
    """FedAvg of plain local AdamW training on the same partitions (no syft, no noise)."""
    started = time.perf_counter()
    spec = no_dp_start(args)
    model, tokenizer = build_from_spec(spec)
    vector, layout = flatten_trainable(model)
    parts = partitions(args, scheme)
    test = load_test_subset(args.data, args.test_size, 0)
    texts, labels = test["text"].tolist(), test["label"].tolist()
    calibration = [text for text in public_reviews(args) if text not in set(texts)]
    per_round, uncalibrated = [], []
    for _ in range(args.rounds):
        deltas = []
        for rows in parts:
            local, _ = build_from_spec(spec)
            apply_flat_delta(local, layout, vector - flatten_trainable(local)[0], scale=1.0)
            train_locally(local, tokenizer, rows, args)
            deltas.append(flatten_trainable(local)[0] - vector)
        vector = (vector + np.mean(deltas, axis=0)).astype(np.float32)
        apply_flat_delta(model, layout, vector - flatten_trainable(model)[0], scale=1.0)
        # As the trainer does in the DP cells: the next round starts from the calibrated model
        scored = evaluate_and_calibrate(model, tokenizer, texts, labels, calibration if args.calibrate else [],
                                        max_length=args.seq_len, tail_tokens=args.tail_tokens)
        vector = flatten_trainable(model)[0]
        per_round.append(scored.evaluation.accuracy)
        if scored.uncalibrated_accuracy is not None:
            uncalibrated.append(scored.uncalibrated_accuracy)
    return Cell(scheme, math.inf, tuple(per_round), time.perf_counter() - started, {}, tuple(uncalibrated))


def train_locally(model: torch.nn.Module, tokenizer: Any, rows: Any, args: argparse.Namespace) -> None:
    data = encode_texts(tokenizer, rows["text"].tolist(), rows["label"].tolist(), max_length=args.seq_len,
                        tail_tokens=args.tail_tokens)
    loader = torch.utils.data.DataLoader(data, batch_size=args.np_batch or args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for _ in range(max(1, round(args.local_epochs))):
        for input_ids, attention_mask, labels in loader:
            optimizer.zero_grad()
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
            optimizer.step()


def table(cells: list[Cell]) -> str:
    keys = ("dispatch+transfer", "training", "masking", "unmasking", "evaluation")
    lines = ["| scheme | per-site epsilon | test accuracy | per round | before calibration | wall s | "
             + " | ".join(f"{k} s/round" for k in keys) + " |",
             "| --- | --- | ---: | --- | --- | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for c in cells:
        eps = "no DP (FedAvg, no syft)" if math.isinf(c.epsilon) else f"{c.epsilon:g}"
        times = " | ".join(f"{c.breakdown[k]:.1f}" if k in c.breakdown else "-" for k in keys)
        trace = " / ".join(f"{a:.3f}" for a in c.per_round)
        before = " / ".join(f"{a:.3f}" for a in c.uncalibrated) or "-"
        lines.append(f"| {c.scheme} | {eps} | {c.accuracy:.4f} | {trace} | {before} | {c.wall_s:.0f} | {times} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.parquet and test.parquet")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of the model")
    parser.add_argument("--trainable", choices=["full", "top_k", "lora", "head"], default="lora")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--reviews-per-site", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--tail-tokens", type=int, default=None,
                        help="of a longer review keep its last N tokens too, in every cell (default: 3/4 of "
                             "--seq-len less 2, 94 of 128; 0 keeps the first tokens only)")
    parser.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch per local step")
    parser.add_argument("--physical-batch", type=int, default=32)
    parser.add_argument("--local-epochs", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--schemes", type=lambda s: s.split(","), default=["iid", "label-skew"])
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of label-skew")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample gradient clip")
    parser.add_argument("--update-clip", type=float, default=None,
                        help="secure-sum clip range per coordinate (default: DP learning rate x local steps)")
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    parser.add_argument("--head", choices=["prompts", "random"], default="prompts",
                        help="the DP cells' classifier starts from label prompts (zero-shot; mean pooling only) or at random")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="every dropout probability of the DP cells' model (the no-DP cell keeps the checkpoint's unless --np-start dp)")
    parser.add_argument("--np-trainable", choices=["full", "top_k", "lora", "head"], default=None,
                        help="trainable set of the no-DP cell (default: --trainable)")
    parser.add_argument("--np-start", choices=["checkpoint", "dp"], default="checkpoint",
                        help="the no-DP cell starts as the centralised non-private row does (the checkpoint's dropout, "
                             "a random head) or from the DP cells' start (--dropout, --head)")
    parser.add_argument("--np-batch", type=int, default=None, help="batch of the no-DP cell (default: --batch)")
    parser.add_argument("--lr", type=float, default=None,
                        help="no-DP AdamW learning rate (default 5e-4 for LoRA, 5e-5 for full fine-tuning)")
    parser.add_argument("--dp-lr", type=float, default=DP_LR, help="DP AdamW learning rate")
    parser.add_argument("--average-last", type=int, default=0,
                        help="each site releases the mean of its last N local iterates of a round (the plan's "
                             "average_last_steps; post-processing, no privacy cost); 0: the last iterate")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="after each round shift the classifier bias so half the public reviews are predicted "
                             "positive (researcher.calibration; the 'before calibration' column is the model before it)")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flower-setup", action="store_true",
                        help="3 x 1,000 reviews, seq 128, 1 local epoch, 3 rounds; no-DP cell: full fine-tuning, batch 16")
    parser.add_argument("--quick", action="store_true", help="tiny model, 120 reviews per site, 2 rounds, epsilon 8")
    parser.add_argument("--http", action="store_true", help="the sites as `fedsite serve` processes over loopback HTTP")
    parser.add_argument("--site-device", default="cpu",
                        help="where the DP cells' sites train: cpu (default), cuda or cuda:N (`fedsite serve --device`)")
    given = sys.argv[1:] if argv is None else argv
    # The presets are defaults: a flag given next to them (e.g. --local-epochs 0.1) still wins.
    if "--flower-setup" in given:
        parser.set_defaults(reviews_per_site=1000, seq_len=128, local_epochs=1.0, rounds=3, np_trainable="full",
                            np_batch=16)
    if "--quick" in given:
        parser.set_defaults(tiny=True, reviews_per_site=120, rounds=2, seq_len=64, batch=32, epsilons=[8.0, math.inf],
                            schemes=["iid"], test_size=100, update_clip=0.5)
    args = parser.parse_args(argv)
    if args.tail_tokens is None:  # the recipe's head + tail truncation at this --seq-len
        args.tail_tokens = recipe_tail_tokens(args.seq_len)
    if args.lr is None:
        args.lr = 5e-5 if (args.np_trainable or args.trainable) == "full" else 5e-4
    return args


def main(argv: list[str] | None = None) -> list[Cell]:
    args = parse_args(argv)
    check_site_device(args.site_device)  # before any cell runs
    cells = []
    for scheme in args.schemes:
        for epsilon in args.epsilons:
            if math.isinf(epsilon):
                cells.append(non_private_cell(args, scheme))
                continue
            with tempfile.TemporaryDirectory() as work:
                cells.append(dp_cell(args, scheme, epsilon, Path(work)))
            print(table(cells[-1:]).splitlines()[-1], flush=True)
    print(table(cells))
    return cells


if __name__ == "__main__":
    main()
