"""Centralised IMDB test accuracy of the default model: non-private and DP at several epsilons.

The reference the federated runs are compared with. DP training is the site's own code
(``policies.dp.train_dp_sgd``: Poisson sampling, clipping, noise, BatchMemoryManager), with the noise
multiplier calibrated by ``policies.accounting`` (PRV) for ``epochs`` passes at q = batch / n.

    python bench/accuracy.py --quick      # a few minutes on CPU: 1000 train / 500 test, seq 64, LoRA
    python bench/accuracy.py --train-size 25000 --test-size 25000 --epochs 3 --seq-len 256 --device cuda

``--epsilons inf,1,3,8``: ``inf`` is the non-private baseline (same model, trainable set, steps,
batch and AdamW, no clipping or noise). The DP rows start as the federated benchmark's DP cells do:
the classifier from label prompts (``--head prompts``) and every dropout at ``--dropout`` (0); the
non-private row keeps a random classifier and the checkpoint's dropout, like its no-DP cell, unless
``--np-start dp`` starts it as the DP rows (then it is the DP recipe's model without noise). Every
row truncates a longer review to its first and last tokens (``--tail-tokens``, default 3/4 of the
tokens from the end), as the federated benchmark does. By default (``--draws federated``) the rows
train on the union of the federated benchmark's IID site partitions at ``--seed`` and are evaluated on
its test reviews, so the two benchmarks' figures compare on the same reviews.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasites.data import load_imdb
from datasites.partition import partition_indices
from models import (
    DEFAULT_MODEL,
    SENTIMENT_PROMPTS,
    build_from_spec,
    encode_texts,
    load_tokenizer,
    recipe_tail_tokens,
    trim_padding,
    with_public_start,
)
from policies.accounting import calibrate_noise_multiplier, epsilon_of
from policies.dp import CalibratedPlan, DPPlan, train_dp_sgd
from researcher.calibration import calibrate_bias
from researcher.evaluation import load_test_subset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"


@dataclass(frozen=True)
class Row:
    epsilon: float  # inf for non-private
    noise_multiplier: float
    steps: int
    train_s: float
    accuracy: float
    calibrated: float | None = None  # after researcher.calibration on the public reviews (--calibrate)


def _load(path: Path, size: int, seed: int) -> tuple[list[str], list[int]]:
    frame = pd.read_parquet(path, columns=["text", "label"])
    return _columns(frame.sample(n=min(size, len(frame)), random_state=seed))  # the files are sorted by label


def _columns(frame: pd.DataFrame) -> tuple[list[str], list[int]]:
    return frame["text"].astype(str).tolist(), frame["label"].astype(int).tolist()


def load_draws(args: argparse.Namespace) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """(train, test) texts and labels.

    ``--draws federated`` (the default): the reviews ``bench/federated.py --seed S`` uses, so the two
    benchmarks compare on the same data. Train is the union of the IID partitions of ``--sites`` sites,
    the first ``train_size / sites`` reviews of each (as each site keeps its first ``--reviews-per-site``;
    the first sites take one more where it does not divide);
    test is ``load_test_subset(data, test_size, 0)``, the federated benchmark's evaluated reviews.
    ``--draws random`` is the earlier draw: plain random samples of each split at ``--seed``.
    """
    if args.draws == "random":
        return _load(args.data / "train.parquet", args.train_size, args.seed), _load(
            args.data / "test.parquet", args.test_size, args.seed)
    reviews = load_imdb(args.data, split="train")
    parts = partition_indices(reviews["label"].to_numpy(), n_sites=args.sites, scheme="iid", seed=args.seed)
    sizes = [args.train_size // args.sites + (i < args.train_size % args.sites) for i in range(args.sites)]
    if any(len(part) < size for part, size in zip(parts, sizes, strict=True)):
        raise SystemExit(f"--train-size {args.train_size} needs {max(sizes)} reviews per site; the smallest of the "
                         f"{args.sites} partitions holds {min(len(part) for part in parts)}: choose a smaller --train-size")
    train = pd.concat([reviews.iloc[part[:size]] for part, size in zip(parts, sizes, strict=True)])
    return _columns(train), _columns(load_test_subset(args.data, args.test_size, 0))


def _spec(args: argparse.Namespace, *, private: bool) -> dict[str, Any]:
    """The model spec of the DP rows (``private``: ``--dropout`` and ``--head``) or of the non-private row.

    ``--np-start dp`` gives the non-private row the DP rows' spec.
    """
    private = private or args.np_start == "dp"
    trainable = {"kind": args.trainable, "top_k": args.top_k, "lora_rank": args.lora_rank,
                 "lora_alpha": 2 * args.lora_rank, "lora_targets": list(args.lora_targets)}
    spec: dict[str, Any] = {"name": args.model or DEFAULT_MODEL, "trainable": trainable, "seed": args.seed, "pooling": args.pooling}
    if private:
        spec["dropout"] = args.dropout
    if args.pooling != "mean":
        return spec
    # Centred on public test reviews other than the evaluated ones (and the head scaled on them)
    prompts = SENTIMENT_PROMPTS if private and args.head == "prompts" else None
    return with_public_start(spec, public_reviews(args), label_prompts=prompts, max_length=args.seq_len,
                             tail_tokens=args.tail_tokens)


def public_reviews(args: argparse.Namespace) -> list[str]:
    """256 public test reviews (another draw than the evaluated ones): the centre, the prompt head's scale, calibration."""
    return list(_public_reviews(Path(args.data), args.seed, args.draws))


