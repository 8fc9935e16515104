"""Robust aggregators: pure functions from stacked worker updates to one update.

Every rule has the signature ``agg(updates, *, f=..., **hparams) -> pytree``. ``updates`` is a
stacked pytree (every leaf ``[n, ...]``, worker axis first); the result has the same structure
without the worker axis and the dtype of each input leaf (16-bit floats are accumulated in
float32). ``n`` comes from the shapes and ``f`` (the number of Byzantine workers assumed) is a
keyword Python int, so every rule can be called uniformly, e.g. through :func:`get`. Invalid
settings raise ``ValueError`` at trace time, before any compute.

Hostile input: up to ``f`` rows may hold NaN, +Inf, -Inf or huge values. Coordinate-wise rules
treat NaN as +Inf (it sorts last); distance-based rules put a non-finite row (or one whose
distance overflows float32) at infinite distance from every other row; weighting rules give it
weight 0. Only :func:`mean` propagates them.

Coordinate-wise rules work leaf by leaf; distance-based rules sum per-leaf partial distances,
then select or weight rows leaf by leaf: the model is never ravelled into one vector.

Example:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> from rbyz import aggregators
  >>> updates = {"w": jnp.array([[1.0, 2.0], [1.5, 2.5], [1e30, -1e30]])}
  >>> aggregators.get("median")(updates, f=1)["w"]
  Array([1.5, 2. ], dtype=float32)
  >>> jax.jit(aggregators.trimmed_mean, static_argnames="f")(updates, f=1)["w"]
  Array([1.5, 2. ], dtype=float32)
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import coordinates
from rbyz._src import distances
from rbyz._src import order_stats
from rbyz._src import registry
from rbyz._src import tree as tree_util

__all__ = (
    "bulyan",
    "centered_clipping",
    "dnc",
    "geometric_median",
    "get",
    "krum",
    "mda",
    "mean",
    "meamed",
    "median",
    "multi_krum",
    "names",
    "sign_majority",
    "supports_coordinate_layout",
    "trimmed_mean",
)

_REGISTRY = registry.Registry("aggregator")
_register = _REGISTRY.register()

EVEN_MEDIANS = ("midpoint", "lower", "upper")
GEOMETRIC_MEDIAN_INITS = ("median", "mean", "zero")
ZERO_SIGNS = (0, 1)


# ------------------------------------------------------------------------------------------------
# Validation and small tree helpers.


def _majority_setup(updates, f, rule: str) -> tuple[int, int]:
    """``(n, f)`` for a rule whose guarantee needs an honest majority, ``n > 2f``."""
    n = tree_util.num_workers(updates, rule)
    return n, checks.byzantine_count(f, n, rule, "n > 2f", lambda n, f: n > 2 * f)


def _count_in_range(value, rule: str, name: str, low: int, high: int, why: str) -> int:
    """``value`` as a static int in ``[low, high]``, else ``ValueError`` naming the rule."""
    value = checks.static_int(value, rule, name)
    checks.require(
        low <= value <= high,
        rule,
        f"needs {low} <= {name} <= {high} ({why}); got {name}={value}.",
    )
    return value


def _check_positive(value, rule: str, name: str) -> None:
    """Rejects a concrete ``value <= 0``; a traced value cannot be checked and is let through."""
    try:
        concrete = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    checks.require(concrete > 0, rule, f"needs {name} > 0; got {name}={value!r}.")


def _check_choice(value, rule: str, name: str, choices: tuple) -> None:
    checks.require(
        value in choices,
        rule,
        f"unknown {name}={value!r}; choose one of {', '.join(map(repr, choices))}.",
    )


def _cast_like(result, updates):
    """Casts every leaf of ``result`` to the dtype of the matching leaf of ``updates``."""
    return jax.tree.map(lambda out, leaf: out.astype(leaf.dtype), result, updates)


def _sq_distances_to(updates, point) -> jax.Array:
    """``[n]`` float32: squared distance of each worker's whole update to ``point``.

    One read of the data; rows holding NaN give NaN (callers mask them with their finiteness).
    """

    def leaf_sq_distances(leaf, center):
        rows = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
        return jnp.sum(jnp.square(rows - center.reshape(1, -1).astype(jnp.float32)), axis=1)

    per_leaf = jax.tree.leaves(jax.tree.map(leaf_sq_distances, updates, point))
    return coordinates.total(sum(per_leaf))


def _weighted_mean(updates, weights, total):
    """``sum_i weights[i] * updates[i] / total`` per leaf, in the accumulation dtype."""
    return jax.tree.map(lambda leaf: tree_util.weighted_sum_rows(leaf, weights) / total, updates)


# ------------------------------------------------------------------------------------------------
# Baseline and coordinate-wise rules.


@_register
def mean(updates, *, f: int = 0):
    """Coordinate-wise mean over the workers: the non-robust baseline.

    ``agg = (1/n) sum_i g_i``. It reads the data once (the memory floor the other rules are
    measured against) and propagates NaN/Inf from any row. ``f`` is unused but validated
    (``0 <= f < n``) so that every rule can be called the same way.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers assumed (unused), ``0 <= f < n``.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> mean(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      Array([2., 3.], dtype=float32)

    References:
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas, `Communication-efficient learning of deep
      networks from decentralized data`, AISTATS 2017 (FedSGD).
    """
    n = tree_util.num_workers(updates, "mean")
    checks.byzantine_count(f, n, "mean", "n > f", lambda n, f: n > f)
    return jax.tree.map(tree_util.mean_rows, updates)


@_register
def median(updates, *, f: int = 0, even: str = "midpoint"):
    """Coordinate-wise median over the workers.

    ``[agg]_k = med_i [g_i]_k``. Needs ``n > 2f``: with at most ``f`` hostile rows (NaN is
    treated as +Inf) every output coordinate lies inside the honest rows' range for it.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers tolerated (only validated), ``n > 2f``.
      even: the median of an even count: ``"midpoint"`` (mean of the two middle values, as
        numpy/jax and epfml), ``"lower"`` (as ``torch.median``, ByzFL) or ``"upper"``.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 8.0], [2.0, 7.0], [3.0, 6.0], [jnp.nan, 5.0]])
      >>> median(g, f=1)
      Array([2.5, 6.5], dtype=float32)
      >>> median(g, f=1, even="lower")
      Array([2., 6.], dtype=float32)

    References:
      Yin, Chen, Ramchandran, Bartlett, `Byzantine-robust distributed learning: towards optimal
      statistical rates`, ICML 2018.
    """
    _majority_setup(updates, f, "median")
    _check_choice(even, "median", "even", EVEN_MEDIANS)
    return jax.tree.map(lambda leaf: order_stats.median(leaf, even=even), updates)


@_register
def trimmed_mean(updates, *, f: int):
    """Coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values, average.

    ``[agg]_k = (1/(n-2f)) sum_{r=f}^{n-f-1} [g]_{(r),k}`` with ``[g]_{(r),k}`` the ``r``-th
    smallest value of coordinate ``k`` (NaN sorts last). Needs ``n > 2f``; the output lies
    inside the honest per-coordinate range. This is the symmetric trim of Yin et al. (epfml
    ``TM(f)``, ByzFL ``TrMean``); the ALIE repository's "trimmed mean" is :func:`meamed`-like.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: values trimmed from each side of every coordinate, ``n > 2f``.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> trimmed_mean(jnp.array([[0.0], [1.0], [2.0], [3.0], [1e30]]), f=1)
      Array([2.], dtype=float32)

    References:
      Yin, Chen, Ramchandran, Bartlett, `Byzantine-robust distributed learning: towards optimal
      statistical rates`, ICML 2018.
    """
    n, f = _majority_setup(updates, f, "trimmed_mean")
    return jax.tree.map(lambda leaf: order_stats.mean_of_ranks(leaf, f, n - f), updates)


@_register
def meamed(updates, *, f: int):
    """Mean around the median: per coordinate, the mean of the ``n - f`` values nearest the median.

    ``[agg]_k = (1/(n-f)) sum_{i in N_k} [g_i]_k`` where ``N_k`` holds the ``n - f`` workers
    whose coordinate ``k`` is closest to ``med_i [g_i]_k`` (ties: the run of lower values).
    Needs ``n > 2f``; the output lies inside the honest per-coordinate range.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``; ``n - f`` values are kept per coordinate.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> meamed(jnp.array([[0.0], [1.0], [2.0], [6.0], [-1e30]]), f=2)
      Array([1.], dtype=float32)

    References:
      Xie, Koyejo, Gupta, `Generalized Byzantine-tolerant SGD`, arXiv:1802.10116, 2018.
    """
    n, f = _majority_setup(updates, f, "meamed")
    return jax.tree.map(lambda leaf: order_stats.mean_around_median(leaf, n - f), updates)


# ------------------------------------------------------------------------------------------------
# Krum family: selection on the [n, n] matrix of squared distances.


def _krum_setup(updates, f, neighbours, rule: str) -> tuple[int, int, int]:
    """``(n, f, neighbours)`` validated for Krum-type rules (``n >= 2f + 3``)."""
    n = tree_util.num_workers(updates, rule)
    f = checks.byzantine_count(f, n, rule, "n >= 2f + 3", lambda n, f: n >= 2 * f + 3)
    if neighbours is None:
        neighbours = n - f - 2
    neighbours = _count_in_range(
        neighbours, rule, "neighbours", 1, n - 1, f"other rows scored, here n={n}"
    )
    return n, f, neighbours


def _hide(dist: jax.Array, excluded: jax.Array) -> jax.Array:
    """Distances with each row's own entry and the ``excluded`` columns set to +inf."""
    n = dist.shape[0]
    hidden = jnp.eye(n, dtype=bool) | excluded[None, :]
    return jnp.where(hidden, jnp.inf, dist)


