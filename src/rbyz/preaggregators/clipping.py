"""Norm clipping of whole worker updates: static clipping and Adaptive Robust Clipping (ARC).

Norms are measured over the whole update (all leaves, completed over the devices when the
coordinates are sliced), in the input's precision (float32 for 16-bit inputs); the rows are then
rescaled leaf by leaf.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util

_ALLOUAH_2024 = _spec.Reference(
    "Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan",
    "Boosting Robustness by Clipping Gradients in Distributed Learning", "NeurIPS", 2024)
_ABADI_2016 = _spec.Reference(
    "Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang",
    "Deep Learning with Differential Privacy", "CCS", 2016)


def per_row(vector: jax.Array, ndim: int) -> jax.Array:
    """Reshapes ``[n]`` to ``[n, 1, ..., 1]`` so that it scales the rows of an ``ndim`` leaf."""
    return vector.reshape(vector.shape[:1] + (1,) * (ndim - 1))


def _clip_rows(updates, threshold: jax.Array):
    """Scales each row whose whole-update norm exceeds ``threshold`` down to that norm.

    Rows with a non-finite squared norm (NaN or Inf values, or a norm beyond the range of the
    accumulation dtype) are set to zero: their direction cannot be measured, and zero lies inside
    every clipping ball.
    """
    acc = reductions.accumulation_dtype(updates)
    norms = jnp.sqrt(reductions.row_sq_norms(updates))
    measurable = jnp.isfinite(norms)
    tiny = jnp.finfo(acc).tiny
    factors = jnp.where(measurable,
                        jnp.minimum(1.0, threshold.astype(acc) / jnp.maximum(norms, tiny)), 0.0)

    def scale(leaf):
        leaf_acc = tree_util.accumulation_dtype(leaf.dtype)
        keep = per_row(measurable, leaf.ndim)
        scaled = leaf.astype(leaf_acc) * per_row(factors.astype(leaf_acc), leaf.ndim)
        return jnp.where(keep, scaled, 0).astype(leaf.dtype)

    return jax.tree.map(scale, updates)


@_spec.declare("preaggregator", constraint=_spec.ANY, coordinate_slices=True, cost="O(n d)",
               reference=(_ABADI_2016, _ALLOUAH_2024))
def clip(updates, *, max_norm: float):
    """Static clipping: scales each worker's whole update to an l2 norm of at most ``max_norm``.

    ``y_i = min(1, c / ||x_i||) x_i`` with ``c = max_norm`` and ``||x_i||`` the Euclidean norm of
    worker ``i``'s update over all leaves. Rows with NaN or Inf values (or a norm that overflows
    the accumulation dtype, about 1.8e19 for float32 and 16-bit inputs) are returned as zeros:
    their norm and direction are undefined, and zero is inside the clipping ball. Any ``n >= 1``.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      max_norm: the clipping threshold ``c > 0`` (a Python number or a traced scalar).

    Returns:
      A stacked pytree with the structure, shapes and dtypes of ``updates``.

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import preaggregators
      >>> x = {"w": jnp.array([[6.0, 8.0], [0.5, 0.0], [jnp.nan, 1.0]])}
      >>> preaggregators.clip(x, max_norm=5.0)["w"].tolist()
      [[3.0, 4.0], [0.5, 0.0], [0.0, 0.0]]

    References:
      Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, `Deep Learning with Differential
      Privacy`, CCS 2016 (per-example clipping); Allouah, Guerraoui, Gupta, Jellouli, Rizk,
      Stephan, `Boosting Robustness by Clipping Gradients in Distributed Learning`, NeurIPS 2024.
    """
    tree_util.num_workers(updates, "clip")
    if isinstance(max_norm, (int, float)):
        checks.require(
            math.isfinite(max_norm) and max_norm > 0,
            "clip",
            f"needs a finite max_norm > 0; got max_norm={max_norm}. Pass the largest l2 norm a "
            "worker's update may keep, e.g. max_norm=1.0.",
        )
    return _clip_rows(updates, jnp.asarray(max_norm))


def arc_clipped_count(n: int, f: int) -> int:
    """ARC's ``k = floor(2 (f / n) (n - f))``, in exact integer arithmetic."""
    return (2 * f * (n - f)) // n


@_spec.declare(
    "preaggregator", constraint=_spec.MAJORITY, coordinate_slices=True, cost="O(n d + n log n)",
    reference=_ALLOUAH_2024,
    note="k is computed in exact integer arithmetic; ByzFL's float product rounds down one too "
         "far for a few valid settings (n=242, f=33: ByzFL clips 56 rows, the formula 57).")
def arc(updates, *, f: int):
    """Adaptive Robust Clipping: clips the ``k`` largest rows to the norm of the next largest.

    With ``k = floor(2 (f/n) (n - f))`` and the rows' whole-update l2 norms sorted in decreasing
    order ``||x_(1)|| >= ... >= ||x_(n)||``, the threshold is ``C = ||x_(k+1)||`` and
    ``y_i = min(1, C / ||x_i||) x_i``: the ``k`` largest rows are scaled down to norm ``C``, the
    others are unchanged. This follows Algorithm 1 of the paper and ByzFL's ``ARC``, except that
    ``k`` is computed in exact integer arithmetic: ByzFL's float product ``2 * (f / n) * (n - f)``
    rounds down one too far for a few valid settings (n=242, f=33: ByzFL clips 56 rows, the
    formula 57). Needs ``n > 2f``, so that ``k >= f`` and ``k < n``: at most ``f`` hostile rows
    are all among the clipped ones.

    Hostile rows: NaN or Inf rows (or norms that overflow) rank as the largest and are returned as
    zeros (see :func:`clip`), so the output is finite and every row has norm ``<= C``.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: the number of Byzantine workers tolerated (Python int, ``0 <= 2f < n``). ``f = 0``
        returns the updates unchanged.

    Returns:
      A stacked pytree with the structure, shapes and dtypes of ``updates``.

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import preaggregators
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 400.0]])
      >>> preaggregators.arc(x, f=1).tolist()  # k = floor(2 * 1/4 * 3) = 1, C = 3
      [[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 3.0]]

    References:
      Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, `Boosting Robustness by Clipping
      Gradients in Distributed Learning`, NeurIPS 2024 (arXiv:2405.14432).
    """
    n = tree_util.num_workers(updates, "arc")
    f = checks.byzantine_count(f, n, "arc", "n > 2f", lambda n, f: n > 2 * f)
    sq_norms = reductions.row_sq_norms(updates)
    sq_norms = jnp.where(jnp.isnan(sq_norms), jnp.inf, sq_norms)
    threshold = jnp.sqrt(jnp.sort(sq_norms)[n - 1 - arc_clipped_count(n, f)])
    return _clip_rows(updates, threshold)
