"""Collective mode: the "gather" layout against the "coordinates" layout, same run.

In collective mode (``rbyz.transforms.aggregate(..., axis_name="workers")`` inside
``jax.shard_map``), the ``"gather"`` layout all-gathers every worker's update onto every device
and each device computes the whole aggregate: ``n d`` values per device, the same work ``S``
times. The ``"coordinates"`` layout all-to-alls so that each of the ``S`` devices holds every
worker's values on ``1/S`` of the coordinates, aggregates them (distance-based rules ``psum``
their ``[n, n]`` or ``[n]`` partial sums), and all-gathers the ``d``-long result: ``n d / S``
values per device.

On the CPU the devices are simulated (``--devices``, default 8) and share the machine's cores, so
the gather layout pays its ``S``-fold redundant work in wall time; on real accelerators the gain
is per-device compute and memory. Times: median over ``--repeats`` rounds after a warm-up, each
round timing both layouts once (``block_until_ready``), on one jitted ``tx.update`` of
float32 updates ``[n, d]`` sharded over the workers axis (``tiled``: ``n / S`` workers per
device).

Usage: ``python benchmarks/collective.py [--devices 8] [--n 16] [--d 1e5 1e6] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (8)")
    parser.add_argument("--n", type=int, default=16, help="workers, a multiple of --devices (16)")
    parser.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6], help="dimensions")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (7)")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    jax.config.update("jax_num_cpu_devices", args.devices)  # CPU only; before any JAX op

    import jax.numpy as jnp
    from jax import P
    from tabulate import tabulate

    from rbyz import distributed, transforms

    devices = min(args.devices, jax.device_count())
    if args.n % devices:
        raise SystemExit(f"--n {args.n} must be a multiple of the {devices} devices")
    mesh = distributed.worker_mesh(devices)
    f = args.n // 5
    rules = {
        "median": dict(rule="median", f=f),
        "trimmed_mean": dict(rule="trimmed_mean", f=f),
        "meamed": dict(rule="meamed", f=f),
        "sign_majority": dict(rule="sign_majority"),
        "krum": dict(rule="krum", f=f),
        "multi_krum": dict(rule="multi_krum", f=f),
        "geometric_median": dict(rule="geometric_median", f=f),
        "centered_clipping": dict(rule="centered_clipping", f=f),
    }

    def step_for(layout: str, hparams: dict, d: int):
        tx = transforms.aggregate(axis_name="workers", tiled=True, layout=layout, **hparams)
        update = jax.shard_map(lambda u, s: tx.update(u, s)[0], mesh=mesh,
                               in_specs=(P("workers"), P()), out_specs=P())
        return jax.jit(update), tx.init(jnp.zeros(d, jnp.float32))

    def once(fn, *a):
        start = time.perf_counter()
        jax.block_until_ready(fn(*a))
        return time.perf_counter() - start

    rows = []
    for d in (int(d) for d in args.d):
        x = distributed.shard_workers(
            jax.random.normal(jax.random.key(d), (args.n, d), jnp.float32), mesh)
        for name, hparams in rules.items():
            steps = {layout: step_for(layout, hparams, d) for layout in ("gather", "coordinates")}
            times = {layout: [] for layout in steps}
            for layout, (fn, state) in steps.items():
                once(fn, x, state)  # compile
            for _ in range(args.repeats):
                for layout, (fn, state) in steps.items():
                    times[layout].append(once(fn, x, state))
            gather, coords = (statistics.median(times[k]) for k in ("gather", "coordinates"))
            rows.append((args.n, d, name, round(gather * 1e3, 2), round(coords * 1e3, 2),
                         round(gather / coords, 1)))
            print(f"  n={args.n} d={d:.0e} {name:<18} gather {gather * 1e3:8.2f} ms  "
                  f"coordinates {coords * 1e3:8.2f} ms", flush=True)

    print()
    print(f"Machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} devices "
          f"({devices} used), jax {jax.__version__}, Python {platform.python_version()}.")
    print()
    print(tabulate(rows, headers=["n", "d", "rule", "gather ms", "coordinates ms",
                                  "gather/coordinates"], tablefmt="github"))


if __name__ == "__main__":
    main()