def _krum_order(dist: jax.Array, neighbours, excluded: jax.Array) -> jax.Array:
    """Worker indices by increasing Krum score; ``excluded`` rows last.

    A sum of distances is compared as (number of infinite terms, sum of the finite terms): the
    same order as the plain sum whenever it is finite, and an honest row still beats a hostile
    one when the neighbour count forces an infinite distance into every score (e.g.
    ``neighbours = n - f``). Equal scores are broken by the sum of the distances to all other
    rows, compared the same way (the more central row first), then by the lower index. Without
    that key the order of the workers would decide structural ties: two mutual nearest
    neighbours have the same score when ``neighbours = 1``, and every score is 0 when
    ``neighbours = 0`` (Bulyan's last rounds), hostile rows included.

    Args:
      dist: ``[n, n]`` distances (squared or not) with the diagonal and excluded columns +inf.
      neighbours: how many nearest other rows enter each score (traced values allowed).
      excluded: ``[n]`` bool, rows that cannot be chosen.
    """
    n = dist.shape[0]
    # Sorted rows make every sum below independent of the workers' order, to the last bit.
    nearest = jnp.sort(dist, axis=1)
    used = jnp.arange(n)[None, :] < neighbours
    score = _split_sum(jnp.where(used, nearest, 0.0))
    # Every candidate has the same number of hidden (+inf) columns, so they do not bias this key.
    centrality = _split_sum(nearest)
    excluded_last = jnp.where(excluded, 1, 0)
    return jnp.lexsort(centrality[::-1] + score[::-1] + (excluded_last,))


