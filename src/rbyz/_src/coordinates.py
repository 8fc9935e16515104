"""Rules run on a slice of the coordinates: reductions over coordinates are completed over an axis.

In collective mode with ``layout="coordinates"`` each shard of the worker axis holds every
worker's values on its own ``1/S`` of the coordinates. A coordinate-wise rule needs nothing more.
A rule that also reduces over coordinates (a norm, a distance, a finiteness test of a whole
update) computes a *partial* reduction on its slice; the kernels that do so (``tree.row_sq_norms``,
``tree.finite_rows``, ``distances.pairwise_sq_distances``, the distances to a point of
geometric median and centered clipping) pass it through :func:`total`, which ``psum``s it over
the axis while :func:`sharded` is active. Every shard then sees the same whole-update numbers,
makes the same selection or weighting, and applies it to its slice.

The axis is set at trace time, like ``jax.default_matmul_precision``: a rule traced inside
``with sharded("workers"):`` sums over that axis. Only ``rbyz.transforms.aggregate`` sets it.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("rbyz_coordinate_axis",
                                                                   default=None)


@contextlib.contextmanager
def sharded(axis_name: str):
    """Within this block, rules see one slice of the coordinates, split over ``axis_name``."""
    token = _AXIS.set(axis_name)
    try:
        yield
    finally:
        _AXIS.reset(token)


def total(partial: jax.Array) -> jax.Array:
    """A sum over coordinates, completed over the slices (the identity when not sharded)."""
    axis_name = _AXIS.get()
    return partial if axis_name is None else jax.lax.psum(partial, axis_name)


def all_true(partial: jax.Array) -> jax.Array:
    """A logical ``all`` over coordinates, completed over the slices."""
    axis_name = _AXIS.get()
    if axis_name is None:
        return partial
    return jax.lax.psum(jnp.logical_not(partial).astype(jnp.int32), axis_name) == 0
