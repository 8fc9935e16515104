"""Subset rules: average the rows of a subset chosen as a whole, MDA and DnC.

:func:`mda` searches every subset of ``n - f`` rows for the one of least diameter (on the
whole-update distance matrix of ``rbyz._src.reductions``); :func:`dnc` removes the rows that
project farthest on the top singular direction of random coordinate subsamples. Both return the
mean of the rows they keep, so a row they leave out never reaches the output.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection

# Above this many candidate subsets, MDA's exhaustive search is refused (compile time and memory).
MDA_MAX_SUBSETS = 250_000


# ------------------------------------------------------------------------------------------------
# Minimum-Diameter Averaging.


@functools.cache
def _removal_sets(n: int, f: int) -> np.ndarray:
    """``[C(n, f), f]`` int32: every set of ``f`` rows to leave out, in lexicographic order."""
    return np.array(list(itertools.combinations(range(n), f)), np.int32).reshape(math.comb(n, f), f)


def _subset_spreads(dist: jax.Array, kept: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``([C], [C])``: the largest entry and the sum of the entries of ``dist`` between rows kept
    by each mask of ``kept``."""
    n = dist.shape[0]

    def spread(mask):
        inside = jnp.where(mask[:, None] & mask[None, :], dist, 0.0)
        return jnp.max(inside), jnp.sum(inside)

    # About 4M distance entries per batch bounds the temporary memory.
    return jax.lax.map(spread, kept, batch_size=max(1, (1 << 22) // (n * n)))


@_spec.declare(
    "aggregator", reports=True, coordinate_slices=True, constraint=_spec.MAJORITY,
    cost="O(C(n,f) n^2 + n^2 d)",
    reference=(
        _spec.Reference("El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault",
                        "Genuinely Distributed Byzantine Machine Learning", "PODC", 2020),
        _spec.Reference("Rousseeuw", "Multivariate Estimation with High Breakdown Point",
                        "Mathematical Statistics and Applications", 1985),
    ),
)
def mda(updates, *, f: int, report: bool = False):
    """Minimum-Diameter Averaging: the mean of the ``n - f`` rows with the smallest diameter.

    ``agg = (1/(n-f)) sum_{i in S*} g_i`` with
    ``S* = argmin_{|S| = n-f} max_{i, j in S} ||g_i - g_j||``, searched exhaustively over the
    ``C(n, f)`` subsets (``MDA_MAX_SUBSETS`` at most: about ``n = 25, f = 5`` or
    ``n = 51, f = 4``; Multi-Krum is the quadratic-time relative). Equal diameters are common
    (subsets that share their farthest pair): they go to the subset with the smaller sum of
    squared distances, so that the workers' order does not decide. Needs ``n > 2f``. Rows
    holding NaN/Inf are at infinite distance from the others, so with at most ``f`` of them the
    chosen subset is finite; in general its diameter is at most the honest rows' (they form a
    candidate) and it holds at least ``n - 2f >= 1`` honest rows, so every row it averages lies
    within the honest diameter of an honest row.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``, with ``C(n, f) <= MDA_MAX_SUBSETS``.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [5.0, 5.0], [9.0, -9.0]])
      >>> mda(g, f=2)
      Array([0.06666667, 0.06666667], dtype=float32)

    References:
      El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault, `Genuinely Distributed Byzantine Machine
      Learning`, PODC 2020; Rousseeuw, `Multivariate Estimation with High Breakdown Point`,
      Mathematical Statistics and Applications, 1985 (the minimum-volume idea).
    """
    n, f = _common.workers_and_f(updates, f, mda.spec)
    subsets = math.comb(n, f)
    checks.require(
        subsets <= MDA_MAX_SUBSETS,
        "mda",
        f"searches all C(n, f) subsets; got n={n}, f={f}: C(n, f) = {subsets} > "
        f"{MDA_MAX_SUBSETS}. Assume fewer Byzantine workers, or use multi_krum, which selects "
        "n - f rows in O(n^2).",
    )
    removed = jnp.asarray(_removal_sets(n, f))
    kept = ~jnp.any(removed[:, :, None] == jnp.arange(n, dtype=removed.dtype)[None, None, :],
                    axis=1)  # [C, n]
    diameters, totals = _subset_spreads(reductions.pairwise_sq_distances(updates), kept)
    best = jnp.lexsort((totals, diameters))[0]
    weights = kept[best].astype(jnp.float32)
    return _selection.returning(
        _common.cast_like(_common.weighted_mean(updates, weights, n - f), updates), report, weights)


# ------------------------------------------------------------------------------------------------
# Divide-and-Conquer.


def _sampled_columns(updates, key: jax.Array, count: int) -> jax.Array:
    """``[n, count]``: the same ``count`` coordinates of every worker's whole update, drawn
    uniformly (with replacement) over all leaves, in the tree's accumulation dtype; every
    coordinate when there are at most ``count``."""
    dtype = reductions.accumulation_dtype(updates)
    flat = [leaf.reshape(leaf.shape[0], math.prod(leaf.shape[1:]))
            for leaf in jax.tree.leaves(updates)]
    flat = [x for x in flat if x.shape[1]]  # an empty leaf holds no coordinate to draw
    total = sum(x.shape[1] for x in flat)
    if total <= count:
        return jnp.concatenate([x.astype(dtype) for x in flat], axis=1)
    picks = jax.random.randint(key, (count,), 0, total)
    columns, start = jnp.zeros((flat[0].shape[0], count), dtype), 0
    for x in flat:  # each pick lands in exactly one leaf
        inside = (picks >= start) & (picks < start + x.shape[1])
        local = jnp.clip(picks - start, 0, x.shape[1] - 1)
        columns = columns + jnp.where(inside, x[:, local].astype(dtype), 0.0)
        start += x.shape[1]
    return columns


def _dnc_kept(sample: jax.Array, finite: jax.Array, removed: int) -> jax.Array:
    """``[n]`` bool: the rows whose squared projection on the top singular vector of the centred
    ``sample`` is among the ``n - removed`` smallest; non-finite rows score ``+inf``."""
    n = sample.shape[0]
    rows = jnp.where(finite[:, None], sample, 0.0)
    # The singular vector and the order of the scores do not depend on the scale. Scaling by a
    # power of two (exact) so that every value is below 1 keeps the mean and the centred rows
    # from overflowing when rows hold values near the largest float.
    _, exponent = jnp.frexp(jnp.max(jnp.abs(rows)))
    rows = jnp.ldexp(rows, -exponent)
    count = jnp.maximum(jnp.sum(finite.astype(rows.dtype)), 1.0)
    centred = jnp.where(finite[:, None], rows - (jnp.sum(rows, axis=0) / count)[None, :], 0.0)
    top = jnp.linalg.svd(centred, full_matrices=False)[2][0]
    scores = jnp.where(finite, jnp.square(centred @ top), jnp.inf)
    order = jnp.argsort(scores, stable=True)
    return jnp.zeros((n,), bool).at[order[: n - removed]].set(True)


@_spec.declare(
    "aggregator", reports=True, key=True, coordinate_slices=False, constraint=_spec.MAJORITY,
    cost="O(L n^2 b + n d)",
    reference=_spec.Reference(
        "Shejwalkar, Houmansadr",
        "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for "
        "Federated Learning", "NDSS", 2021),
    note="sub_dim=10000, iterations=5, filter_frac=1.0 follow Blades' implementation "
         "(lishenghui/blades); when no row survives every subsample, the first subsample's rows "
         "are kept, a case the paper leaves open.",
)
def dnc(updates, *, f: int, key=None, sub_dim: int = 10_000, iterations: int = 5,
        filter_frac: float = 1.0, report: bool = False):
    """Divide-and-Conquer: filter outliers along the top singular direction of random subsamples.

    ``iterations`` times: draw ``sub_dim`` coordinates ``r`` at random, centre the rows' values
    on them at their mean, take the top right singular vector ``v`` of the centred ``[n, b]``
    matrix, score ``s_i = <x_i[r] - mu, v>^2``, keep the ``n - floor(filter_frac f)`` rows with
    the smallest scores. The output is the mean of the rows kept in every iteration (of those
    kept in the first, if no row survives them all, which the paper leaves open). Needs
    ``n > 2f``; rows holding NaN/Inf score ``+inf`` (removed first) and are left out of the mean
    ``mu``. Coordinates are drawn uniformly over all leaves, with replacement (for
    ``sub_dim << d`` duplicates are rare); with ``d <= sub_dim`` all coordinates are used.

    Defaults follow Blades' implementation (``sub_dim=10000``, ``iterations=5``,
    ``filter_frac=1.0``). Not available with ``layout="coordinates"``: the subsample spans every
    coordinate.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``.
      key: int seed or JAX key for the coordinate subsamples (required).
      sub_dim: coordinates per subsample ``b >= 1``.
      iterations: subsamples drawn, ``>= 1``.
      filter_frac: ``c``, rows removed per iteration ``floor(c f)``, with ``0 <= c f < n``.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [1.2, 0.2], [0.8, -0.2], [1.0, 0.1], [-9.0, 9.0]])
      >>> dnc(g, f=1, key=jax.random.key(0))
      Array([1.   , 0.025], dtype=float32)

    References:
      Shejwalkar, Houmansadr, `Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
      Defenses for Federated Learning`, NDSS 2021.
    """
    n, f = _common.workers_and_f(updates, f, dnc.spec)
    sub_dim = checks.static_int(sub_dim, "dnc", "sub_dim", minimum=1)
    iterations = checks.static_int(iterations, "dnc", "iterations", minimum=1)
    removed = math.floor(filter_frac * f)
    checks.require(
        0 <= filter_frac and removed < n,
        "dnc",
        f"needs 0 <= floor(filter_frac f) < n; got filter_frac={filter_frac}, f={f}, n={n}.",
    )
    key = checks.as_key(key, "dnc")
    total = sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(updates))
    if total == 0:  # nothing to filter on: every leaf is empty, and so is the mean
        out = jax.tree.map(tree_util.mean_rows, updates)
        return _selection.returning(out, report, jnp.ones((n,)))
    finite = reductions.finite_rows(updates)
    kept_each = [
        _dnc_kept(_sampled_columns(updates, jax.random.fold_in(key, step), sub_dim), finite,
                  removed)
        for step in range(iterations)
    ]
    kept = functools.reduce(jnp.logical_and, kept_each)
    # Different subsamples may remove every row between them: keep the first one's rows then.
    weights = jnp.where(jnp.any(kept), kept, kept_each[0]).astype(jnp.float32)
    out = _common.weighted_mean(updates, weights, jnp.sum(weights))
    return _selection.returning(_common.cast_like(out, updates), report, weights)
