"""Secure-sum cost: mask-generator throughput, and wall time per site and for the aggregator.

Runs whole sessions in one process (``policies.secagg.run_in_memory_round``: every message through
its wire form, every site state through bytes), one core, and prints markdown tables.

    python bench/secure_sum.py --quick                       # CI: d = 0.3M, n in {3, 10}
    python bench/secure_sum.py                               # d in {0.3M, 22.7M}, n in {3, 10, 20, 50}
    python bench/secure_sum.py --sizes 22.7M --sites 10 --round-seconds 120

Per-site time is what one site spends in all five stages (sites run in parallel on their own
machines, so a round waits for the slowest site, then the aggregator). With ``--secagg-plus``
each n >= 20 also runs with a SecAgg+ neighbourhood of k = 2 * ceil(log2 n) sites.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bench.secagg_local import DropPoint, run_in_memory_round
from policies.secagg import Roster, RoundContext, SecureSumConfig
from policies.secagg.crypto import MASK_CHUNK_BYTES, apply_masks

CLIP = 1.0
QUANTISATION_BITS = 24  # leaves headroom for up to 256 sites in Z_(2^32)


@dataclass(frozen=True)
class Cell:
    """One measured (d, n, mode) cell of the protocol table."""

    d: int  # vector length
    n: int  # sites in the roster
    k: int | None  # SecAgg+ neighbourhood size, None for the complete graph
    dropped: int  # sites that stop after ShareKeys (their pairwise masks are undone by the aggregator)
    site_mean_s: float  # mean over sites of the seconds spent in all five stages
    site_max_s: float  # the slowest site
    masking_s: float  # mean seconds in MaskedInput (encode + masks), the bulk of a site's cost
    aggregator_s: float  # all aggregator work, including unmasking
    max_error: float  # max |decoded - float sum| over coordinates
    error_bound: float  # n_participants * quantisation step


def parse_size(text: str) -> int:
    """'0.3M' -> 300000, '22.7M' -> 22700000, '4096' -> 4096."""
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(round(float(text[:-1] if scale > 1 else text) * scale))


def gb_per_second(nbytes: int, run, repeats: int = 3) -> float:
    """Best of ``repeats`` runs: the least disturbed by the other users of a shared machine."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def generator_rates(total_bytes: int) -> list[tuple[str, float]]:
    """GB/s of each way of producing mask bytes, one core."""
    key, nonce = os.urandom(16), os.urandom(16)

    def aes_update_into(chunk: int):
        def run():
            encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
            zeros, buffer = bytes(chunk), bytearray(chunk + 15)
            for _ in range(total_bytes // chunk):
                encryptor.update_into(zeros, buffer)

        return run

    def aes_fresh_buffer():
        encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
        zeros = bytes(4 << 20)
        for _ in range(total_bytes // len(zeros)):
            encryptor.update(zeros)

    words = np.zeros(total_bytes // 4, dtype="<u4")

    def mask_apply():
        apply_masks(words, add=[os.urandom(32)], subtract=[])

    def mt19937():  # Flower's masks; a reference point only, never used for masks here
        np.random.Generator(np.random.MT19937(1234)).integers(
            0, 2**32, size=total_bytes // 4, dtype=np.uint32
        )

    return [
        (
            f"AES-128-CTR update_into, {MASK_CHUNK_BYTES >> 10} KiB buffer (our PRG)",
            gb_per_second(total_bytes, aes_update_into(MASK_CHUNK_BYTES)),
        ),
        ("AES-128-CTR update_into, 4 MiB buffer", gb_per_second(total_bytes, aes_update_into(4 << 20))),
        ("AES-128-CTR update(), fresh 4 MiB buffer per call", gb_per_second(total_bytes, aes_fresh_buffer)),
        ("apply_masks: keystream + add mod 2^32 into the vector", gb_per_second(total_bytes, mask_apply)),
        ("numpy MT19937 integers (Flower-style, reference)", gb_per_second(total_bytes, mt19937)),
    ]


def secagg_plus_k(n: int) -> int:
    return 2 * math.ceil(math.log2(n))


def measure(d: int, n: int, k: int | None, dropped: int, update: np.ndarray) -> Cell:
    keys = {f"site-{i:02d}": Ed25519PrivateKey.generate() for i in range(n)}
    roster = Roster.of((site, key.public_key().public_bytes_raw()) for site, key in keys.items())
    holders = n if k is None else k + 1
    config = SecureSumConfig(
        vector_length=d,
        clip=CLIP,
        quantisation_bits=QUANTISATION_BITS,
        threshold=holders // 2 + 1,
        neighbourhood_size=k,
    )
    context = RoundContext(config, roster, f"bench/d{d}/n{n}/k{k}")
    updates = {site: update for site in keys}  # the same array: sites' cost does not depend on values
    dropouts = {site: DropPoint.MASKED_INPUT for site in roster.site_ids[:dropped]}
    outcome = run_in_memory_round(context, keys, updates, dropouts=dropouts)
    answering = [s for s in roster.site_ids if s in outcome.seconds]
    per_site = [outcome.site_seconds(site) for site in answering]
    masking = [outcome.seconds[s].get("mask_input", 0.0) for s in answering]
    participants = len(outcome.result.participants)
    expected = participants * np.clip(update.astype(np.float64), -CLIP, CLIP)
    return Cell(
        d=d,
        n=n,
        k=k,
        dropped=dropped,
        site_mean_s=statistics.fmean(per_site),
        site_max_s=max(per_site),
        masking_s=statistics.fmean(masking),
        aggregator_s=outcome.aggregator_seconds(),
        max_error=float(np.abs(outcome.result.total - expected).max()),
        error_bound=participants * context.encoding.step,
    )


def print_generators(rates: list[tuple[str, float]]) -> None:
    print("| mask generator (one core) | GB/s |")
    print("| --- | ---: |")
    for name, rate in rates:
        print(f"| {name} | {rate:.2f} |")


def print_cells(cells: list[Cell], round_seconds: float | None) -> None:
    print(
        "| d | n | graph | dropped | per site, mean s | per site, max s | of which MaskedInput s | aggregator s | round overhead s | max abs error (bound) |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for c in cells:
        graph = "complete" if c.k is None else f"SecAgg+ k={c.k}"
        overhead = c.site_max_s + c.aggregator_s
        share = f" ({100 * overhead / round_seconds:.1f}%)" if round_seconds else ""
        print(
            f"| {c.d / 1e6:.1f}M | {c.n} | {graph} | {c.dropped} | {c.site_mean_s:.3f} | {c.site_max_s:.3f} | "
            f"{c.masking_s:.3f} | {c.aggregator_s:.3f} | {overhead:.2f}{share} | {c.max_error:.1e} ({c.error_bound:.1e}) |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", nargs="+", default=["0.3M", "22.7M"], help="vector lengths d (e.g. 0.3M 22.7M)"
    )
    parser.add_argument("--sites", nargs="+", type=int, default=[3, 10, 20, 50], help="numbers of sites n")
    parser.add_argument(
        "--secagg-plus", action="store_true", help="also run SecAgg+ (k = 2 ceil(log2 n)) for n >= 20"
    )
    parser.add_argument(
        "--dropouts", type=int, default=0, help="sites that drop after ShareKeys in each session"
    )
    parser.add_argument(
        "--generator-mb", type=int, default=256, help="bytes per mask-generator measurement, MB"
    )
    parser.add_argument(
        "--round-seconds", type=float, default=None, help="a round's duration, to print the share"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI mode: d = 0.3M, n in {3, 10}, 64 MB generator runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.sites, args.generator_mb = ["0.3M"], [3, 10], 64

    print(f"# secure sum benchmark: {' '.join(sys.argv)}")
    print(
        f"# {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, Python {platform.python_version()}, one core used\n"
    )
    print_generators(generator_rates(args.generator_mb << 20))
    print()
    cells = []
    for size in args.sizes:
        d = parse_size(size)
        update = (np.random.default_rng(0).standard_normal(d) * 0.05).astype(np.float32)  # data, not a mask
        for n in args.sites:
            cells.append(measure(d, n, None, args.dropouts, update))
            if args.secagg_plus and n >= 20:
                cells.append(measure(d, n, secagg_plus_k(n), args.dropouts, update))
            print(f"# measured d={d} n={n}", file=sys.stderr, flush=True)
    print_cells(cells, args.round_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