def _split_sum(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row sums of ``[n, n]`` non-negative values as (count of +inf terms, sum of the others)."""
    infinite = jnp.isinf(values)
    return jnp.sum(infinite, axis=1), jnp.sum(jnp.where(infinite, 0.0, values), axis=1)


def _krum_distances(updates, squared: bool) -> jax.Array:
    dist = distances.pairwise_sq_distances(updates)
    return dist if squared else jnp.sqrt(dist)


@_register
def krum(updates, *, f: int, neighbours: int | None = None, squared: bool = True):
    """Krum: the worker's update closest to its nearest neighbours.

    ``score(i) = sum_{j in N_i} ||g_i - g_j||^2`` over the ``neighbours`` nearest other rows
    ``N_i``; returns ``g_{i*}`` with ``i* = argmin_i score(i)``. Equal scores go to the row
    with the smaller sum of distances to all others, then to the lower index, so that the result
    does not depend on the workers' order. Needs ``n >= 2f + 3``. Rows holding NaN/Inf are at
    infinite distance; scores are compared by their number of infinite terms first, so with
    ``neighbours <= n - f - 1`` (and also with the ALIE variant ``n - f``) the result is an
    honest row whenever the hostile rows are non-finite or far away.

    Variants: ``neighbours`` defaults to ``n - f - 2`` (paper, epfml, DETOX); ByzFL uses
    ``n - f - 1``, the ALIE repository ``n - f`` with ``squared=False``.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n >= 2f + 3``.
      neighbours: nearest other rows in each score, ``1 <= neighbours <= n - 1``.
      squared: score with squared distances (paper) or plain Euclidean ones.

    Returns:
      The selected worker's update (a pytree like one worker's update).

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2], [0.1, 0.1], [9.0, 9.0]])
      >>> krum(g, f=1)
      Array([0.1, 0. ], dtype=float32)

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer, `Machine learning with adversaries: Byzantine
      tolerant gradient descent`, NeurIPS 2017.
    """
    n, _, neighbours = _krum_setup(updates, f, neighbours, "krum")
    dist = _hide(_krum_distances(updates, squared), jnp.zeros((n,), bool))
    winner = _krum_order(dist, neighbours, jnp.zeros((n,), bool))[0]
    return tree_util.take_row(updates, winner)


@_register
def multi_krum(
    updates, *, f: int, m: int | None = None, neighbours: int | None = None, squared: bool = True
):
    """Multi-Krum: the mean of the ``m`` updates with the lowest Krum scores.

    Scores as in :func:`krum` (one pass, no re-scoring);
    ``agg = (1/m) sum_{i in S} g_i`` with ``S`` the ``m`` lowest-score rows. Needs
    ``n >= 2f + 3`` and ``1 <= m <= n - f``, so that the selection can be all honest; rows not
    selected never reach the output, even when they hold NaN/Inf.

    Variants: ``m`` defaults to ``n - f`` (paper, ByzFL); DETOX keeps ``n - f - 2``. The
    ``neighbours`` and ``squared`` variants are those of :func:`krum`.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n >= 2f + 3``.
      m: how many rows are averaged, ``1 <= m <= n - f``.
      neighbours: nearest other rows in each score, ``1 <= neighbours <= n - 1``.
      squared: score with squared distances (paper) or plain Euclidean ones.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [0.2, 0.2], [9.0, 9.0]])
      >>> multi_krum(g, f=1)
      Array([0.1, 0.1], dtype=float32)

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer, `Machine learning with adversaries: Byzantine
      tolerant gradient descent`, NeurIPS 2017.
    """
    n, f, neighbours = _krum_setup(updates, f, neighbours, "multi_krum")
    m = n - f if m is None else m
    m = _count_in_range(m, "multi_krum", "m", 1, n - f, f"rows averaged, here n={n}, f={f}")
    dist = _hide(_krum_distances(updates, squared), jnp.zeros((n,), bool))
    chosen = _krum_order(dist, neighbours, jnp.zeros((n,), bool))[:m]
    weights = jnp.zeros((n,), jnp.float32).at[chosen].set(1.0)
    return _cast_like(_weighted_mean(updates, weights, m), updates)


def _iterated_krum(dist: jax.Array, f: int, count: int) -> jax.Array:
    """Indices ``[count]`` chosen by Krum, each round on the rows not chosen yet.

    A round with ``r`` rows left scores them with ``max(r - f - 2, 0)`` neighbours among the
    remaining rows. The loop runs over the ``[n, n]`` matrix only, never over the data.
    """
    n = dist.shape[0]

    def choose_one(step, state):
        chosen, taken = state
        neighbours = jnp.maximum(n - step - f - 2, 0)
        winner = _krum_order(_hide(dist, taken), neighbours, taken)[0]
        return chosen.at[step].set(winner), taken.at[winner].set(True)

    start = (jnp.zeros((count,), jnp.int32), jnp.zeros((n,), bool))
    chosen, _ = jax.lax.fori_loop(0, count, choose_one, start)
    return chosen


@_register
def bulyan(updates, *, f: int, beta: int | None = None):
    """Bulyan: iterated Krum selection, then a mean around the coordinate-wise median.

    1. Selection: ``theta = n - 2f`` rows, each chosen by Krum (squared distances,
       ``max(r - f - 2, 0)`` neighbours, ties as in :func:`krum`) among the ``r`` rows not
       chosen yet, on the cached distance matrix. The last rounds score with 1 or 0
       neighbours, where ties are structural: the tie-break by centrality keeps the selection
       independent of the workers' order.
    2. Aggregation: per coordinate, the mean of the ``beta`` selected values closest to the
       median of the selection (:func:`meamed` on the selection).

    Needs ``n >= 4f + 3`` and ``1 <= beta <= theta - 2f``; the output then lies inside the
    honest per-coordinate range.

    Variants: ``beta`` defaults to ``theta - 2f = n - 4f`` (paper, NDSS'21); the ALIE
    repository keeps ``theta - 2f - 1``.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n >= 4f + 3``.
      beta: values averaged per coordinate, ``1 <= beta <= n - 4f``.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [jnp.inf]])
      >>> bulyan(g, f=1)
      Array([2.], dtype=float32)

    References:
      El Mhamdi, Guerraoui, Rouault, `The hidden vulnerability of distributed learning in
      Byzantium`, ICML 2018.
    """
    n = tree_util.num_workers(updates, "bulyan")
    f = checks.byzantine_count(f, n, "bulyan", "n >= 4f + 3", lambda n, f: n >= 4 * f + 3)
    theta = n - 2 * f
    beta = theta - 2 * f if beta is None else beta
    beta = _count_in_range(
        beta, "bulyan", "beta", 1, theta - 2 * f, f"theta - 2f with theta = n - 2f, n={n}, f={f}"
    )
    chosen = _iterated_krum(distances.pairwise_sq_distances(updates), f, theta)
    selection = tree_util.take_rows(updates, chosen)
    return jax.tree.map(lambda leaf: order_stats.mean_around_median(leaf, beta), selection)


# Above this many candidate subsets, MDA's exhaustive search is refused (compile time and memory).
MDA_MAX_SUBSETS = 250_000


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


@_register
def mda(updates, *, f: int):
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

    Returns:
      A pytree like one worker's update.

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
    n, f = _majority_setup(updates, f, "mda")
    subsets = math.comb(n, f)
    checks.require(
        subsets <= MDA_MAX_SUBSETS,
        "mda",
        f"searches all C(n, f) subsets; got n={n}, f={f}: C(n, f) = {subsets} > "
        f"{MDA_MAX_SUBSETS}. Assume fewer Byzantine workers, or use multi_krum, which selects "
        "n - f rows in O(n^2).",
    )
    removed = jnp.asarray(_removal_sets(n, f))
    kept = ~jnp.any(removed[:, :, None] == jnp.arange(n)[None, None, :], axis=1)  # [C, n]
    diameters, totals = _subset_spreads(distances.pairwise_sq_distances(updates), kept)
    best = jnp.lexsort((totals, diameters))[0]
    weights = kept[best].astype(jnp.float32)
    return _cast_like(_weighted_mean(updates, weights, n - f), updates)


def _sampled_columns(updates, key: jax.Array, count: int) -> jax.Array:
    """``[n, count]`` float32: the same ``count`` coordinates of every worker's whole update,
    drawn uniformly (with replacement) over all leaves; every coordinate when there are at most
    ``count``."""
    flat = [leaf.reshape(leaf.shape[0], -1) for leaf in tree_util.leaves(updates)]
    total = sum(x.shape[1] for x in flat)
    if total <= count:
        return jnp.concatenate([x.astype(jnp.float32) for x in flat], axis=1)
    picks = jax.random.randint(key, (count,), 0, total)
    columns, start = 0.0, 0
    for x in flat:  # each pick lands in exactly one leaf
        inside = (picks >= start) & (picks < start + x.shape[1])
        local = jnp.clip(picks - start, 0, x.shape[1] - 1)
        columns = columns + jnp.where(inside, x[:, local].astype(jnp.float32), 0.0)
        start += x.shape[1]
    return columns


def _dnc_kept(sample: jax.Array, finite: jax.Array, removed: int) -> jax.Array:
    """``[n]`` bool: the rows whose squared projection on the top singular vector of the centred
    ``sample`` is among the ``n - removed`` smallest; non-finite rows score ``+inf``."""
    n = sample.shape[0]
    rows = jnp.where(finite[:, None], sample, 0.0)
    center = jnp.sum(rows, axis=0) / jnp.maximum(jnp.sum(finite.astype(jnp.float32)), 1.0)
    centred = jnp.where(finite[:, None], rows - center[None, :], 0.0)
    # The singular vector does not depend on the scale; dividing by the largest entry keeps rows
    # near 1e30 from overflowing inside the SVD.
    scale = jnp.max(jnp.abs(centred))
    centred = centred / jnp.where(scale > 0, scale, 1.0)
    top = jnp.linalg.svd(centred, full_matrices=False)[2][0]
    scores = jnp.where(finite, jnp.square(centred @ top), jnp.inf)
    order = jnp.argsort(scores, stable=True)
    return jnp.zeros((n,), bool).at[order[: n - removed]].set(True)


@_register
def dnc(updates, *, f: int, key=None, sub_dim: int = 10_000, iterations: int = 5,
        filter_frac: float = 1.0):
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
      key: int seed or JAX key for the coordinate subsamples (required when ``d > sub_dim``).
      sub_dim: coordinates per subsample ``b >= 1``.
      iterations: subsamples drawn, ``>= 1``.
      filter_frac: ``c``, rows removed per iteration ``floor(c f)``, with ``0 <= c f < n``.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [1.2, 0.2], [0.8, -0.2], [1.0, 0.1], [-9.0, 9.0]])
      >>> dnc(g, f=1, key=0)
      Array([1.   , 0.025], dtype=float32)

    References:
      Shejwalkar, Houmansadr, `Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
      Defenses for Federated Learning`, NDSS 2021.
    """
    n, f = _majority_setup(updates, f, "dnc")
    sub_dim = checks.static_int(sub_dim, "dnc", "sub_dim", minimum=1)
    iterations = checks.static_int(iterations, "dnc", "iterations", minimum=1)
    removed = math.floor(filter_frac * f)
    checks.require(
        0 <= filter_frac and removed < n,
        "dnc",
        f"needs 0 <= floor(filter_frac f) < n; got filter_frac={filter_frac}, f={f}, n={n}.",
    )
    total = sum(math.prod(leaf.shape[1:]) for leaf in tree_util.leaves(updates))
    if total > sub_dim:
        key = checks.as_key(key, "dnc")
    finite = tree_util.finite_rows(updates)
    kept_each = [
        _dnc_kept(_sampled_columns(updates, None if total <= sub_dim else
                                   jax.random.fold_in(key, step), sub_dim), finite, removed)
        for step in range(iterations)
    ]
    kept = functools.reduce(jnp.logical_and, kept_each)
    # Different subsamples may remove every row between them: keep the first one's rows then.
    weights = jnp.where(jnp.any(kept), kept, kept_each[0]).astype(jnp.float32)
    return _cast_like(_weighted_mean(updates, weights, jnp.sum(weights)), updates)


