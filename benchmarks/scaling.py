"""Scaling of the aggregation with n, d, devices and layout; the accelerator's memory bandwidth.

In one run, on the device named in the header:

(a) ``devices``: time of one jitted aggregation of float32 updates ``[n, d]`` (``f = n // 5``)
    for mean (the floor), median, trimmed mean, Krum, geometric median and centered clipping,
    stacked on one device (``rbyz.transforms.aggregate(rule, f=f)``) and in collective mode over
    the first ``k`` devices (``worker_mesh(k)``, ``jax.shard_map``, ``tiled=True``) with
    ``layout="gather"`` and ``layout="coordinates"``. On the CPU the devices are simulated
    (``jax_num_cpu_devices``) and share its cores; on an accelerator they are the local devices.
(b) ``bandwidth`` (on an accelerator, or with ``--bandwidth``): the same rules stacked on one
    device, float32 and bfloat16, as a fraction of the device's memory bandwidth measured in the
    same run (a sum and a copy of a large flat array), beside ByzFL's torch versions on the same
    device when torch and ByzFL import.
(c) ``step``: the harness's whole defended training step (gradients, momentum, attack,
    aggregation, update; :func:`step_rows`), per device count and layout, beside its FLOP floor.

Each time is the median over ``--repeats`` rounds after a warm-up call; each round times every
configuration of one size once (``block_until_ready``; ``torch.cuda.synchronize``), so that
their ratios share the machine's noise. See ``benchmarks/README.md`` ("Scaling") for the columns.

Usage::

    python benchmarks/scaling.py                      # CPU: 8 simulated devices, n in {16, 32},
                                                      # d in {1e5, 1e6}; GPU: (b) and (a)
    python benchmarks/scaling.py --quick              # smoke run, under a minute on 2 cores
    python benchmarks/scaling.py --quick --bandwidth  # plus (b) at tiny sizes
    python benchmarks/scaling.py --n 32 --d 1e6 --devices 1 8 --out /tmp/scaling.md
    python benchmarks/scaling.py --no-devices --bw-n 25 --bw-d 1e7   # (b) only, one size
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import P
from tabulate import tabulate

from rbyz import aggregators as agg
from rbyz import distributed, transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aggregators import byzfl_rules, feasible_f, load_byzfl, machine, time_together

RULES = ("mean", "median", "trimmed_mean", "krum", "geometric_median", "centered_clipping")
# Arrays larger than this fraction of the device memory are skipped in the bandwidth table.
MEMORY_FRACTION = 0.4
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEVICES_COLUMNS = ("n", "d", "f", "rule", "devices", "layout", "ms", "GB/s", "x mean",
                   "x stacked", "note")
BANDWIDTH_COLUMNS = ("rule", "dtype", "n", "d", "f", "ms", "GB/s", "% bandwidth", "x mean",
                     "ByzFL ms", "ByzFL/rbyz", "note")


# ----------------------------------------------------------------------------- helpers


class Guarded:
    """A zero-argument call that waits for its result and, once it has raised (out of memory, a
    size the library refuses), returns at once ever after and keeps the error for the table."""

    def __init__(self, call: Callable, wait: Callable = jax.block_until_ready):
        self.call, self.wait, self.error = call, wait, None

    def __call__(self):
        if self.error is None:
            try:
                self.wait(self.call())
            except Exception as error:  # noqa: BLE001  (reported in the table's note)
                self.error = error
                release_memory()

    def note(self, who: str = "") -> str:
        if self.error is None:
            return ""
        text = str(self.error)
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            return f"{who}out of memory"
        return f"{who}{type(self.error).__name__}: {text.strip().splitlines()[0][:60]}"


def timed(calls: dict, repeats: int) -> dict:
    """``name -> (seconds or None, note)`` for ``Guarded`` calls, interleaved per round."""
    out = {}
    for name, (seconds, note) in time_together(calls, repeats=repeats).items():
        error = calls[name].note()
        out[name] = (None, error) if error else (seconds, note)
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def normal_rows(key, n: int, d: int, dtype):
    """``[n, d]`` standard normal rows, one key per row (keeps each draw under 2**32 values)."""
    return jax.vmap(lambda k: jax.random.normal(k, (d,), dtype))(jax.random.split(key, n))


def rule_f(name: str, n: int) -> int:
    """``n // 5``, or the largest smaller ``f`` the rule accepts for this ``n``."""
    return feasible_f(agg.spec(name), n, n // 5)


def ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}" if a and b else ""


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def release_memory() -> None:
    """Frees unreferenced buffers (an error's traceback holds some in a cycle) and returns
    torch's cached GPU memory, which JAX cannot use."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def free() -> None:
    """Drops what the last size left behind: buffers, compiled programs, torch's cache."""
    release_memory()
    jax.clear_caches()


