"""The Krum family: selection on the ``[n, n]`` matrix of squared distances.

:func:`krum` picks the row closest to its nearest neighbours, :func:`multi_krum` averages the
``m`` best-scored rows, :func:`bulyan` iterates Krum and then takes a mean around the
coordinate-wise median of the selection. The distances are whole-update sums
(``rbyz._src.reductions``), accumulated in float64 for float64 updates; every device of a
coordinate-sharded run sees the same matrix and makes the same selection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import order_stats
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection
from rbyz.aggregators import _weights

_BLANCHARD = _spec.Reference(
    "Blanchard, El Mhamdi, Guerraoui, Stainer",
    "Machine learning with adversaries: Byzantine tolerant gradient descent", "NeurIPS", 2017)


def _krum_setup(updates, f, neighbours, declared) -> tuple[int, int, int]:
    """``(n, f, neighbours)`` validated for Krum-type rules (``n >= 2f + 3``)."""
    n, f = _common.workers_and_f(updates, f, declared)
    if neighbours is None:
        neighbours = n - f - 2
    neighbours = _common.count_in_range(
        neighbours, declared.name, "neighbours", 1, n - 1, f"other rows scored, here n={n}"
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


def _krum_ranking(updates, neighbours, squared: bool) -> jax.Array:
    """All worker indices by increasing Krum score, scored once on the whole-update distances."""
    dist = reductions.pairwise_sq_distances(updates)
    dist = dist if squared else jnp.sqrt(dist)
    nobody = jnp.zeros((dist.shape[0],), bool)
    return _krum_order(_hide(dist, nobody), neighbours, nobody)


@_spec.declare("aggregator", reports=True, coordinate_slices=True, constraint=_spec.KRUM,
               cost="O(n^2 d)",
               reference=_BLANCHARD, weights=True,
               note="weights are accepted (and validated) so that weighted pipelines can use "
                    "Krum; the selection is unweighted and one row is returned as it is.")
def krum(updates, *, f: int, neighbours: int | None = None, squared: bool = True,
         weights=None, report: bool = False):
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

    Weights: the selection is unweighted (scores over distances only, so a worker cannot buy
    its way in by claiming a large weight), and the weighted mean of the one selected row is
    the row itself: ``weights`` are validated as for the other weighted rules and change
    nothing else (see :func:`multi_krum`, where they weight the selected rows).

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n >= 2f + 3``.
      neighbours: nearest other rows in each score, ``1 <= neighbours <= n - 1``.
      squared: score with squared distances (paper) or plain Euclidean ones.
      weights: ``[n]`` non-negative per-worker weights, or ``None``; they do not change the
        output (concrete negative, non-finite or all-zero weights raise ``ValueError``).
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

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
    n, _, neighbours = _krum_setup(updates, f, neighbours, krum.spec)
    if weights is not None:
        _weights.prepare(weights, n, "krum", reductions.accumulation_dtype(updates))
    winner = _krum_ranking(updates, neighbours, squared)[0]
    return _selection.returning(tree_util.take_row(updates, winner), report,
                                jnp.zeros((n,)).at[winner].set(1.0))


@_spec.declare("aggregator", reports=True, coordinate_slices=True, constraint=_spec.KRUM,
               cost="O(n^2 d)",
               reference=_BLANCHARD, weights=True,
               note="Weighted: the selection is unweighted (ByzFL's MultiKrum does the same), "
                    "the selected rows are averaged with their weights.")
def multi_krum(
    updates, *, f: int, m: int | None = None, neighbours: int | None = None, squared: bool = True,
    weights=None, report: bool = False,
):
    """Multi-Krum: the mean of the ``m`` updates with the lowest Krum scores.

    Scores as in :func:`krum` (one pass, no re-scoring);
    ``agg = (1/m) sum_{i in S} g_i`` with ``S`` the ``m`` lowest-score rows. Needs
    ``n >= 2f + 3`` and ``1 <= m <= n - f``, so that the selection can be all honest; rows not
    selected never reach the output, even when they hold NaN/Inf.

    Variants: ``m`` defaults to ``n - f`` (paper, ByzFL); DETOX keeps ``n - f - 2``. The
    ``neighbours`` and ``squared`` variants are those of :func:`krum`.

    Weighted: ``agg = sum_{i in S} w_i g_i / sum_{i in S} w_i``. The selection ``S`` itself is
    unweighted (scores over distances only), so a worker claiming a large weight is selected
    only if its update is close to the others; once selected its weight counts as given
    (trusted weights). Non-finite rows are never selected, whatever their weight. If every
    selected row has weight 0 the output is NaN.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n >= 2f + 3``.
      m: how many rows are averaged, ``1 <= m <= n - f``.
      neighbours: nearest other rows in each score, ``1 <= neighbours <= n - 1``.
      squared: score with squared distances (paper) or plain Euclidean ones.
      weights: ``[n]`` non-negative per-worker weights, or ``None`` (equal weights). Concrete
        weights that are negative, non-finite or all zero raise ``ValueError``; traced ones
        count such entries as 0.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [0.2, 0.2], [9.0, 9.0]])
      >>> multi_krum(g, f=1)  # the four rows near 0 are selected, not the far one
      Array([0.1, 0.1], dtype=float32)
      >>> multi_krum(g, f=1, weights=jnp.array([1.0, 3.0, 0.0, 0.0, 100.0]))
      Array([0.15, 0.  ], dtype=float32)

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer, `Machine learning with adversaries: Byzantine
      tolerant gradient descent`, NeurIPS 2017 (Krum and Multi-Krum).
    """
    n, f, neighbours = _krum_setup(updates, f, neighbours, multi_krum.spec)
    m = n - f if m is None else m
    m = _common.count_in_range(m, "multi_krum", "m", 1, n - f, f"rows averaged, here n={n}, f={f}")
    chosen = _krum_ranking(updates, neighbours, squared)[:m]
    if weights is None:
        weights = jnp.zeros((n,), jnp.float32).at[chosen].set(1.0)
        return _selection.returning(
            _common.cast_like(_common.weighted_mean(updates, weights, m), updates), report,
            weights)
    w = _weights.prepare(weights, n, "multi_krum", reductions.accumulation_dtype(updates))
    selected = jnp.zeros_like(w).at[chosen].set(w[chosen])
    out = _common.weighted_mean(updates, selected, jnp.sum(selected))
    return _selection.returning(_weights.nan_if_empty(_common.cast_like(out, updates), selected),
                                report, selected)


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
        return chosen.at[step].set(winner.astype(chosen.dtype)), taken.at[winner].set(True)

    start = (jnp.zeros((count,), jnp.int32), jnp.zeros((n,), bool))
    chosen, _ = jax.lax.fori_loop(0, count, choose_one, start)
    return chosen


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.BULYAN,
    cost="O(n^2 d + n^3 log n)",
    reference=_spec.Reference(
        "El Mhamdi, Guerraoui, Rouault",
        "The hidden vulnerability of distributed learning in Byzantium", "ICML", 2018),
)
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
    n, f = _common.workers_and_f(updates, f, bulyan.spec)
    theta = n - 2 * f
    beta = theta - 2 * f if beta is None else beta
    beta = _common.count_in_range(
        beta, "bulyan", "beta", 1, theta - 2 * f, f"theta - 2f with theta = n - 2f, n={n}, f={f}"
    )
    chosen = _iterated_krum(reductions.pairwise_sq_distances(updates), f, theta)
    selection = tree_util.take_rows(updates, chosen)
    return jax.tree.map(lambda leaf: order_stats.mean_around_median(leaf, beta), selection)