dnc.coordinate_slices = False  # its subsamples span every coordinate


# ------------------------------------------------------------------------------------------------
# Iterative rules: whole-update norms, then one weighted sum per leaf and iteration.


def _initial_point(updates, init: str, alpha: jax.Array):
    """Weiszfeld start, in the accumulation dtype of each leaf."""
    if init == "median":
        return jax.tree.map(
            lambda leaf: order_stats.median(leaf).astype(tree_util.accumulation_dtype(leaf.dtype)),
            updates,
        )
    if init == "mean":
        return _weighted_mean(updates, alpha, jnp.sum(alpha))
    return jax.tree.map(
        lambda leaf: jnp.zeros(leaf.shape[1:], tree_util.accumulation_dtype(leaf.dtype)), updates
    )


@_register
def geometric_median(
    updates,
    *,
    f: int = 0,
    iterations: int = 4,
    nu: float = 1e-5,
    init: str = "median",
    weights: jax.Array | None = None,
):
    """Geometric median by the smoothed Weiszfeld algorithm (RFA).

    Approximates ``argmin_v sum_i alpha_i ||v - g_i||`` with ``iterations`` steps of
    ``beta_i = alpha_i / max(nu, ||v - g_i||)``, ``v <- sum_i beta_i g_i / sum_i beta_i``, the
    norms taken over the whole update (all leaves). Rows holding NaN/Inf, or whose distance
    overflows float32, get ``beta_i = 0`` (RFA rejects non-finite updates); a step whose
    weights are all 0 keeps ``v``. Needs ``n > 2f`` (breakdown point 1/2); with at most ``f``
    hostile rows the result is finite and close to the honest rows.

    Start: ``init="median"`` (coordinate-wise median, the default) deviates from RFA, which
    starts at the weighted mean: a single row at 1e30 drags a mean start so far that 4
    iterations do not come back. ``"mean"`` (RFA, mean of the finite rows) and ``"zero"``
    (epfml, ByzFL) are available. RFA's defaults are ``iterations=4``, ``nu=1e-5``; epfml and
    ByzFL use ``nu=0.1`` with 3 or 8 iterations. A fixed iteration count (no tolerance test)
    keeps the cost static and the rule differentiable.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers tolerated (only validated), ``n > 2f``.
      iterations: Weiszfeld steps, ``>= 1``.
      nu: smoothing, ``> 0``: distances below ``nu`` count as ``nu``.
      init: ``"median"``, ``"mean"`` or ``"zero"``.
      weights: ``[n]`` non-negative ``alpha_i`` (e.g. sample counts); uniform if ``None``. The
        median start ignores them.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1e30, 1e30]])
      >>> fermat_point = (3 - 3**0.5) / 6  # the geometric median of the three honest rows
      >>> bool(jnp.allclose(geometric_median(g, f=1, iterations=50), fermat_point, atol=1e-4))
      True

    References:
      Pillutla, Kakade, Harchaoui, `Robust aggregation for federated learning`, IEEE
      Transactions on Signal Processing, 2022.
      Weiszfeld, `Sur le point pour lequel la somme des distances de n points donnés est
      minimum`, Tôhoku Mathematical Journal, 1937.
    """
    n, _ = _majority_setup(updates, f, "geometric_median")
    iterations = checks.static_int(iterations, "geometric_median", "iterations", minimum=1)
    _check_positive(nu, "geometric_median", "nu")
    _check_choice(init, "geometric_median", "init", GEOMETRIC_MEDIAN_INITS)
    if weights is None:
        weights = jnp.ones((n,), jnp.float32)
    checks.require(
        jnp.shape(weights) == (n,),
        "geometric_median",
        f"weights must have shape (n,) = ({n},); got {jnp.shape(weights)}.",
    )
    alpha = jnp.where(tree_util.finite_rows(updates), jnp.asarray(weights, jnp.float32), 0.0)

    def weiszfeld_step(_, point):
        dist = jnp.sqrt(_sq_distances_to(updates, point))
        beta = jnp.where(jnp.isfinite(dist), alpha / jnp.maximum(nu, dist), 0.0)
        total = jnp.sum(beta)
        moved = _weighted_mean(updates, beta, jnp.where(total > 0, total, 1.0))
        return jax.tree.map(lambda new, old: jnp.where(total > 0, new, old), moved, point)

    point = jax.lax.fori_loop(0, iterations, weiszfeld_step, _initial_point(updates, init, alpha))
    return _cast_like(point, updates)