def accelerator() -> bool:
    return jax.default_backend() != "cpu"


# ----------------------------------------------------------------------------- (a) devices


def stacked_call(rule: str, f: int, x) -> Callable:
    tx = transforms.aggregate(rule, f=f)
    state = tx.init(jnp.zeros(x.shape[1:], x.dtype))
    return functools.partial(jax.jit(lambda u, s: tx.update(u, s)[0]), x, state)


def collective_call(rule: str, f: int, x, mesh, layout: str) -> Callable:
    """One jitted ``tx.update`` under ``shard_map``, ``x`` sharded over the workers axis."""
    tx = transforms.aggregate(rule, f=f, axis_name="workers", tiled=True, layout=layout)
    state = distributed.replicate(tx.init(jnp.zeros(x.shape[1:], x.dtype)), mesh)
    update = jax.shard_map(lambda u, s: tx.update(u, s)[0], mesh=mesh,
                           in_specs=(P("workers"), P()), out_specs=P())
    return functools.partial(jax.jit(update), x, state)


def devices_size(n: int, d: int, devices: list[int], layouts: list[str], repeats: int) -> list:
    """Rows ``(rule, f, devices, layout, seconds, note)`` at one ``(n, d)``: per rule the stacked
    call, then each layout over each device count, all timed in the same rounds."""
    x = normal_rows(jax.random.key(n * 7919 + d), n, d, jnp.float32)
    sharded = {k: distributed.shard_workers(x, distributed.worker_mesh(k)) for k in devices}
    calls = {}
    for rule in RULES:
        f = rule_f(rule, n)
        calls[(rule, f, 1, "stacked")] = Guarded(stacked_call(rule, f, x))
        for layout in layouts:
            for k, xk in sharded.items():
                calls[(rule, f, k, layout)] = Guarded(
                    collective_call(rule, f, xk, xk.sharding.mesh, layout))
    start = time.perf_counter()
    results = timed(calls, repeats)
    print(f"  n={n} d={d:.0e}: {len(calls)} configurations in {time.perf_counter() - start:.1f} s",
          flush=True)
    return [(*config, *results[config]) for config in calls]


def devices_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for d in args.d:
        for n in args.n:
            usable = [k for k in args.devices if n % k == 0]
            notes += [f"n={n} skipped on {k} devices (n must be a multiple of the device count)"
                      for k in args.devices if n % k]
            measured = devices_size(n, d, usable, args.layouts, args.repeats)
            floor = {(k, layout): s for rule, _, k, layout, s, _ in measured if rule == "mean"}
            stacked = {rule: s for rule, _, _, layout, s, _ in measured if layout == "stacked"}
            for rule, f, k, layout, seconds, note in measured:
                rows.append({
                    "n": n, "d": d, "f": f, "rule": rule, "devices": k, "layout": layout,
                    "ms": ms(seconds),
                    "GB/s": f"{4 * n * d / seconds / 1e9:.1f}" if seconds else "",
                    "x mean": ratio(seconds, floor.get((k, layout))),
                    "x stacked": ratio(seconds, stacked.get(rule)),
                    "note": note,
                })
            free()
    return rows, notes


# ----------------------------------------------------------------------------- (b) bandwidth


