"""Where the workers run: one device simulating all of them, or spread over a mesh of devices.

A :class:`Placement` says how many devices the ``n`` simulated workers are spread over (``n / D``
per device, the same number of data units per device) and how their updates meet for the
aggregation (``layout``: ``"gather"`` or ``"coordinates"``, :func:`rbyz.transforms.aggregate`).
On one device the training step is the stacked step; on ``D > 1`` the same step runs under
``jax.shard_map`` over a one-axis mesh named ``"workers"``, each device computing its own
workers' gradients, keeping their momenta, and the transforms in collective mode (``tiled``)
gathering or scattering what the rule needs. Every random draw is the single-device one (the
batches of all workers are drawn from the same key on every device, each device keeps its own
rows), so both give the same numbers, up to float rounding in the order of some sums.

The mesh may span processes (``jax.distributed``; ``rbyz run --processes N``): each process
loads the same dataset and index sets (replicated, as in data-parallel training) and each device
reads only its own workers' batches from them.

Example:
  >>> from rbyz.sim import config
  >>> exp = config.from_dict({"workers": {"n": 8, "f": 1}, "parallel": {"devices": 4}})
  >>> where = placement(exp, units=8)
  >>> where.devices, where.per_device(8), sorted(where.collective())
  (4, 2, ['axis_name', 'tiled'])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.sharding import Mesh

from rbyz import distributed
from rbyz.sim.config import Experiment

WORKERS = distributed.WORKERS
LAYOUTS = ("gather", "coordinates")


def _fail(field: str, message: str):
    raise ValueError(f"config: {field}: {message}")


class Placement(NamedTuple):
    """``devices`` over which the workers are spread (``1``: the stacked step) and the
    ``layout`` of the aggregation; the few operations in which the two steps differ."""

    devices: int = 1
    layout: str = "gather"

    @property
    def sharded(self) -> bool:
        """Whether the step runs under ``shard_map`` (more than one device)."""
        return self.devices > 1

    def collective(self) -> dict:
        """The keywords that put a stacked transform in collective mode (tiled: each device
        holds a stack of its own workers); none on one device."""
        return {"axis_name": WORKERS, "tiled": True} if self.sharded else {}

    def aggregation(self) -> dict:
        """:meth:`collective` and the ``layout``, for the aggregating transforms."""
        return {**self.collective(), "layout": self.layout} if self.sharded else {}

    def per_device(self, count: int) -> int:
        """How many of ``count`` rows (workers, partitions) each device holds."""
        return count // self.devices

    def own(self, rows: jax.Array) -> jax.Array:
        """This device's rows of an array over every unit (all rows on one device)."""
        if not self.sharded:
            return rows
        size = rows.shape[0] // self.devices
        return jax.lax.dynamic_slice_in_dim(rows, jax.lax.axis_index(WORKERS) * size, size)

    def total(self, x: jax.Array) -> jax.Array:
        """The sum of ``x`` over the devices (``x`` itself on one device)."""
        return jax.lax.psum(x, WORKERS) if self.sharded else x

    def local(self, params):
        """The params as this device's own value, so that ``jax.grad`` at them returns the
        device's own gradients, not their sum over the devices (``DESIGN.md`` §2)."""
        if not self.sharded:
            return params
        return jax.tree.map(lambda p: jax.lax.pcast(p, WORKERS, to="varying"), params)

    def mesh(self) -> Mesh:
        """The ``workers`` mesh over the first ``devices`` devices."""
        return distributed.worker_mesh(self.devices)


STACKED = Placement()


def placement(exp: Experiment, units: int) -> Placement:
    """The placement of ``exp``'s ``parallel`` section, checked against the devices present and
    the ``units`` rows of gradients a step computes (workers, or Election Coding's partitions).

    Raises:
      ValueError: more devices than present, ``units`` not a multiple of the devices, an unknown
        layout, or a setting that runs on one device only (naming the field and the fix).
    """
    par = exp.parallel
    if par.layout not in LAYOUTS:
        _fail("parallel.layout", f"must be 'gather' or 'coordinates'; got {par.layout!r}.")
    if par.devices < 0:
        _fail("parallel.devices", f"must be >= 1, or 0 for every device; got {par.devices}.")
    present = jax.device_count()
    devices = par.devices or present
    if devices > present:
        _fail("parallel.devices", f"{devices} devices asked, {present} present. On a CPU, "
                                  f"`rbyz run --cpu-devices {devices}` (or jax.config.update("
                                  f"'jax_num_cpu_devices', {devices}) before any JAX operation) "
                                  f"simulates more; `rbyz run --processes N` adds processes.")
    if jax.process_count() > 1 and devices != present:
        _fail("parallel.devices", f"a run across {jax.process_count()} processes spreads the "
                                  f"workers over all {present} devices; set devices = 0 (or "
                                  f"{present}); got {devices}.")
    if devices == 1:
        return Placement(1, par.layout)
    if units % devices:
        what = "workers.n" if units == exp.workers.n else "the number of partitions"
        _fail("parallel.devices", f"each device holds the same number of workers, but {what} = "
                                  f"{units} is not a multiple of devices = {devices}; choose a "
                                  f"number of devices that divides {units}, or {what} a "
                                  f"multiple of {devices}.")
    if exp.diagnostics.enabled:
        _fail("diagnostics.enabled", f"the diagnostics look inside the stacked step and run on "
                                     f"one device; set parallel.devices = 1 (got {devices}) or "
                                     f"diagnostics.enabled = false.")
    return Placement(devices, par.layout)


__all__ = ("LAYOUTS", "STACKED", "WORKERS", "Placement", "placement")