def _check_center(center, updates) -> None:
    row_shapes = jax.tree.map(lambda leaf: leaf.shape[1:], updates)
    center_shapes = jax.tree.map(jnp.shape, center)
    checks.require(
        jax.tree.structure(center) == jax.tree.structure(updates) and center_shapes == row_shapes,
        "centered_clipping",
        f"center must be shaped like one worker's update {row_shapes}; got {center_shapes}.",
    )


@_register
def centered_clipping(
    updates, *, f: int = 0, center=None, tau: float = 100.0, iterations: int = 1
):
    """Centered clipping: move the centre by the mean of the clipped differences.

    ``v_{l+1} = v_l + (1/n) sum_i (g_i - v_l) min(1, tau / ||g_i - v_l||)`` for ``l < L``,
    with norms over the whole update (all leaves). The paper starts from the previous round's
    output; this pure function takes it as ``center`` (zeros if ``None``), and the optax
    transform keeps it as state. Rows holding NaN/Inf, or whose distance to the centre
    overflows float32, contribute 0. Needs ``n > 2f``; each step moves ``v`` by at most
    ``tau``, and hostile rows by at most ``f tau / n`` of it.

    Variants: ``tau=100``, ``iterations=1`` (CC repository, ByzFL); the bucketing repository
    uses ``tau=10``, ``iterations=3``.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers tolerated (only validated), ``n > 2f``.
      center: the start ``v_0``, a pytree like one worker's update; zeros if ``None``.
      tau: clipping radius, ``> 0``.
      iterations: clipping steps ``L``, ``>= 1``.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [jnp.nan, 0.0], [300.0, 400.0]])
      >>> centered_clipping(g, f=1, tau=5.0)
      Array([1.  , 1.25], dtype=float32)

    References:
      Karimireddy, He, Jaggi, `Learning from history for Byzantine robust optimization`,
      ICML 2021.
    """
    n, _ = _majority_setup(updates, f, "centered_clipping")
    iterations = checks.static_int(iterations, "centered_clipping", "iterations", minimum=1)
    _check_positive(tau, "centered_clipping", "tau")
    if center is None:
        center = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), updates)
    _check_center(center, updates)
    center = jax.tree.map(
        lambda c, leaf: c.astype(tree_util.accumulation_dtype(leaf.dtype)), center, updates
    )
    finite = tree_util.finite_rows(updates)

    def clipping_step(_, point):
        dist = jnp.sqrt(_sq_distances_to(updates, point))
        scale = jnp.where(finite & jnp.isfinite(dist), jnp.minimum(1.0, tau / dist), 0.0)
        pulled = _weighted_mean(updates, scale, n)
        kept = 1.0 - jnp.sum(scale) / n
        return jax.tree.map(lambda p, c: p + kept * c, pulled, point)

    return _cast_like(jax.lax.fori_loop(0, iterations, clipping_step, center), updates)


