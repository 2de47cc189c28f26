"""Training throughput (samples/s): non-private vs DP-SGD, per trainable set, clipping mode and precision.

Every DP figure runs the site's own code (``policies.dp``: the embedding fix, Opacus's
GradSampleModule or ghost clipping, DPOptimizer's clipping and noise, the accountant hook); the
non-private baseline trains the same model and trainable set with the same forward, loss and AdamW.
Batches are fixed at ``--batch`` full-length sequences (Poisson sampling only changes which rows
are drawn), so the ratio isolates the cost of privacy. Ratios are taken within one run.

    python bench/dp_throughput.py --quick                       # CPU smoke run, tiny model
    python bench/dp_throughput.py --arch minilm --device cuda --batch 32 --seq-len 256 --dtypes fp32,bf16

``--arch minilm`` / ``bert-base`` build those architectures from their configuration with random
weights unless ``--weights`` loads the packaged all-MiniLM-L6-v2: throughput does not depend on the
weights' values, and a device without the package can still measure.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.utils.data import TensorDataset
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import TrainableSet, build_model, tiny_bert_config, trim_padding
from policies.dp import trainable_parameters
from policies.dp.engine import _dp_training, _physical_step

ARCHS = {
    # all-MiniLM-L6-v2's config.json (6 layers, hidden 384, 22.7M parameters)
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    # bert-base-uncased (12 layers, hidden 768, 110M parameters)
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Measurement:
    trainable: str
    dtype: str
    mode: str  # "non-private", "hooks" or "ghost"
    samples_per_s: float
    peak_gib: float  # peak accelerator memory (0 on CPU)
    error: str = ""  # why the configuration could not run (e.g. out of memory), else empty


def _config(arch: str) -> BertConfig:
    if arch == "tiny":
        return tiny_bert_config(vocab_size=30522, hidden_size=64, layers=2, heads=2, max_length=512)
    return BertConfig(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, num_labels=2, **ARCHS[arch])


def _model(args: argparse.Namespace, trainable: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    kind = TrainableSet(kind=trainable, lora_rank=args.lora_rank)
    if args.weights:
        model = build_model(trainable=kind)
    else:
        model = build_model(config=_config(args.arch), trainable=kind)
    return model.to(device)


def _batch(args: argparse.Namespace) -> list[torch.Tensor]:
    """A CPU batch as the data loader yields it; both paths trim it and copy it to the device each step."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 30000, (args.batch, args.seq_len), generator=generator)  # [B, L], no padding
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 2, (args.batch,), generator=generator)
    return [input_ids, attention_mask, labels]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return args.batch * args.steps / elapsed, peak


def _non_private(args: argparse.Namespace, trainable: str, dtype: str, device: torch.device) -> Measurement:
    model = _model(args, trainable, device)
    model.train()
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-4, weight_decay=0.0)
    batch = _batch(args)
    amp = DTYPES[dtype]

    def step() -> None:
        input_ids, attention_mask = trim_padding(batch[0], batch[1])
        input_ids, attention_mask, labels = (t.to(device, non_blocking=True) for t in (input_ids, attention_mask, batch[2]))
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rate, peak = _timed(step, args, device)
    return Measurement(trainable, dtype, "non-private", rate, peak)


def _private(args: argparse.Namespace, trainable: str, dtype: str, mode: str, device: torch.device) -> Measurement:
    model = _model(args, trainable, device)
    batch = _batch(args)
    dataset = TensorDataset(*batch)
    training = _dp_training(
        model,
        dataset,
        noise_multiplier=1.0,
        clip_norm=1.0,
        sample_rate=min(1.0, args.batch / 10_000),
        expected_batch_size=args.batch,
        clipping_mode=mode,
        optimizer_name="adamw",
        learning_rate=1e-4,
        accountant="rdp",
        secure_mode=not args.insecure_noise,  # the sites' default: noise from the AES-CTR keystream
        device=device,
    )
    training.module.train()

    def step() -> None:
        _physical_step(training, batch, clipping_mode=mode, device=device, amp_dtype=DTYPES[dtype])
        training.optimizer.step()
        training.optimizer.zero_grad(set_to_none=True)

    try:
        rate, peak = _timed(step, args, device)
    finally:
        training.close()
    return Measurement(trainable, dtype, mode, rate, peak)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> list[Measurement]:
    device = torch.device(args.device)
    # Untimed warm-up of the whole stack (allocator, kernels, thread pools): the first configuration
    # measured would otherwise pay for it, which skews its ratio.
    _non_private(argparse.Namespace(**{**vars(args), "steps": 2, "warmup": 1}), args.trainable.split(",")[0], "fp32", device)
    _free(device)
    results = []
    for trainable in args.trainable.split(","):
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                try:
                    if mode == "non-private":
                        results.append(_non_private(args, trainable, dtype, device))
                    else:
                        results.append(_private(args, trainable, dtype, mode, device))
                except (RuntimeError, ValueError, NotImplementedError) as exc:  # e.g. CUDA out of memory
                    results.append(Measurement(trainable, dtype, mode, 0.0, 0.0, error=str(exc).splitlines()[0][:80]))
                _free(device)
                print(f"  measured {trainable} {dtype} {mode}: {results[-1].samples_per_s:.1f} samples/s", flush=True)
    return results


def table(results: list[Measurement]) -> str:
    baseline = {(m.trainable, m.dtype): m.samples_per_s for m in results if m.mode == "non-private"}
    lines = [
        "| trainable | precision | mode | samples/s | vs non-private | peak GiB |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for m in results:
        base = baseline.get((m.trainable, m.dtype))
        ratio = f"{m.samples_per_s / base:.2f}x" if base else "-"
        if m.error:
            lines.append(f"| {m.trainable} | {m.dtype} | {m.mode} | failed: {m.error} | - | - |")
            continue
        lines.append(f"| {m.trainable} | {m.dtype} | {m.mode} | {m.samples_per_s:.1f} | {ratio} | {m.peak_gib:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["minilm", "bert-base", "tiny"], default="minilm")
    parser.add_argument("--weights", action="store_true", help="load the packaged all-MiniLM-L6-v2 weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32, help="physical batch (sequences per step)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trainable", default="full,lora", help="comma list of full, top_k, lora")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16 (bf16 = autocast)")
    parser.add_argument("--modes", default="non-private,hooks,ghost", help="comma list of non-private, hooks, ghost")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--insecure-noise", action="store_true",
                        help="torch's generator for the noise instead of the sites' keystream (comparison only)")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 8, seq 64, 3 steps (CPU smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.seq_len, args.steps, args.warmup = "tiny", 8, 64, 3, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"# dp_throughput: {args.arch}{' (packaged weights)' if args.weights else ' (random init)'}, batch {args.batch}, "
        f"seq {args.seq_len}, {args.steps} timed steps after {args.warmup} warm-up, on {device_name}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    print(table(run(args)))


if __name__ == "__main__":
    main()
