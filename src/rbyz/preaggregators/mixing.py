"""Nearest-neighbour mixing (NNM): every row replaced by the mean of its nearest rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.preaggregators.clipping import per_row


def _neighbour_weights(updates, n: int, f: int) -> jax.Array:
    """``[n, n]`` mixing matrix in the accumulation dtype: ``1/(n-f)`` where ``j`` is among
    ``i``'s ``n - f`` nearest rows."""
    sq_dist = reductions.pairwise_sq_distances(updates)
    # Every row is its own nearest neighbour, even when another row is identical to it.
    sq_dist = jnp.where(jnp.eye(n, dtype=bool), -1.0, sq_dist)
    rank = jnp.argsort(jnp.argsort(sq_dist, axis=1, stable=True), axis=1)
    acc = reductions.accumulation_dtype(updates)
    return jnp.where(rank < n - f, 1.0 / (n - f), 0.0).astype(acc)


@_spec.declare(
    "preaggregator", constraint=_spec.MINORITY, coordinate_slices=True, cost="O(n^2 d)",
    reference=_spec.Reference(
        "Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan",
        "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", "AISTATS",
        2023))
def nnm(updates, *, f: int):
    """Nearest-neighbour mixing: replaces each row by the mean of its ``n - f`` nearest rows.

    ``y_i = (1 / (n - f)) sum_{j in N_i} x_j``, where ``N_i`` holds the ``n - f`` rows closest to
    ``x_i`` in l2 distance over the whole update (all leaves), ``x_i`` itself included; ties are
    broken by the lower worker index. Distances come from ``rbyz._src.reductions`` (accurate,
    centred Gram, in the input's precision); each leaf is then mixed by the ``[n, n]`` neighbour
    matrix. Needs ``0 <= f < n``. Follow it by any robust aggregator on the ``n`` mixed rows.

    Hostile rows: a row with NaN/Inf values, or with a norm that overflows its accumulation dtype,
    is at infinite distance from every other row, so with at most ``f`` such rows no other row
    mixes it in. A row whose neighbourhood does contain a NaN/Inf row (only a hostile row's own
    mix, or any row if more than ``f`` rows are hostile) is returned as all NaN, which every
    robust aggregator ranks last.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: the number of Byzantine workers (Python int, ``0 <= f < n``).

    Returns:
      A stacked pytree with the structure, shapes and dtypes of ``updates`` (``n`` mixed rows).

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import preaggregators
      >>> x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
      >>> preaggregators.nnm(x, f=1).tolist()
      [[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]]

    References:
      Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, `Fixing by Mixing: A Recipe for
      Optimal Byzantine ML under Heterogeneity`, AISTATS 2023.
    """
    n = tree_util.num_workers(updates, "nnm")
    f = checks.byzantine_count(f, n, "nnm", "0 <= f < n", lambda n, f: f < n)
    weights = _neighbour_weights(updates, n, f)
    finite = reductions.finite_rows(updates)
    poisoned = jnp.any((weights > 0) & ~finite[None, :], axis=1)

    def mix(leaf):
        acc = tree_util.accumulation_dtype(leaf.dtype)
        flat = leaf.reshape(n, -1).astype(acc)
        mixing = weights.astype(acc)

        def combine(rows):
            return jnp.matmul(mixing, rows, precision=jax.lax.Precision.HIGHEST)

        def combine_sanitized():
            # A weight of 0 times NaN/Inf is still NaN: zero the non-finite values first. This
            # costs a pass over memory, so it only runs when some row is non-finite.
            return combine(jnp.where(jnp.isfinite(flat), flat, 0))

        mixed = jax.lax.cond(jnp.all(finite), lambda: combine(flat), combine_sanitized)
        mixed = jnp.where(per_row(poisoned, 2), jnp.nan, mixed)
        return mixed.reshape(leaf.shape).astype(leaf.dtype)

    return jax.tree.map(mix, updates)
