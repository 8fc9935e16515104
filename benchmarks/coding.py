"""Aggregation time of DETOX against plain Multi-Krum and Bulyan on all workers, same run.

DETOX (Rajput et al., NeurIPS 2019) claims near-linear aggregation cost: the group vote is
``O(n d)`` and the robust stage sees only ``n / r`` vectors. The paper's setting: n = 45 workers,
r = 3, f = 5 Byzantine. Plain Multi-Krum and Bulyan run on all 45 rows with f = 5 (Bulyan needs
n >= 4f + 3); DETOX's stage 2 uses f_eff = floor(5 / 2) = 2.

Usage: ``python benchmarks/coding.py [--quick] [--repeats 5]``. Prints a markdown table (median
of repeats after a warm-up call, ``block_until_ready``) with each time as a ratio to plain
Multi-Krum, and the machine.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rbyz import aggregators, coding

N, R, F = 45, 3, 5
KEY = 0  # the seed of DETOX's stage-2 permutation


def _grouped_updates(d: int, seed: int = 0) -> jax.Array:
    """Honest members of each group share a gradient; F Byzantine rows send -100 * g."""
    rng = np.random.default_rng(seed)
    x = np.repeat(rng.normal(size=(N // R, d)).astype(np.float32), R, axis=0)
    x[[0, 1, 3, 4, 9]] *= -100.0
    return jnp.asarray(x)


def _rules() -> dict:
    return {
        "mean (memory floor)": functools.partial(aggregators.mean),
        "multi_krum (n=45, f=5)": functools.partial(aggregators.multi_krum, f=F),
        "bulyan (n=45, f=5)": functools.partial(aggregators.bulyan, f=F),
        # As the DETOX reference, median-of-means and multi_krum permute the winners each step.
        "detox median-of-means (r=3)": functools.partial(coding.detox, f=F, r=R, key=KEY),
        "detox multi_krum (r=3)": functools.partial(coding.detox, f=F, r=R, stage2="multi_krum",
                                                    key=KEY),
        "detox bulyan (r=3)": functools.partial(coding.detox, f=F, r=R, stage2="bulyan"),
    }


def _time(fn, x, repeats: int) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small d (1e4) for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = (10_000,) if args.quick else (100_000, 1_000_000)
    rules = {name: jax.jit(rule) for name, rule in _rules().items()}
    device = jax.devices()[0]
    print(f"Machine: {platform.processor() or platform.machine()}, {device.platform} "
          f"({device.device_kind}), jax {jax.__version__}; n={N}, r={R}, f={F}, float32, "
          f"median of {args.repeats} after warm-up.\n")
    print("| rule | " + " | ".join(f"d={d:.0e} ms (x multi_krum)" for d in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    results = {name: [] for name in rules}
    for d in sizes:
        x = _grouped_updates(d)
        for name, rule in rules.items():
            results[name].append(_time(rule, x, args.repeats))
    baseline = results["multi_krum (n=45, f=5)"]
    for name, times in results.items():
        cells = [f"{1e3 * t:.1f} ({t / b:.2f})" for t, b in zip(times, baseline)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