# ------------------------------------------------------------------------------------------------
# Sign-based rule.


@_register
def sign_majority(updates, *, f: int = 0, zero_sign: int = 0):
    """Majority vote of the workers' signs (signSGD with majority vote).

    ``agg = sign(sum_i sign(g_i))`` coordinate-wise. ``zero_sign`` is what ``sign(0)`` maps to,
    both for a worker's zero coordinate and for a tied vote: ``0`` (torch/numpy, ICML'18 code,
    Election Coding, DETOX) or ``1`` (the ICLR'19 bit packing sends 0 as +1). NaN values
    abstain (vote 0); ±Inf votes its sign. Needs ``n > 2f`` (the vote tolerates a minority of
    adversaries). The output holds -1, 0 or +1 in the input dtype.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers tolerated (only validated), ``n > 2f``.
      zero_sign: ``0`` or ``1``, the sign given to zeros and ties.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, -2.0, 0.0], [3.0, 4.0, 0.0], [-5.0, -6.0, 1.0]])
      >>> sign_majority(g, f=1)
      Array([ 1., -1.,  1.], dtype=float32)
      >>> sign_majority(g[:2], zero_sign=1)
      Array([1., 1., 1.], dtype=float32)

    References:
      Bernstein, Wang, Azizzadenesheli, Anandkumar, `signSGD: compressed optimisation for
      non-convex problems`, ICML 2018.
      Bernstein, Zhao, Azizzadenesheli, Anandkumar, `signSGD with majority vote is communication
      efficient and fault tolerant`, ICLR 2019.
    """
    _majority_setup(updates, f, "sign_majority")
    _check_choice(zero_sign, "sign_majority", "zero_sign", ZERO_SIGNS)

    def signs(x, abstain):
        positive = jnp.where(x > 0, 1.0, jnp.where(abstain, 0.0, float(zero_sign)))
        return jnp.where(x < 0, -1.0, positive)

    def vote(leaf):
        acc = tree_util.accumulation_dtype(leaf.dtype)
        ballots = [signs(row, jnp.isnan(row)).astype(acc) for row in tree_util.rows(leaf)]
        tally = tree_util.sum_rows(ballots)
        return signs(tally, jnp.zeros_like(tally, bool)).astype(leaf.dtype)

    return jax.tree.map(vote, updates)


