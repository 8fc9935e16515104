"""Nearest-row rules: average the ``n - f`` rows nearest to a point, MoNNA and CGE.

:func:`monna` keeps the rows nearest to a trusted pivot row, :func:`cge` the rows nearest to 0
(the smallest norms). Both read the data twice at most (a whole-update distance or norm per row
through ``rbyz._src.reductions``, then the mean of the kept rows), so they cost ``O(n d)``, run
on a slice of the coordinates, and a row they leave out never reaches the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection

CGE_REDUCTIONS = ("mean", "sum")


def _nearest_mask(score: jax.Array, hostile: jax.Array, keep: int) -> jax.Array:
    """``[n]`` bool: the ``keep`` rows of smallest ``score``, hostile rows last, then by index."""
    score = jnp.where(jnp.isnan(score) | hostile, jnp.inf, score)
    order = jnp.lexsort((jnp.arange(score.shape[0]), score, hostile))
    return jnp.zeros(score.shape, bool).at[order[:keep]].set(True)


@_spec.declare(
    "aggregator", reports=True, coordinate_slices=True, constraint=_spec.MAJORITY, cost="O(n d)",
    reference=_spec.Reference(
        "Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan",
        "Robust Collaborative Learning with Linear Gradient Overhead", "ICML", 2023),
    note="pivot=0 follows ByzFL's MoNNA(f, idx=0). The rule is defined for a trusted pivot (a "
         "peer's own vector): it is not invariant to the workers' order, and a hostile pivot "
         "(outside the model) gives the mean of the n - f lowest-index non-hostile rows.",
)
def monna(updates, *, f: int, pivot: int = 0, report: bool = False):
    """MoNNA: the mean of the ``n - f`` rows nearest to a trusted pivot row.

    ``agg = (1/(n-f)) sum_{i in N_p} x_i`` with ``N_p`` the ``n - f`` rows nearest to
    ``x_p`` in Euclidean distance over the whole update (``x_p`` itself included; equal
    distances go to the lower index). Needs ``n > 2f``. In the peer-to-peer setting of the paper
    each honest peer is its own pivot, so ``x_p`` is trusted: the output is then the mean of
    rows no farther from ``x_p`` than its ``(n-f)``-th nearest honest row. A row holding NaN/Inf
    (or whose squared norm or distance overflows the accumulation dtype) is farthest; a hostile
    pivot, outside the rule's model, is at unknown distance from every row, and the output is
    then the mean of the ``n - f`` lowest-index non-hostile rows.

    The rule depends on which row is the pivot, so it is not invariant to the workers' order.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``.
      pivot: index of the trusted row, ``0 <= pivot < n`` (ByzFL's ``idx``).
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [9.0, 9.0], [-9.0, 9.0]])
      >>> monna(g, f=2)
      Array([0.16666667, 0.16666667], dtype=float32)
      >>> monna(g, f=2, pivot=3)  # an untrusted pivot drags the mean
      Array([3.1666667, 3.1666667], dtype=float32)

    References:
      Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, `Robust Collaborative Learning with
      Linear Gradient Overhead`, ICML 2023.
    """
    n, f = _common.workers_and_f(updates, f, monna.spec)
    pivot = _common.count_in_range(pivot, "monna", "pivot", 0, n - 1,
                                   f"the trusted worker's row, here n={n}")
    centre = tree_util.take_row(updates, pivot)
    dist = reductions.sq_distances_to(updates, centre)
    hostile = ~jnp.isfinite(reductions.row_sq_norms(updates))
    dist = jnp.where(hostile[pivot], jnp.inf, dist)
    weights = _nearest_mask(dist, hostile, n - f).astype(jnp.float32)
    return _selection.returning(
        _common.cast_like(_common.weighted_mean(updates, weights, n - f), updates), report, weights)


@_spec.declare(
    "aggregator", reports=True, coordinate_slices=True, constraint=_spec.MAJORITY, cost="O(n d)",
    reference=(
        _spec.Reference(
            "Gupta, Liu, Vaidya",
            "Byzantine Fault-Tolerant Distributed Machine Learning with Norm-Based Comparative "
            "Gradient Elimination", "DSN Workshops", 2021),
        _spec.Reference(
            "Farhadkhani, Guerraoui, Gupta, Pinot, Stephan",
            "Byzantine Machine Learning Made Easy by Resilient Averaging of Momentums", "ICML",
            2022),
    ),
    note="reduction='mean' follows the LPD-EPFL ByzantineMomentum code (cge.py), so that the "
         "output composes with a server learning rate like every other rule; the paper sums "
         "the n - f kept gradients (reduction='sum').",
)
def cge(updates, *, f: int, reduction: str = "mean", report: bool = False):
    """Comparative Gradient Elimination: drop the ``f`` largest-norm rows, average the rest.

    ``agg = (1/(n-f)) sum_{i in S} x_i`` (``reduction="mean"``) or ``sum_{i in S} x_i``
    (``"sum"``, the paper), with ``S`` the ``n - f`` rows of smallest Euclidean norm over the
    whole update (equal norms go to the lower index). Needs ``n > 2f``. A row holding NaN/Inf,
    or whose squared norm overflows the accumulation dtype, has infinite norm and is dropped
    first; every kept row has a norm at most the largest honest norm.

    Variants: the paper sums the kept gradients; the LPD-EPFL ByzantineMomentum code averages
    them, the default here so that the output has the scale of one gradient.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``.
      reduction: ``"mean"`` or ``"sum"`` of the kept rows.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0], [-5.0, 0.0]])
      >>> cge(g, f=2)
      Array([0.6666667, 0.6666667], dtype=float32)
      >>> cge(g, f=2, reduction="sum")
      Array([2., 2.], dtype=float32)

    References:
      Gupta, Liu, Vaidya, `Byzantine Fault-Tolerant Distributed Machine Learning with Norm-Based
      Comparative Gradient Elimination`, DSN Workshops 2021; Farhadkhani, Guerraoui, Gupta,
      Pinot, Stephan, `Byzantine Machine Learning Made Easy by Resilient Averaging of Momentums`,
      ICML 2022 (the averaging variant, in its code).
    """
    n, f = _common.workers_and_f(updates, f, cge.spec)
    _common.check_choice(reduction, "cge", "reduction", CGE_REDUCTIONS)
    norms = reductions.row_sq_norms(updates)
    weights = _nearest_mask(norms, ~jnp.isfinite(norms), n - f).astype(jnp.float32)
    total = n - f if reduction == "mean" else 1
    return _selection.returning(
        _common.cast_like(_common.weighted_mean(updates, weights, total), updates), report, weights)
