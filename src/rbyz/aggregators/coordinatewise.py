"""The mean and the coordinate-wise rules: median, trimmed mean, MeaMed, Phocas.

Each works leaf by leaf and coordinate by coordinate, on the order statistics of the workers'
values (sorting networks, ``rbyz._src.order_stats``): no reduction over coordinates, so each
runs unchanged on a slice of the coordinates. NaN is treated as ``+inf`` (it sorts last); only
:func:`mean` propagates non-finite values.

:func:`mean`, :func:`median` and :func:`trimmed_mean` accept per-worker ``weights`` (declared
``weights=True``; validation and the weighted kernels in ``rbyz.aggregators._weights``). The
weights are trusted inputs (e.g. the sample counts the server assigned): the weighted rules are
robust in weight mass, to hostile rows holding less than half of the total weight (median) or at
most ``f / n`` of it (trimmed mean), whatever their number. A worker that may report its own
weight can claim all of it; cap the weights before passing them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import order_stats
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection
from rbyz.aggregators import _weights

EVEN_MEDIANS = ("midpoint", "lower", "upper")

_YIN = _spec.Reference(
    "Yin, Chen, Ramchandran, Bartlett",
    "Byzantine-robust distributed learning: towards optimal statistical rates", "ICML", 2018)
_STIGLER = _spec.Reference(
    "Stigler", "The asymptotic distribution of the trimmed mean", "The Annals of Statistics", 1973)


def _weighted(updates, weights, rule: str, n: int):
    """The prepared weights in the accumulation dtype of the whole tree."""
    from rbyz._src import reductions  # noqa: PLC0415 (only the weighted path needs it)

    return _weights.prepare(weights, n, rule, reductions.accumulation_dtype(updates))


@_spec.declare(
    "aggregator", reports=True, coordinate_slices=True, constraint=_spec.MINORITY, cost="O(n d)",
    weights=True,
    reference=_spec.Reference(
        "McMahan, Moore, Ramage, Hampson, Agüera y Arcas",
        "Communication-efficient learning of deep networks from decentralized data",
        "AISTATS", 2017),
)
def mean(updates, *, f: int = 0, weights=None, report: bool = False):
    """Coordinate-wise mean over the workers: the non-robust baseline.

    ``agg = (1/n) sum_i g_i``, or with weights ``agg = sum_i w_i g_i / sum_i w_i`` (FedAvg's
    sample-count weighting). It reads the data once (the memory floor the other rules are
    measured against) and propagates NaN/Inf from any row of positive weight (a row of weight 0
    is left out exactly). ``f`` is unused but validated (``0 <= f < n``) so that every rule can
    be called the same way.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers assumed (unused), ``0 <= f < n``.
      weights: ``[n]`` non-negative per-worker weights, or ``None`` (equal weights). Concrete
        weights that are negative, non-finite or all zero raise ``ValueError``; traced ones
        count such entries as 0, and all-zero traced weights give NaN.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> mean(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      Array([2., 3.], dtype=float32)
      >>> mean(jnp.array([[1.0, 2.0], [3.0, 4.0]]), weights=jnp.array([3.0, 1.0]))
      Array([1.5, 2.5], dtype=float32)

    References:
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas, `Communication-efficient learning of deep
      networks from decentralized data`, AISTATS 2017 (FedSGD).
    """
    n, _ = _common.workers_and_f(updates, f, mean.spec)
    if weights is None:
        out = jax.tree.map(tree_util.mean_rows, updates)
        return _selection.returning(out, report, jnp.ones((n,)))
    w = _weighted(updates, weights, "mean", n)
    out = _common.cast_like(_common.weighted_mean(updates, w, jnp.sum(w)), updates)
    return _selection.returning(_weights.nan_if_empty(out, w), report, w)


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.MAJORITY, cost="O(n log^2 n d)",
    reference=_YIN, weights=True,
    note="even='midpoint' for an even worker count: the paper leaves it open; numpy/jax, epfml "
         "and ByzFL average the two middle values (torch.median takes the lower one, "
         "even='lower'). Weighted: the same choice where the cumulative weight is exactly half "
         "at a boundary, so that equal weights give the unweighted median.",
)
def median(updates, *, f: int = 0, even: str = "midpoint", weights=None):
    """Coordinate-wise median over the workers, optionally weighted.

    ``[agg]_k = med_i [g_i]_k``. Needs ``n > 2f``: with at most ``f`` hostile rows (NaN is
    treated as +Inf) every output coordinate lies inside the honest rows' range for it.

    Weighted median: with coordinate ``k``'s values sorted, ``s_(0) <= ... <= s_(n-1)``, and
    ``w_(r)`` the weight of the worker of ``s_(r)``, the lower weighted median is the smallest
    ``s_(r)`` with ``sum_{j<=r} w_(j) >= W / 2`` (``W = sum_i w_i``), the upper one the largest
    ``s_(r)`` with ``sum_{j>=r} w_(j) >= W / 2``. They differ only when the cumulative weight is
    exactly ``W / 2`` at a boundary (an even count of equal weights); ``even`` then picks the
    midpoint, the lower or the upper one, as for the unweighted median, so equal weights give
    exactly the unweighted result, and integer weights the median of the rows repeated that
    many times. Rows of weight 0 are never chosen. With trusted weights the output lies in the
    honest range whenever the hostile rows hold less than half of the weight.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers tolerated (only validated), ``n > 2f``.
      even: the median of an even count (or an exact half of the weight): ``"midpoint"`` (mean
        of the two middle values, as numpy/jax, epfml and ByzFL), ``"lower"`` (as
        ``torch.median``) or ``"upper"``.
      weights: ``[n]`` non-negative per-worker weights, or ``None`` (unweighted). Concrete
        weights that are negative, non-finite or all zero raise ``ValueError``; traced ones
        count such entries as 0, and all-zero traced weights give NaN.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 8.0], [2.0, 7.0], [3.0, 6.0], [jnp.nan, 5.0]])
      >>> median(g, f=1)
      Array([2.5, 6.5], dtype=float32)
      >>> median(g, f=1, even="lower")
      Array([2., 6.], dtype=float32)
      >>> median(g, f=1, weights=jnp.array([1.0, 1.0, 5.0, 1.0]))
      Array([3., 6.], dtype=float32)

    References:
      Yin, Chen, Ramchandran, Bartlett, `Byzantine-robust distributed learning: towards optimal
      statistical rates`, ICML 2018.
    """
    n, _ = _common.workers_and_f(updates, f, median.spec)
    _common.check_choice(even, "median", "even", EVEN_MEDIANS)
    if weights is None:
        return jax.tree.map(lambda leaf: order_stats.median(leaf, even=even), updates)
    w = _weighted(updates, weights, "median", n)
    out = jax.tree.map(lambda leaf: _weights.median(leaf, w, even=even), updates)
    return _weights.nan_if_empty(out, w)


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.MAJORITY, cost="O(n log^2 n d)",
    reference=(_YIN, _STIGLER), weights=True,
    note="Weighted: trims the fraction f/n of the total weight from each side, splitting the "
         "weight of a boundary value (the trimmed mean functional of the weighted empirical "
         "distribution), so that equal weights give the unweighted trimmed mean.",
)
def trimmed_mean(updates, *, f: int, weights=None):
    """Coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values, average.

    ``[agg]_k = (1/(n-2f)) sum_{r=f}^{n-f-1} [g]_{(r),k}`` with ``[g]_{(r),k}`` the ``r``-th
    smallest value of coordinate ``k`` (NaN sorts last). Needs ``n > 2f``; the output lies
    inside the honest per-coordinate range. This is the symmetric trim of Yin et al. (epfml
    ``TM(f)``, ByzFL ``TrMean``); the ALIE repository's "trimmed mean" is :func:`meamed`-like.

    Weighted: the trimmed mean functional ``(1/(1-2b)) int_b^{1-b} F_w^{-1}(u) du`` of the
    weighted empirical distribution ``F_w`` with ``b = f / n`` (Stigler 1973): per coordinate,
    the weight mass ``T = (f/n) W`` (``W = sum_i w_i``) is removed from each end of the sorted
    values, a boundary value keeping the part of its weight that is not trimmed, and the rest is
    averaged with its weights. Equal weights give the unweighted trimmed mean; integer weights
    ``c_i`` give the trimmed mean of the rows repeated ``c_i`` times with ``f sum_i c_i / n``
    trimmed per side (when that is an integer). Kept weights below the rounding error of the
    weight sums (``4 n eps W``) are dropped. With trusted weights, hostile rows holding at most
    ``f / n`` of the total weight never reach the output.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: values trimmed from each side of every coordinate, ``n > 2f`` (with weights: the
        fraction ``f / n`` of the total weight from each side).
      weights: ``[n]`` non-negative per-worker weights, or ``None`` (unweighted). Concrete
        weights that are negative, non-finite or all zero raise ``ValueError``; traced ones
        count such entries as 0, and all-zero traced weights give NaN.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0], [1.0], [2.0], [3.0], [1e30]])
      >>> trimmed_mean(g, f=1)
      Array([2.], dtype=float32)
      >>> trimmed_mean(g, f=1, weights=jnp.array([1.0, 1.0, 1.0, 6.0, 1.0]))  # (2 + 5 * 3) / 6
      Array([2.8333333], dtype=float32)

    References:
      Yin, Chen, Ramchandran, Bartlett, `Byzantine-robust distributed learning: towards optimal
      statistical rates`, ICML 2018.
      Stigler, `The asymptotic distribution of the trimmed mean`, The Annals of Statistics,
      1973 (the trimmed mean of a distribution, here the weighted empirical one).
    """
    n, f = _common.workers_and_f(updates, f, trimmed_mean.spec)
    if weights is None:
        return jax.tree.map(lambda leaf: order_stats.mean_of_ranks(leaf, f, n - f), updates)
    w = _weighted(updates, weights, "trimmed_mean", n)
    out = jax.tree.map(lambda leaf: _weights.trimmed_mean(leaf, w, f), updates)
    return _weights.nan_if_empty(out, w)


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.MAJORITY,
    cost="O(n log^2 n d + f n d)",
    reference=_spec.Reference("Xie, Koyejo, Gupta", "Generalized Byzantine-tolerant SGD",
                              "arXiv:1802.10116", 2018),
)
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
    n, f = _common.workers_and_f(updates, f, meamed.spec)
    return jax.tree.map(lambda leaf: order_stats.mean_around_median(leaf, n - f), updates)


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.MAJORITY,
    cost="O(n log^2 n d + f n d)",
    reference=_spec.Reference("Xie, Koyejo, Gupta",
                              "Phocas: dimensional Byzantine-resilient stochastic gradient descent",
                              "arXiv:1805.09682", 2018),
    note="The trim b of the centre is f, as in the paper's experiments and the LPD-EPFL "
         "ByzantineMomentum phocas.py; ties in distance keep the lower values (MeaMed's rule).",
)
def phocas(updates, *, f: int):
    """Phocas: per coordinate, the mean of the ``n - f`` values nearest the trimmed mean.

    ``[agg]_k = (1/(n-f)) sum_{i in N_k} [g_i]_k`` where ``N_k`` holds the ``n - f`` workers
    whose coordinate ``k`` is closest to ``Trmean_f([g]_k)``, the mean without the ``f``
    smallest and ``f`` largest values (:func:`trimmed_mean`); ties: the run of lower values.
    It is :func:`meamed` with the trimmed mean as centre. Needs ``n > 2f``; the centre and then
    the output lie inside the honest per-coordinate range (NaN is treated as +Inf).

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``: trimmed from each side for the centre, and
        ``n - f`` values kept per coordinate.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> phocas(jnp.array([[0.0], [1.0], [2.0], [6.0], [-1e30]]), f=1)  # centre 1
      Array([2.25], dtype=float32)

    References:
      Xie, Koyejo, Gupta, `Phocas: dimensional Byzantine-resilient stochastic gradient
      descent`, arXiv:1805.09682, 2018.
    """
    n, f = _common.workers_and_f(updates, f, phocas.spec)
    return jax.tree.map(lambda leaf: order_stats.mean_around(leaf, n - f, trim=f), updates)
