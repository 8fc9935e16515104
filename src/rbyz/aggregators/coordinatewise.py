"""The mean and the coordinate-wise rules: median, trimmed mean, MeaMed.

Each works leaf by leaf and coordinate by coordinate, on the order statistics of the workers'
values (sorting networks, ``rbyz._src.order_stats``): no reduction over coordinates, so each
runs unchanged on a slice of the coordinates. NaN is treated as ``+inf`` (it sorts last); only
:func:`mean` propagates non-finite values.
"""

from __future__ import annotations

import jax

from rbyz._src import order_stats
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common

EVEN_MEDIANS = ("midpoint", "lower", "upper")

_YIN = _spec.Reference(
    "Yin, Chen, Ramchandran, Bartlett",
    "Byzantine-robust distributed learning: towards optimal statistical rates", "ICML", 2018)


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.MINORITY, cost="O(n d)",
    reference=_spec.Reference(
        "McMahan, Moore, Ramage, Hampson, Agüera y Arcas",
        "Communication-efficient learning of deep networks from decentralized data",
        "AISTATS", 2017),
)
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
    _common.workers_and_f(updates, f, mean.spec)
    return jax.tree.map(tree_util.mean_rows, updates)


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.MAJORITY, cost="O(n log^2 n d)",
    reference=_YIN,
    note="even='midpoint' for an even worker count: the paper leaves it open; numpy/jax, epfml "
         "and ByzFL average the two middle values (torch.median takes the lower one, "
         "even='lower').",
)
def median(updates, *, f: int = 0, even: str = "midpoint"):
    """Coordinate-wise median over the workers.

    ``[agg]_k = med_i [g_i]_k``. Needs ``n > 2f``: with at most ``f`` hostile rows (NaN is
    treated as +Inf) every output coordinate lies inside the honest rows' range for it.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers tolerated (only validated), ``n > 2f``.
      even: the median of an even count: ``"midpoint"`` (mean of the two middle values, as
        numpy/jax, epfml and ByzFL), ``"lower"`` (as ``torch.median``) or ``"upper"``.

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
    _common.workers_and_f(updates, f, median.spec)
    _common.check_choice(even, "median", "even", EVEN_MEDIANS)
    return jax.tree.map(lambda leaf: order_stats.median(leaf, even=even), updates)


@_spec.declare("aggregator", coordinate_slices=True, constraint=_spec.MAJORITY,
               cost="O(n log^2 n d)", reference=_YIN)
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
    n, f = _common.workers_and_f(updates, f, trimmed_mean.spec)
    return jax.tree.map(lambda leaf: order_stats.mean_of_ranks(leaf, f, n - f), updates)


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
