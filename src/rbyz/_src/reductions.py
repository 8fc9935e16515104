"""Every reduction over coordinates that may complete across devices, in one place.

A rule that reduces over the coordinates of a whole update (a norm, a distance, a finiteness
test) does it here, never by hand, so that it also runs on a slice of the coordinates: in
collective mode with ``layout="coordinates"`` each shard of the worker axis holds every worker's
values on its own ``1/S`` of the coordinates, computes the *partial* reduction on its slice and
passes it through :func:`total` (or :func:`all_true`), which ``psum``s it over the axis while
:func:`sharded` is active. Every shard then sees the same whole-update numbers, makes the same
selection or weighting, and applies it to its slice. A coordinate-wise rule needs none of this.

The axis is set at trace time, like ``jax.default_matmul_precision``: a rule traced inside
``with sharded("workers"):`` sums over that axis. Only ``rbyz.transforms.aggregate`` sets it.

Precision: norms and distances are accumulated in :func:`accumulation_dtype` of the whole tree,
float32 for 16- and 32-bit leaves and float64 as soon as one leaf is float64 (with
``jax_enable_x64``), so a float64 update keeps float64 precision end to end and a float64 row is
only hostile when its values or its norm are non-finite in float64.

Example:
  >>> import jax.numpy as jnp
  >>> from rbyz._src import reductions
  >>> tree = {"a": jnp.array([[3.0], [0.0]]), "b": jnp.array([[4.0, 0.0], [1.0, jnp.inf]])}
  >>> reductions.row_sq_norms(tree)
  Array([25., inf], dtype=float32)
  >>> reductions.finite_rows(tree)
  Array([ True, False], dtype=bool)
  >>> reductions.pairwise_sq_distances({"a": jnp.array([[0.0, 0.0], [3.0, 4.0]])})
  Array([[ 0., 25.],
         [25.,  0.]], dtype=float32)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp

from rbyz._src import distances

_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("rbyz_coordinate_axis",
                                                                   default=None)


# ------------------------------------------------------------------------------------------------
# Completing a partial reduction over the coordinate slices.


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


# ------------------------------------------------------------------------------------------------
# Whole-update reductions of a stacked pytree (every leaf [n, ...]).


def accumulation_dtype(tree) -> jnp.dtype:
    """The dtype whole-update sums of ``tree`` are accumulated in: float64 if any leaf is
    float64, else float32 (16-bit leaves lose digits in their own sums)."""
    wide = any(jnp.result_type(leaf) == jnp.float64 for leaf in jax.tree.leaves(tree))
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _matrix(leaf: jax.Array, dtype) -> jax.Array:
    """``[n, size]`` rows of one leaf in ``dtype`` (also for empty leaves, where ``-1`` is
    ambiguous)."""
    return leaf.reshape(leaf.shape[0], math.prod(leaf.shape[1:])).astype(dtype)


def _per_leaf_total(per_leaf) -> jax.Array:
    """The sum over leaves of per-leaf ``[n]`` partial sums, completed over the slices."""
    return total(functools.reduce(jnp.add, per_leaf))


def finite_rows(tree) -> jax.Array:
    """``[n]`` bool: whether every value of worker ``i``'s update, over all leaves, is finite."""
    flags = [jnp.all(jnp.isfinite(_matrix(leaf, leaf.dtype)), axis=1)
             for leaf in jax.tree.leaves(tree)]
    return all_true(functools.reduce(jnp.logical_and, flags))


def row_sq_norms(tree) -> jax.Array:
    """``[n]``: squared Euclidean norm of each worker's whole update (all leaves), in
    :func:`accumulation_dtype`."""
    dtype = accumulation_dtype(tree)
    return _per_leaf_total(jnp.sum(jnp.square(_matrix(leaf, dtype)), axis=1)
                           for leaf in jax.tree.leaves(tree))


def sq_distances_to(tree, point) -> jax.Array:
    """``[n]``: squared distance of each worker's whole update to ``point``, in
    :func:`accumulation_dtype` of ``tree``.

    One read of the data; a row holding NaN gives NaN (callers mask it with its finiteness).

    Args:
      tree: a stacked pytree (every leaf ``[n, ...]``).
      point: a pytree like one worker's update.
    """
    dtype = accumulation_dtype(tree)

    def leaf_sq_distances(leaf, center):
        rows = _matrix(leaf, dtype)
        return jnp.sum(jnp.square(rows - center.reshape(1, rows.shape[1]).astype(dtype)), axis=1)

    return _per_leaf_total(jax.tree.leaves(jax.tree.map(leaf_sq_distances, tree, point)))


def pairwise_sq_distances(tree) -> jax.Array:
    """``[n, n]`` squared distances between the workers' whole updates, in
    :func:`accumulation_dtype`.

    The per-leaf centred Gram matrices (:func:`rbyz._src.distances.leaf_gram`) are summed over
    the leaves and the slices, then ``D[i, j] = G[i, i] + G[j, j] - 2 G[i, j]``.

    Args:
      tree: a stacked pytree (every leaf ``[n, ...]``).

    Returns:
      A symmetric matrix with a zero diagonal; ``+inf`` between a hostile row (non-finite values,
      or a norm that overflows the accumulation dtype) and any other row.
    """
    dtype = accumulation_dtype(tree)
    gram = total(functools.reduce(
        jnp.add, (distances.leaf_gram(leaf, dtype) for leaf in jax.tree.leaves(tree))))
    norms = jnp.diagonal(gram)
    ok = jnp.isfinite(norms)
    # Symmetrised: the product need not round G[i, j] and G[j, i] alike, and an asymmetry would
    # let the workers' order break ties in selection rules.
    gram = (gram + gram.T) / 2
    dist = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
    dist = jnp.where(ok[:, None] & ok[None, :], dist, jnp.inf)
    return jnp.where(jnp.eye(gram.shape[0], dtype=bool), 0.0, dist)
