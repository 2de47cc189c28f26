"""Throughput of the DP-SGD noise: the CSPRNG sampler against torch's, in one run on this machine.

    python bench/secure_noise.py                    # d in {1e4, 1e5, 1e6}: a few seconds
    python bench/secure_noise.py --sizes 22.7M      # full MiniLM's trainable vector

For each vector length d it times, best of ``--repeats`` runs (the least disturbed on a shared machine):

* ``torch.normal``: Opacus's noise without secure_mode (one MT19937 draw per coordinate);
* ``opacus secure``: Opacus's secure_mode noise (four torch draws summed, ``_generate_noise``);
* ``aes-ctr bits``: the key stream alone that ``SecureGaussianNoise`` needs (four 64-bit words per coordinate);
* ``secure noise``: ``SecureGaussianNoise.sample`` (key stream, Box-Muller in float64 numpy, sum of four),

and prints normals per second and each one's time as a multiple of ``torch.normal``'s, all measured in
the same process.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
from opacus.optimizers.optimizer import _generate_noise

from policies.dp import AesCtrRandomStream, SecureGaussianNoise


def parse_size(text: str) -> int:
    """'1e4' -> 10000, '22.7M' -> 22700000, '4096' -> 4096."""
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(round(float(text[:-1] if scale > 1 else text) * scale))


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-touch page faults and lazy initialisation are not the steady state
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(d: int, repeats: int) -> dict[str, float]:
    """Seconds to draw noise for a float32 vector of ``d`` coordinates, per sampler."""
    like = torch.zeros(d, dtype=torch.float32)  # [d]: the shape of one parameter's summed_grad
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
    secure, stream = SecureGaussianNoise(), AesCtrRandomStream()
    return {
        "torch.normal": best_seconds(lambda: torch.normal(0.0, 1.0, size=(d,), generator=generator), repeats),
        "opacus secure": best_seconds(
            lambda: _generate_noise(1.0, like, generator=generator, secure_mode=True), repeats),
        "aes-ctr bits": best_seconds(lambda: stream.words(4 * d), repeats),
        "secure noise": best_seconds(lambda: secure.sample(1.0, like=like), repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1e4", "1e5", "1e6"], help="vector lengths, e.g. 1e4 22.7M")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the best is reported")
    args = parser.parse_args(argv)
    sizes = [parse_size(size) for size in args.sizes]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {sys.version.split()[0]}")
    print("| d | sampler | M normals/s | time vs torch.normal |")
    print("|---|---|---|---|")
    for d in sizes:
        seconds = measure(d, args.repeats)
        baseline = seconds["torch.normal"]
        for name, value in seconds.items():
            print(f"| {d:,} | {name} | {d / value / 1e6:.1f} | {value / baseline:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