@functools.lru_cache(maxsize=4)
def _public_reviews(data: Path, seed: int, draws: str) -> tuple[str, ...]:
    # Read once per run: every model spec and every calibrated row asks for the same draw.
    if draws == "federated":  # bench/federated.py's public reviews at the same --seed
        return tuple(load_test_subset(data, 256, seed=seed + 1)["text"].tolist())
    reference = pd.read_parquet(data / "test.parquet", columns=["text"]).sample(n=256, random_state=seed + 1)
    return tuple(reference["text"].tolist())


def _model(spec: dict[str, Any], args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(args.seed)
    return build_from_spec(spec)[0].to(device)


def _autocast(args: argparse.Namespace, device: torch.device):  # type: ignore[no-untyped-def]
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, args: argparse.Namespace, device: torch.device) -> float:
    model.eval()
    correct = 0
    for input_ids, attention_mask, labels in DataLoader(dataset, batch_size=args.eval_batch):
        input_ids, attention_mask = trim_padding(input_ids.to(device), attention_mask.to(device))
        with _autocast(args, device):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
    return correct / len(dataset)


def train_non_private(model: nn.Module, dataset: TensorDataset, steps: int, args: argparse.Namespace, device: torch.device) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    done = 0
    while done < steps:
        for batch in DataLoader(dataset, batch_size=args.batch, shuffle=True, generator=generator):
            for chunk in zip(*(t.split(args.physical_batch) for t in batch), strict=True):
                input_ids, attention_mask = trim_padding(chunk[0].to(device), chunk[1].to(device))
                with _autocast(args, device):
                    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = nn.functional.cross_entropy(logits.float(), chunk[2].to(device), reduction="sum")
                (loss / len(batch[2])).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                return


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model)
    (train_texts, train_labels), (test_texts, test_labels) = load_draws(args)
    train = encode_texts(tokenizer, train_texts, train_labels, max_length=args.seq_len, tail_tokens=args.tail_tokens)
    test = encode_texts(tokenizer, test_texts, test_labels, max_length=args.seq_len, tail_tokens=args.tail_tokens)
    evaluated = set(test_texts)
    n = len(train_labels)
    sample_rate = args.batch / n
    steps = max(1, round(args.epochs / sample_rate))
    rows = []
    specs = {private: _spec(args, private=private) for private in {not math.isinf(e) for e in args.epsilons}}
    for epsilon in args.epsilons:
        model = _model(specs[not math.isinf(epsilon)], args, device)
        start = time.perf_counter()
        if math.isinf(epsilon):
            sigma = 0.0
            train_non_private(model, train, steps, args, device)
        else:
            sigma = calibrate_noise_multiplier(
                target_epsilon=epsilon, delta=args.delta, sample_rate=sample_rate, steps=steps, accountant="prv"
            )
            plan = DPPlan(
                clip_norm=args.clip_norm,
                delta=args.delta,
                expected_batch_size=args.batch,
                local_steps=steps,
                rounds=1,
                noise_multiplier=sigma,
                learning_rate=args.dp_lr,
                max_physical_batch_size=args.physical_batch,
                max_length=args.seq_len,
                clipping_mode=args.mode,
            )
            reached = epsilon_of([(sigma, sample_rate, steps)], delta=args.delta, accountant="prv")
            calibrated_plan = CalibratedPlan(
                plan=plan,
                n_records=n,
                noise_multiplier=sigma,
                sample_rate=sample_rate,
                run_epsilon=reached,
                projected_epsilon=reached,
                budget_epsilon=epsilon,
            )
            amp = torch.bfloat16 if args.dtype == "bf16" else None
            train_dp_sgd(model, train, plan=calibrated_plan, device=device, amp_dtype=amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        accuracy = evaluate(model, test, args, device)
        calibrated = None
        if args.calibrate:
            unseen = [text for text in public_reviews(args) if text not in evaluated]
            calibrate_bias(model, tokenizer, unseen, max_length=args.seq_len, tail_tokens=args.tail_tokens,
                           batch_size=args.eval_batch)
            calibrated = evaluate(model, test, args, device)
        rows.append(Row(epsilon, sigma, steps, train_s, accuracy, calibrated))
        print(f"  epsilon={epsilon}: accuracy {accuracy:.4f} (calibrated {calibrated}), train {train_s:.0f} s", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| epsilon (delta=1e-5) | noise multiplier | steps | train wall s | test accuracy | calibrated |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        label = "non-private" if math.isinf(row.epsilon) else f"{row.epsilon:g}"
        calibrated = "-" if row.calibrated is None else f"{row.calibrated:.4f}"
        lines.append(f"| {label} | {row.noise_multiplier:.3f} | {row.steps} | {row.train_s:.0f} | {row.accuracy:.4f} "
                     f"| {calibrated} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Hugging Face name on this machine (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.parquet and test.parquet")
    parser.add_argument("--train-size", type=int, default=25_000)
    parser.add_argument("--test-size", type=int, default=25_000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tail-tokens", type=int, default=None,
                        help="of a longer review keep its last N tokens too, in every row (default: 3/4 of "
                             "--seq-len less 2, 94 of 128; 0 keeps the first tokens only)")
    parser.add_argument("--batch", type=int, default=256, help="(expected) logical batch")
    parser.add_argument("--physical-batch", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")], default=[math.inf, 1.0, 3.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--trainable", choices=["full", "top_k", "lora", "head"], default="lora")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", type=lambda s: s.split(","), default=["query", "value"])
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    parser.add_argument("--mode", choices=["ghost", "hooks"], default="hooks")
    parser.add_argument("--head", choices=["prompts", "random"], default="prompts",
                        help="the DP rows' classifier starts from label prompts (zero-shot; mean pooling only) or at random")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="every dropout probability of the DP rows' model (the non-private row keeps the checkpoint's "
                             "unless --np-start dp)")
    parser.add_argument("--np-start", choices=["checkpoint", "dp"], default="checkpoint",
                        help="the non-private row starts from the checkpoint (its dropout, a random head) or as the DP "
                             "rows do (--dropout, --head)")
    parser.add_argument("--lr", type=float, default=5e-4, help="non-private AdamW learning rate")
    parser.add_argument("--dp-lr", type=float, default=2e-3, help="DP AdamW learning rate")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="also score every row after the classifier bias is calibrated on the public reviews "
                             "(half of them predicted positive; researcher.calibration), as the federated trainer does")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", choices=["federated", "random"], default="federated",
                        help="federated: bench/federated.py's reviews at --seed (the union of the sites' IID "
                             "partitions, its evaluated and public test reviews); random: plain random samples")
    parser.add_argument("--sites", type=int, default=3, help="--draws federated: the number of sites")
    parser.add_argument("--quick", action="store_true", help="1000 train / 500 test, seq 64, batch 64, 1 epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.seq_len, args.batch, args.physical_batch = 1000, 500, 64, 64, 32
    if args.tail_tokens is None:  # the recipe's head + tail truncation at this --seq-len
        args.tail_tokens = recipe_tail_tokens(args.seq_len)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"# accuracy: {args.model or 'all-MiniLM-L6-v2'}, trainable={args.trainable}, pooling={args.pooling}, mode={args.mode}, {args.dtype}, "
        f"train {args.train_size} / test {args.test_size}, seq {args.seq_len}, batch {args.batch}, "
        f"{args.epochs:g} epoch(s), clip {args.clip_norm}, lr {args.lr} (DP {args.dp_lr}, head {args.head}, dropout "
        f"{args.dropout:g}; non-private start {args.np_start}), on {device_name}",
        flush=True,
    )
    print(table(run(args)))


if __name__ == "__main__":
    main()
