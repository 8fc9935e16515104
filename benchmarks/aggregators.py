"""Speed of rbyz's aggregators and pre-aggregators beside naive JAX code and ByzFL (torch).

For every worker count n and dimension d, on float32 updates ``[n, d]`` with ``f = n // 5``, the
script times every rule of ``rbyz.aggregators.names()``, the pre-aggregators, and the
compositions nnm+krum and bucketing+median; and in the same process the memory floor (``rbyz``
mean), a naive JAX formulation of each rule (``jnp.median``/``jnp.sort``, distances by ``vmap``
of differences, ``jnp.sum(axis=0)`` reductions) and ByzFL's implementation when it can be
imported. Each time is the median over ``--repeats`` rounds after a warm-up; each round times the
rule and its baselines once (``block_until_ready``), so that they share the machine's noise.

Usage::

    python benchmarks/aggregators.py                 # n in {10, 25, 51}, d in {1e5, 1e6}
    python benchmarks/aggregators.py --quick         # a smoke run: n in {10, 25}, d = 1e5
    python benchmarks/aggregators.py --n 25 --d 1e6 --repeats 5 --out results.md

See ``benchmarks/README.md`` for the columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tabulate import tabulate

import rbyz
from rbyz import aggregators as agg
from rbyz import preaggregators as pre

# A baseline whose first timed call is slower than this is timed once, not --repeats times.
SLOW_CALL_S = 2.0
# Naive baselines whose estimated cost (from the smaller d) exceeds this are skipped.
SKIP_ESTIMATE_S = 30.0


@dataclasses.dataclass
class Row:
    n: int
    d: int
    f: int
    rule: str
    seconds: float
    naive: float | None = None
    byzfl: float | None = None
    note: str = ""


# ----------------------------------------------------------------------------- timing


def time_together(calls: dict[str, Callable], *, repeats: int) -> dict[str, tuple[float, str]]:
    """Median seconds per call of each zero-argument call, timed in interleaved rounds.

    After one warm-up call each (compilation), every round times each call once, so that the
    contenders sample the same moments of a noisy machine and their ratio is stable; a call
    slower than ``SLOW_CALL_S`` is timed once and left out of the rounds.
    """
    def once(call):
        start = time.perf_counter()
        jax.block_until_ready(call())
        return time.perf_counter() - start

    times = {}
    for name, call in calls.items():
        once(call)
        times[name] = [once(call)]
    slow = {name for name, t in times.items() if t[0] > SLOW_CALL_S}
    for _ in range(repeats - 1):
        for name, call in calls.items():
            if name not in slow:
                times[name].append(once(call))
    return {name: (statistics.median(t), "1 call" if name in slow else "")
            for name, t in times.items()}


# ----------------------------------------------------------------------------- naive JAX


def naive_sq_distances(x):
    return jax.vmap(lambda row: jnp.sum((x - row) ** 2, axis=1))(x)


def naive_krum_scores(x, f):
    n = x.shape[0]
    return jnp.sort(naive_sq_distances(x), axis=1)[:, 1:n - f - 1].sum(axis=1)


def naive_krum(x, f):
    return x[jnp.argmin(naive_krum_scores(x, f))]


def naive_multi_krum(x, f):
    keep = jnp.argsort(naive_krum_scores(x, f))[: x.shape[0] - f]
    return jnp.mean(x[keep], axis=0)


def naive_trimmed_mean(x, f):
    return jnp.mean(jnp.sort(x, axis=0)[f: x.shape[0] - f], axis=0)


def naive_closest_to_median(x, k):
    distance = jnp.abs(x - jnp.median(x, axis=0))
    keep = jnp.argsort(distance, axis=0)[:k]
    return jnp.mean(jnp.take_along_axis(x, keep, axis=0), axis=0)


def naive_bulyan(x, f):
    n = x.shape[0]
    dist = naive_sq_distances(x)
    chosen = jnp.zeros((n,), bool)
    for _ in range(n - 2 * f):  # iterated Krum on the remaining rows
        remaining = n - jnp.sum(chosen)
        masked = jnp.where(chosen[None, :] | chosen[:, None], jnp.inf, dist)
        ranks = jnp.arange(n)[None, :]
        neighbours = jnp.sort(masked, axis=1)
        keep = (ranks >= 1) & (ranks < remaining - f - 1)
        scores = jnp.where(chosen, jnp.inf, jnp.sum(jnp.where(keep, neighbours, 0.0), axis=1))
        chosen = chosen.at[jnp.argmin(scores)].set(True)
    selected = x[jnp.nonzero(chosen, size=n - 2 * f)[0]]
    return naive_closest_to_median(selected, n - 4 * f)


def naive_geometric_median(x, iterations=4, nu=1e-5):
    z = jnp.median(x, axis=0)
    for _ in range(iterations):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(x - z, axis=1), nu)
        z = jnp.sum(weights[:, None] * x, axis=0) / jnp.sum(weights)
    return z


def naive_centered_clipping(x, tau=100.0):
    diff = x
    scale = jnp.minimum(1.0, tau / jnp.linalg.norm(diff, axis=1))
    return jnp.mean(diff * scale[:, None], axis=0)


def naive_nnm(x, f):
    n = x.shape[0]
    neighbours = jnp.argsort(naive_sq_distances(x), axis=1)[:, : n - f]
    return jnp.mean(x[neighbours], axis=1)


def naive_bucketing(x, key, s=2):
    n = x.shape[0]
    x = x[jax.random.permutation(key, n)]
    full = n // s
    means = x[: full * s].reshape(full, s, -1).mean(axis=1)
    if full * s == n:
        return means
    return jnp.concatenate([means, x[full * s:].mean(axis=0, keepdims=True)])


def naive_arc(x, f):
    n = x.shape[0]
    norms = jnp.linalg.norm(x, axis=1)
    threshold = jnp.sort(norms)[n - 1 - (2 * f * (n - f)) // n]
    return x * jnp.minimum(1.0, threshold / norms)[:, None]


def naive_rules(f: int) -> dict[str, Callable]:
    """Naive JAX versions of each rule, keyed like the rbyz rows."""
    return {
        "mean": lambda x: jnp.mean(x, axis=0),
        "median": lambda x: jnp.median(x, axis=0),
        "trimmed_mean": lambda x: naive_trimmed_mean(x, f),
        "meamed": lambda x: naive_closest_to_median(x, x.shape[0] - f),
        "krum": lambda x: naive_krum(x, f),
        "multi_krum": lambda x: naive_multi_krum(x, f),
        "bulyan": lambda x: naive_bulyan(x, f),
        "geometric_median": naive_geometric_median,
        "centered_clipping": naive_centered_clipping,
        "sign_majority": lambda x: jnp.sign(jnp.sum(jnp.sign(x), axis=0)),
        "pre:nnm": lambda x: naive_nnm(x, f),
        "pre:bucketing": lambda x: naive_bucketing(x, jax.random.key(0)),
        "pre:arc": lambda x: naive_arc(x, f),
        "nnm+krum": lambda x: naive_krum(naive_nnm(x, f), f),
        "bucketing+median": lambda x: jnp.median(naive_bucketing(x, jax.random.key(0)), axis=0),
    }


# ----------------------------------------------------------------------------- ByzFL


def load_byzfl():
    """``(aggregators, preaggregators)`` modules of ByzFL, or ``(None, reason)``.

    ``import byzfl`` also imports its training framework (torchvision and plotting libraries);
    when that fails, only the two aggregation modules are loaded, which need torch and numpy.
    """
    try:
        import byzfl  # noqa: F401
        from byzfl.aggregators import aggregators, preaggregators
        return (aggregators, preaggregators), "import byzfl"
    except ModuleNotFoundError as error:
        if error.name in ("byzfl", "torch"):
            return None, f"ByzFL skipped: {error} (pip install torch==2.13.0 byzfl --no-deps)"
    except Exception:  # noqa: BLE001  (e.g. a torchvision built for another torch)
        pass
    for name in [m for m in sys.modules if m == "byzfl" or m.startswith("byzfl.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("byzfl")
    package = types.ModuleType("byzfl")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = package
    try:
        from byzfl.aggregators import aggregators, preaggregators
    except Exception as error:  # noqa: BLE001
        return None, f"ByzFL skipped: {error!r}"
    return (aggregators, preaggregators), "byzfl.aggregators only (import byzfl failed)"


# ByzFL's MDA loops in Python over all C(n, f) subsets; beyond this many it is not timed.
BYZFL_MDA_MAX_SUBSETS = 60_000
# ByzFL's SMEA runs a power iteration over d coordinates per subset: beyond this many subsets
# (C(10, 2) = 45 is timed, C(25, 5) = 53130 would take hours at d = 1e6) it is not timed.
BYZFL_SMEA_MAX_SUBSETS = 1_000


def byzfl_rules(modules, f: int, n: int) -> dict[str, Callable]:
    aggregators, preaggregators = modules
    median, krum = aggregators.Median(), aggregators.Krum(f=f)
    nnm, bucketing = preaggregators.NNM(f=f), preaggregators.Bucketing(s=2)
    arc = preaggregators.ARC(f=f)
    rules = {
        "mean": aggregators.Average(),
        "median": median,
        "trimmed_mean": aggregators.TrMean(f=f),
        "meamed": aggregators.Meamed(f=f),
        "krum": krum,
        "multi_krum": aggregators.MultiKrum(f=f),
        "geometric_median": aggregators.GeometricMedian(),
        "centered_clipping": aggregators.CenteredClipping(),
        "pre:nnm": nnm,
        "pre:bucketing": bucketing,
        # ARC writes into its input: give it a copy (the copy is timed too).
        "pre:arc": lambda x: arc(x.clone()),
        "nnm+krum": lambda x: krum(nnm(x)),
        "bucketing+median": lambda x: median(bucketing(x)),
    }
    if math.comb(n, f) <= BYZFL_MDA_MAX_SUBSETS:
        rules["mda"] = aggregators.MDA(f=f)
    # The rules added with the catalogue (issue 14), where ByzFL has them: MoNNA around worker 0
    # (rbyz's pivot=0), CAF (ByzFL: one power iteration from a random vector per round; rbyz
    # the exact top eigenvalue), SMEA (both exact over the subsets), clipping at norm 1.
    if hasattr(aggregators, "MoNNA"):
        rules["monna"] = aggregators.MoNNA(f=f, idx=0)
    if hasattr(aggregators, "CAF"):
        rules["caf"] = aggregators.CAF(f=f)
    if hasattr(aggregators, "SMEA") and math.comb(n, f) <= BYZFL_SMEA_MAX_SUBSETS:
        rules["smea"] = aggregators.SMEA(f=f)
    if hasattr(preaggregators, "Clipping"):
        # Like ARC, Clipping writes into its input: the copy is timed too (rbyz allocates its
        # output, which at d = 1e6 costs more than the norms).
        clipping = preaggregators.Clipping(c=1.0)
        rules["pre:clip"] = lambda x: clipping(x.clone())
    return rules


# ----------------------------------------------------------------------------- rbyz


def feasible_f(declared, n: int, f: int) -> int | None:
    """The largest ``f' <= f`` the rule's declared constraint admits for this n (e.g. Bulyan
    needs n >= 4f + 3)."""
    return next((c for c in range(f, -1, -1) if declared.constraint.explain(n, c) is None), None)


def rbyz_rules(x, f: int) -> dict[str, tuple[Callable, int]]:
    """``name -> (jitted fn(x), f used)`` for the aggregators, pre-aggregators, compositions,
    built from the declarations (keys for rules that declare one, f from the constraint)."""
    rules = {}
    key = jax.random.key(0)
    n = x.shape[0]
    for declared in agg.specs():
        f_rule = feasible_f(declared, n, f)
        if f_rule is None:
            continue
        extra = {"key": key} if declared.key else {}
        rules[declared.name] = (jax.jit(functools.partial(declared.fn, f=f_rule, **extra)), f_rule)
    settings = {"nnm": {"f": f}, "bucketing": {"s": 2}, "arc": {"f": f}, "clip": {"max_norm": 1.0}}
    for declared in pre.specs():
        extra = {"key": key} if declared.key else {}
        rules[f"pre:{declared.name}"] = (
            jax.jit(functools.partial(declared.fn, **settings[declared.name], **extra)), f)
    nnm_krum = pre.compose(functools.partial(pre.nnm, f=f), functools.partial(agg.krum, f=f))
    bucket_median = pre.compose(functools.partial(pre.bucketing, s=2), agg.median)
    rules["nnm+krum"] = (jax.jit(nnm_krum), f)
    rules["bucketing+median"] = (jax.jit(lambda u: bucket_median(u, key=key)), f)
    return rules


def bench_size(n, d, f, *, repeats, byzfl, estimates, extra_bulyan_f=None,
               only=()) -> list[Row]:
    x = jax.random.normal(jax.random.key(n * 7919 + d), (n, d), jnp.float32)
    x_torch, wait = None, (lambda out: out)
    if byzfl is not None:
        import torch

        x_torch = torch.from_numpy(np.array(x))
        if jax.default_backend() == "gpu" and torch.cuda.is_available():
            # On a GPU, ByzFL runs on it too (its ops follow the tensor's device); its calls
            # are timed up to torch.cuda.synchronize(), as rbyz's up to block_until_ready.
            x_torch = x_torch.cuda()

            def wait(out):
                torch.cuda.synchronize()
                return out
    out = []
    rules = rbyz_rules(x, f)
    if extra_bulyan_f is not None and "bulyan" in agg.names():
        rules["bulyan (f=%d)" % extra_bulyan_f] = (
            jax.jit(functools.partial(agg.bulyan, f=extra_bulyan_f)), extra_bulyan_f)
    for name, (fn, f_rule) in rules.items():
        base = name.split(" ")[0]
        if only and base not in only:
            continue
        calls = {"rbyz": functools.partial(fn, x)}
        naive = naive_rules(f_rule).get(base)
        estimate = estimates.get((n, base))
        skipped = naive is not None and estimate is not None and estimate * d > SKIP_ESTIMATE_S
        if naive is not None and not skipped:
            calls["naive"] = functools.partial(jax.jit(naive), x)
        if byzfl is not None and base in byzfl_rules(byzfl, f_rule, n):
            theirs = byzfl_rules(byzfl, f_rule, n)[base]
            calls["byzfl"] = lambda theirs=theirs: wait(theirs(x_torch))
        timed = time_together(calls, repeats=repeats)
        seconds, note = timed["rbyz"]
        row = Row(n, d, f_rule, name, seconds, note=note)
        if skipped:
            row.note = _join(row.note, f"naive skipped (est. {estimate * d:.0f} s)")
        if "naive" in timed:
            row.naive, naive_note = timed["naive"]
            estimates[(n, base)] = row.naive / d
            row.note = _join(row.note, naive_note and f"naive {naive_note}")
        if "byzfl" in timed:
            row.byzfl = timed["byzfl"][0]
        out.append(row)
        print(f"  n={n} d={d:.0e} {name:<20} {seconds * 1e3:9.2f} ms", flush=True)
    return out


def _join(*notes):
    return "; ".join(note for note in notes if note)


# ----------------------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    floors = {(r.n, r.d): r.seconds for r in rows if r.rule == "mean"}
    body = []
    for r in rows:
        floor = floors.get((r.n, r.d))
        body.append([
            r.n, f"{r.d:.0e}", r.f, r.rule, f"{r.seconds * 1e3:.2f}",
            f"{4 * r.n * r.d / r.seconds / 1e9:.1f}",
            f"{r.seconds / floor:.1f}" if floor else "",
            f"{r.naive / r.seconds:.1f}" if r.naive else "",
            f"{r.byzfl / r.seconds:.1f}" if r.byzfl else "",
            r.note,
        ])
    headers = ["n", "d", "f", "rule", "ms", "GB/s", "x mean", "naive/rbyz", "ByzFL/rbyz", "note"]
    return tabulate(body, headers=headers, tablefmt="github")


def targets(rows: list[Row]) -> list[str]:
    def find(rule, n, d):
        return next((r for r in rows if r.rule == rule and r.n == n and r.d == d), None)

    lines = []

    def check(label, ok):
        if ok is None:
            lines.append(f"SKIP: {label.split(' (got')[0]} (not measured in this run)")
        else:
            lines.append(f"{'PASS' if ok else 'FAIL'}: {label}")

    mean = find("mean", 25, 10**6)
    for rule in ("median", "trimmed_mean"):
        r = find(rule, 25, 10**6)
        ratio = r.seconds / mean.seconds if r and mean else None
        check(f"{rule} <= 5x mean at n=25, f=5, d=1e6 (got {ratio and round(ratio, 1)}x)",
              None if ratio is None else ratio <= 5)
        speedup = r.byzfl / r.seconds if r and r.byzfl else None
        check(f"{rule} >= 20x faster than ByzFL (got {speedup and round(speedup, 1)}x)",
              None if speedup is None else speedup >= 20)
    for rule in ("krum", "multi_krum", "geometric_median", "centered_clipping"):
        r = find(rule, 25, 10**6)
        speedup = r.byzfl / r.seconds if r and r.byzfl else None
        check(f"{rule} >= 3x faster than ByzFL at n=25, d=1e6 (got "
              f"{speedup and round(speedup, 1)}x)", None if speedup is None else speedup >= 3)
    # Issue 14: no rule added with the catalogue slower than its peer at n = 25, d = 1e6.
    for rule in ("monna", "caf", "smea", "pre:clip"):
        r = find(rule, 25, 10**6)
        speedup = r.byzfl / r.seconds if r and r.byzfl else None
        check(f"{rule} not slower than ByzFL at n=25, d=1e6 (got "
              f"{speedup and round(speedup, 1)}x)", None if speedup is None else speedup >= 1)
    bulyan, krum = find("bulyan (f=12)", 51, 10**6), find("krum", 51, 10**6)
    ratio = bulyan.seconds / krum.seconds if bulyan and krum else None
    check(f"bulyan (n=51, f=12, d=1e6) < 10x krum at the same size (got "
          f"{ratio and round(ratio, 1)}x)", None if ratio is None else ratio < 10)
    return lines


def machine() -> str:
    return (f"{platform.platform()}; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
            f"jax {jax.__version__} ({jax.default_backend()}); devices: {jax.devices()}; "
            f"rbyz {rbyz.__version__}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n in {10, 25}, d = 1e5, 3 repeats")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="worker counts")
    parser.add_argument("--d", type=float, nargs="+", default=None, help="dimensions (1e6 ok)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per rule (5)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--no-byzfl", action="store_true", help="do not time ByzFL")
    parser.add_argument("--rules", nargs="+", default=(),
                        help="time only these (e.g. mean caf smea pre:clip); default all")
    args = parser.parse_args(argv)

    gpu = jax.default_backend() != "cpu"
    ns = args.n or ([10, 25] if args.quick else [10, 25, 51])
    ds = [int(d) for d in (args.d or ([1e5] if args.quick else [1e5, 1e6] + [1e7] * gpu))]
    repeats = args.repeats or (3 if args.quick else 5)
    byzfl, byzfl_note = (None, "ByzFL skipped (--no-byzfl)") if args.no_byzfl else load_byzfl()
    if byzfl is not None:
        import torch

        on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        byzfl_note += (f"; torch {torch.__version__} on "
                       f"{torch.cuda.get_device_name(0) if on_gpu else 'the CPU'}")
    print(machine())
    print(f"ByzFL: {byzfl_note}", flush=True)

    rows, estimates = [], {}
    for d in sorted(ds):
        for n in ns:
            rows += bench_size(n, d, n // 5, repeats=repeats, byzfl=byzfl, estimates=estimates,
                               extra_bulyan_f=12 if n == 51 else None, only=set(args.rules))
    report = "\n".join([
        "# rbyz aggregator benchmark", "", f"Machine: {machine()}", "",
        f"ByzFL: {byzfl_note}", "",
        f"float32, median of {repeats} rounds after a warm-up, each round timing rbyz and its "
        "baselines once.",
        "", table(rows), "", "## Targets", "", *[f"- {line}" for line in targets(rows)], "",
    ])
    print(report)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(report)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