def memory_limit(args: argparse.Namespace) -> tuple[float, str]:
    """Bytes of device memory to size against, and where the number came from."""
    if args.max_gb is not None:
        return args.max_gb * 1e9, "--max-gb"
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"]), "memory_stats()['bytes_limit']"
    return 8e9, "--max-gb default (memory_stats() reports no limit)"


def measure_bandwidth(nbytes: float, repeats: int) -> tuple[float, str]:
    """The device's memory bandwidth (bytes/s) in this run: the faster of a sum ``x.sum()`` of a
    flat float32 array (bytes read) and a copy ``x * 2`` (bytes read and written), and the
    sentence that says so. (A sum over the leading axis of a short, wide array is no probe: XLA's
    CPU backend runs it at a tenth of the streaming rate.)"""
    x = jnp.ones((max(int(nbytes) // 4, 1),), jnp.float32)
    total, copy = jax.jit(lambda a: a.sum()), jax.jit(lambda a: a * 2)
    times = time_together({"sum": functools.partial(total, x),
                           "copy": functools.partial(copy, x)}, repeats=max(repeats, 5))
    size = x.nbytes
    del x
    free()
    rates = {"sum": size / times["sum"][0], "copy": 2 * size / times["copy"][0]}
    text = (f"measured {max(rates.values()) / 1e9:.1f} GB/s, the faster of x.sum() "
            f"({rates['sum'] / 1e9:.1f} GB/s read) and x * 2 ({rates['copy'] / 1e9:.1f} GB/s "
            f"read + written) on a flat {gb(size)} float32 array")
    return max(rates.values()), text


def torch_device() -> tuple[str | None, str]:
    """Where ByzFL's torch runs beside JAX: ``"cuda"``, ``"cpu"``, or ``None`` and why not."""
    import torch

    if torch.cuda.is_available():
        return "cuda", f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"
    if accelerator():
        return None, (f"ByzFL skipped: torch {torch.__version__} has no CUDA, and ByzFL on the "
                      "host would not be a comparison on this device")
    return "cpu", f"torch {torch.__version__} on the CPU"


def to_torch(x, device: str):
    """``x`` as a torch tensor on ``device`` (zero-copy through DLPack where possible)."""
    import numpy as np
    import torch

    try:
        return torch.from_dlpack(x).to(device)
    except Exception:  # noqa: BLE001  (an old DLPack path): through the host
        dtype = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
        return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(device, dtype)


def torch_wait(device: str) -> Callable:
    import torch

    return (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)


def bandwidth_size(dtype: str, n: int, d: int, repeats: int, byzfl) -> list:
    """Rows ``(rule, f, seconds, note, byzfl seconds, byzfl note)`` at one size and dtype."""
    x = normal_rows(jax.random.key(n * 7919 + d), n, d, DTYPES[dtype])
    calls = {}
    for rule in RULES:
        fn = jax.jit(functools.partial(agg.get(rule), f=rule_f(rule, n)))
        calls[rule] = Guarded(functools.partial(fn, x))
    if byzfl is not None:
        modules, device = byzfl
        x_torch, wait = to_torch(x, device), torch_wait(device)
        for rule in RULES:
            theirs = byzfl_rules(modules, rule_f(rule, n), n)[rule]
            calls[f"byzfl:{rule}"] = Guarded(functools.partial(theirs, x_torch), wait=wait)
    results = timed(calls, repeats)
    rows = []
    for rule in RULES:
        seconds, note = results[rule]
        theirs, their_note = results.get(f"byzfl:{rule}", (None, ""))
        rows.append((rule, rule_f(rule, n), seconds, note, theirs,
                     their_note and f"ByzFL {their_note}"))
    print(f"  {dtype} n={n} d={d:.0e}: " + "  ".join(
        f"{rule} {ms(s) or '-'}" for rule, _, s, *_ in rows) + " ms", flush=True)
    return rows


def bandwidth_rows(args: argparse.Namespace, byzfl, bandwidth: float) -> list[dict]:
    limit, _ = memory_limit(args)
    rows = []
    for d in args.bw_d:
        for n in args.bw_n:
            for dtype in args.dtypes:
                itemsize = jnp.dtype(DTYPES[dtype]).itemsize
                nbytes = n * d * itemsize
                base = {"dtype": dtype, "n": n, "d": d}
                if nbytes > MEMORY_FRACTION * limit:
                    rows.append({**base, "rule": "(all)", "note": (
                        f"skipped: {gb(nbytes)} > {MEMORY_FRACTION:.0%} of {gb(limit)}")})
                    continue
                measured = bandwidth_size(dtype, n, d, args.repeats, byzfl)
                floor = next(s for rule, _, s, *_ in measured if rule == "mean")
                for rule, f, seconds, note, theirs, their_note in measured:
                    rate = nbytes / seconds if seconds else None
                    rows.append({
                        **base, "rule": rule, "f": f, "ms": ms(seconds),
                        "GB/s": f"{rate / 1e9:.1f}" if rate else "",
                        "% bandwidth": f"{100 * rate / bandwidth:.0f}" if rate else "",
                        "x mean": ratio(seconds, floor),
                        "ByzFL ms": ms(theirs) or "-",
                        "ByzFL/rbyz": ratio(theirs, seconds) or "-",
                        "note": join(note, their_note),
                    })
                free()
    return rows


# ----------------------------------------------------------------------------- (c) step


STEP_RULES = ("mean", "median", "krum", "centered_clipping")
STEP_COLUMNS = ("n", "rule", "devices", "layout", "ms/step", "steps/s", "x floor", "x stacked",
                "note")


def step_experiment(rule: str, n: int, devices: int, layout: str, steps: int):
    """The defended step of ``rbyz.sim``: the 784-100-10 MLP, batch 32 per worker, worker
    momentum 0.9, ALIE (z = 1) on the momenta from ``f = n // 5`` workers, ``rule``, SGD."""
    from rbyz.sim import config

    return config.from_dict({
        "data": {"dataset": "synthetic", "batch_size": 32}, "model": {"name": "mlp"},
        "workers": {"n": n, "f": n // 5, "momentum": 0.9},
        "attack": {"name": "alie", "hparams": {"z": 1.0}},
        "defence": {"rule": rule}, "train": {"steps": steps, "eval_every": steps},
        "parallel": {"devices": devices, "layout": layout}})


def step_call(exp, dataset, steps: int) -> Guarded:
    """``steps`` training steps in one compiled chunk (the harness's own, sharded or not), the
    state carried from call to call."""
    from rbyz.sim import train

    t = train.task(exp, dataset=dataset)
    chunk = train.make_chunk(train.make_step(exp, t), steps, t)
    data, _ = train.arrays(t)
    state = [train.init_state(exp, t)]

    def run():
        state[0], metrics = chunk(state[0], data)
        return metrics

    return Guarded(run)


def step_rows(args: argparse.Namespace, devices: list[int]) -> list[dict]:
    """Rows of the full-training-step table : ms per step of the harness's defended
    step for each rule, n, device count and layout (one device: the stacked step), beside the
    floor, the gradients' FLOPs (``6 n b p`` for ``p`` parameters: forward and backward of a
    dense network) at the machine's float32 matmul rate measured in the same run."""
    from rbyz.sim import data as sim_data

    from training import matmul_rate

    steps = 5 if args.quick else 20
    dataset = sim_data.synthetic(dim=784, train=8192, test=256, seed=0)
    _, rate = matmul_rate(args.repeats)
    params = 784 * 100 + 100 + 100 * 10 + 10
    rows = []
    for n in args.n:
        floor = 6 * n * 32 * params / (rate * 1e9)
        for rule in STEP_RULES[::2] if args.quick else STEP_RULES:
            configs = [(1, "stacked")] + [(k, layout) for k in devices if k > 1 and n % k == 0
                                          for layout in args.layouts]
            calls = {}
            for k, layout in configs:
                exp = step_experiment(rule, n, k, "gather" if k == 1 else layout, steps)
                calls[(k, layout)] = step_call(exp, dataset, steps)
            times = timed(calls, args.repeats)
            base = times[(1, "stacked")][0]
            for (k, layout), (seconds, note) in times.items():
                per_step = None if seconds is None else seconds / steps
                rows.append({"n": n, "rule": rule, "devices": k, "layout": layout,
                             "ms/step": ms(per_step),
                             "steps/s": "-" if per_step is None else f"{1 / per_step:.0f}",
                             "x floor": ratio(per_step, floor),
                             "x stacked": ratio(seconds, base), "note": note})
            free()
    return rows


# ----------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line(args: argparse.Namespace) -> str:
    device = jax.devices()[0]
    limit, source = memory_limit(args)
    return (f"Device: {device.device_kind} ({jax.default_backend()}), {jax.device_count()} "
            f"devices, jax {jax.__version__}; memory {gb(limit)} ({source}); host CPU: "
            f"{cpu_model()}, {os.cpu_count()} cores")


def markdown(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """A github table of ``rows`` (missing cells empty), in ``columns`` order or the keys'."""
    columns = columns or tuple(dict.fromkeys(key for row in rows for key in row))
    return tabulate([[row.get(c, "") for c in columns] for row in rows], headers=columns,
                    tablefmt="github", intfmt=",")


def setup_byzfl(args: argparse.Namespace):
    """``((aggregators, preaggregators), torch device)`` or ``None``, and the header's note."""
    if not args.bandwidth:
        return None, "not timed (only the bandwidth table compares with ByzFL)"
    if args.no_byzfl:
        return None, "ByzFL skipped (--no-byzfl)"
    modules, note = load_byzfl()
    if modules is None:
        return None, note
    device, where = torch_device()
    if device is None:
        return None, where
    return (modules, device), f"{note}; {where}"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: n = 8, d = 1e4, devices {1, 2, 4}, "
        "2 repeats; the bandwidth table (with --bandwidth) at n in {10, 25}, d = 1e4")
    add("--n", type=int, nargs="+", help="workers of the devices table (16 32)")
    add("--d", type=float, nargs="+", help="dimensions of the devices table (CPU: 1e5 1e6; "
        "GPU: 1e6 1e7)")
    add("--devices", type=int, nargs="+", help="device counts (1 2 4 8 and all, up to those "
        "present)")
    add("--layouts", nargs="+", choices=["gather", "coordinates"],
        default=["gather", "coordinates"], help="collective layouts (both)")
    add("--no-devices", action="store_true", help="skip the devices table")
    add("--bandwidth", action="store_true", help="the bandwidth table on the CPU too")
    add("--bw-n", type=int, nargs="+", help="workers of the bandwidth table (10 25 100)")
    add("--bw-d", type=float, nargs="+", help="dimensions of the bandwidth table (GPU: 1e5 1e7 "
        "1e8; CPU: 1e5 1e6)")
    add("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
        help="dtypes of the bandwidth table (both)")
    add("--max-gb", type=float, help="device memory in GB to size against (default: "
        "memory_stats()'s limit, else 8); sizes over 40%% of it are skipped")
    add("--no-step", action="store_true", help="skip the full training step table")
    add("--repeats", type=int, help="timed rounds (5; --quick 2)")
    add("--no-byzfl", action="store_true", help="do not time ByzFL")
    add("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    args.devices_given = args.devices is not None
    args.devices = args.devices or ([1, 2, 4] if args.quick else [1, 2, 4, 8, "all"])
    return args


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the sizes left unset for the backend found, and keeps the device counts present
    (call after the JAX setup)."""
    gpu, quick = accelerator(), args.quick
    args.n = args.n or ([8] if quick else [16, 32])
    args.d = [int(d) for d in args.d or ([1e4] if quick else [1e6, 1e7] if gpu else [1e5, 1e6])]
    args.bw_n = args.bw_n or ([10, 25] if quick else [10, 25, 100])
    args.bw_d = [int(d) for d in args.bw_d or (
        [1e4] if quick else [1e5, 1e7, 1e8] if gpu else [1e5, 1e6])]
    args.repeats = args.repeats or (2 if quick else 5)
    present = jax.device_count()
    counts = {present if k == "all" else k for k in args.devices}
    args.missing = sorted(k for k in counts if k > present) if args.devices_given else []
    args.devices = sorted(k for k in counts if k <= present)
    return args


def probe_bytes(args: argparse.Namespace) -> float:
    """Size of the bandwidth probe: 4 GB on an accelerator, 256 MB on the CPU (32 MB quick), at
    most a fifth of the device memory."""
    size = 4e9 if accelerator() else 3.2e7 if args.quick else 2.56e8
    return min(size, memory_limit(args)[0] / 5)


def devices_section(args: argparse.Namespace) -> list[str]:
    print("(a) devices", flush=True)
    rows, notes = devices_rows(args)
    notes += [f"{k} devices skipped: {jax.device_count()} present" for k in args.missing]
    caption = (f"float32 [n, d], f = n // 5, median of {args.repeats} rounds. stacked: "
               "`transforms.aggregate(rule, f=f)` on one device; gather / coordinates: that "
               "transform with `axis_name=\"workers\", tiled=True, layout=...` under "
               f"`jax.shard_map` over the first `devices` of the {jax.device_count()} "
               f"{jax.default_backend()} devices"
               + (" (simulated, sharing the host's cores)." if not accelerator() else "."))
    return ["## Devices and layouts", "", caption, "", markdown(rows, DEVICES_COLUMNS), "",
            *[f"- {note}" for note in notes], ""]


def bandwidth_section(args: argparse.Namespace, byzfl) -> list[str]:
    print("(b) bandwidth", flush=True)
    bandwidth, how = measure_bandwidth(probe_bytes(args), args.repeats)
    print(f"  {how}", flush=True)
    rows = bandwidth_rows(args, byzfl, bandwidth)
    limit, source = memory_limit(args)
    caption = (f"One device, stacked, jitted `rbyz.aggregators.get(rule)(x, f=f)`; bytes read = "
               f"n d itemsize; % of the bandwidth {how}; median of {args.repeats} rounds; sizes "
               f"over {MEMORY_FRACTION:.0%} of {gb(limit)} ({source}) skipped. ByzFL's "
               "rules cast their input to float32 (the bfloat16 rows time that cast too).")
    return ["## Memory bandwidth", "", caption, "", markdown(rows, BANDWIDTH_COLUMNS), ""]


def step_section(args: argparse.Namespace) -> list[str]:
    print("(c) step", flush=True)
    rows = step_rows(args, args.devices)
    caption = ("The harness's defended step (`rbyz.sim.train.make_chunk`, 784-100-10 MLP, "
               "batch 32 per worker, worker momentum 0.9, ALIE (z = 1) from f = n // 5 workers, SGD), "
               "several steps per compiled `lax.scan`; one device: the stacked step; more: the "
               "same step under `jax.shard_map` (`parallel.devices`, `parallel.layout`). x "
               "floor: time over the gradients' FLOPs (6 n b p) at the float32 matmul rate "
               "measured in this run.")
    return ["## Full training step", "", caption, "", markdown(rows, STEP_COLUMNS), ""]


def main(argv=None) -> None:
    args = parse(argv)
    # Before any JAX op: simulated devices on the CPU (accelerator backends ignore it), and no
    # preallocation on a GPU, so that torch (ByzFL) can allocate beside JAX's growing pool.
    jax.config.update("jax_num_cpu_devices", max(k for k in args.devices if k != "all"))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = defaults(args)
    args.bandwidth = args.bandwidth or accelerator()
    byzfl, byzfl_note = setup_byzfl(args)
    header = ["# rbyz scaling benchmark", "", f"Machine: {machine()}", "", device_line(args), "",
              f"ByzFL: {byzfl_note}", ""]
    print("\n".join(header), flush=True)
    body = []
    if not args.no_devices:
        body += devices_section(args)
    if args.bandwidth:
        body += bandwidth_section(args, byzfl)
    if not args.no_step:
        body += step_section(args)
    print("\n".join(body))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            handle.write("\n".join(header + body))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
