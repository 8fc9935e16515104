"""One process of ``test_multiprocess.py``: collective aggregation across processes.

Run as ``python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_PREFIX``. Each process
joins ``jax.distributed`` on 127.0.0.1 with 2 CPU devices (gloo collectives), the workers axis
spans every process's devices, and every transform's aggregate is saved to
``OUT_PREFIX.<process_id>.npz`` for the test to compare with stacked mode.
"""

from __future__ import annotations

import sys

LOCAL_DEVICES = 2
N, D = 8, 37


def updates():
    """The stacked updates every process agrees on: 8 workers, one hostile row."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    x[5] = 1e30
    return x


def transforms_to_check():
    from rbyz import transforms

    def make(rule, **kw):
        return lambda **mode: transforms.aggregate(rule, **kw, **mode)

    return {
        "median": make("median", f=1),
        "trimmed_mean": make("trimmed_mean", f=1),
        "krum": make("krum", f=1),
        "geometric_median": make("geometric_median", f=1),
        "centered_clipping": make("centered_clipping", f=1, tau=0.5),
    }


def main(port: int, process_id: int, num_processes: int, out_prefix: str) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                               initialization_timeout=120)
    import jax.numpy as jnp
    import numpy as np
    from jax import P
    from jax.sharding import NamedSharding

    from rbyz import distributed

    assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()
    mesh = distributed.worker_mesh()
    x = updates()
    sharded = jax.make_array_from_callback((N, D), NamedSharding(mesh, P("workers")),
                                           lambda index: x[index])
    results = {}
    for name, make in transforms_to_check().items():
        for layout in ("gather", "coordinates"):
            tx = make(axis_name="workers", tiled=True, layout=layout)
            step = jax.jit(jax.shard_map(lambda u, s, tx=tx: tx.update(u, s)[0], mesh=mesh,
                                         in_specs=(P("workers"), P()), out_specs=P()))
            out = step(sharded, tx.init(jnp.zeros(D, jnp.float32)))
            results[f"{name}/{layout}"] = np.asarray(out.addressable_data(0))
    np.savez(f"{out_prefix}.{process_id}.npz", **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