# ------------------------------------------------------------------------------------------------
# Registry.


def get(name: str) -> Callable:
    """The aggregator registered as ``name`` (its function name).

    Args:
      name: e.g. ``"krum"``; :func:`names` lists them.

    Returns:
      The rule, callable as ``agg(updates, *, f=..., **hparams)``.

    Raises:
      ValueError: for an unknown name, listing the known ones.

    Example:
      >>> get("median") is median
      True
    """
    return _REGISTRY.get(name)


def names() -> tuple[str, ...]:
    """All registered aggregator names, sorted.

    Example:
      >>> names()[:3]
      ('bulyan', 'centered_clipping', 'dnc')
    """
    return _REGISTRY.names()


def supports_coordinate_layout(rule: Callable) -> bool:
    """Whether ``rule`` gives the right aggregate when each device holds a slice of the coordinates.

    That is what ``rbyz.transforms.aggregate(..., layout="coordinates")`` runs: every device
    receives all workers' values on ``1/S`` of the coordinates and aggregates that slice. True
    for every rule of this module but :func:`dnc` (its random subsamples span all coordinates):
    coordinate-wise rules need nothing else, and the others reduce
    over coordinates (norms, distances, finiteness of a whole update) only through rbyz's
    kernels, which complete those sums over the devices, so that every device makes the same
    selection or weighting. True for :func:`rbyz.preaggregators.compose` of built-in stages, and
    for a rule of your own that declares ``coordinate_slices = True`` (do so only if it is
    coordinate-wise: a norm it computes itself would see one slice).

    Example:
      >>> supports_coordinate_layout(krum)
      True
      >>> supports_coordinate_layout(lambda updates, f=0: updates)
      False
    """
    while isinstance(rule, functools.partial):
        rule = rule.func
    declared = getattr(rule, "coordinate_slices", None)
    if declared is not None:
        return declared is True
    return any(rule is get(name) for name in names())
