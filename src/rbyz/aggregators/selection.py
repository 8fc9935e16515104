"""Detection as an output: which rows a rule kept, and with what weight, from the same pass.

A rule declared ``reports=True`` returns ``(output, Selection)`` when called with
``report=True``. ``Selection.weights[i]`` is row ``i``'s weight in the output: for the rules that
average rows, ``output = sum_i weights[i] x_i`` (the weights sum to 1; Krum puts 1 on the row it
picks); for the rules that clip rows towards a point (centered clipping, clipped clustering,
SignGuard, FLAME), the weight of the row's clipped contribution, normalised to sum to 1 over the
contributing rows. A weight of 0 means the row was left out (rejected); a NaN/Inf row always has
weight 0. The selection costs nothing beyond what the rule computes anyway (no second pass over
the updates, no difference quotients).

Coordinate-wise rules (median, trimmed mean, MeaMed, Phocas, Bulyan's second stage) keep
different rows in every coordinate and do not report; :func:`rbyz.sim.diagnostics.byzantine_share`
measures their Byzantine share by finite differences instead.

Example:
  >>> import jax.numpy as jnp
  >>> from rbyz import aggregators
  >>> g = jnp.array([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [0.2, 0.2], [9.0, 9.0]])
  >>> out, selection = aggregators.multi_krum(g, f=1, report=True)
  >>> selection.weights.tolist()
  [0.25, 0.25, 0.25, 0.25, 0.0]
  >>> int(selection.rejected())
  1
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Selection(NamedTuple):
    """The weight of every row in a rule's output (``[n]`` float32; 0: left out).

    Attributes:
      weights: ``[n]`` non-negative, summing to 1 unless every row was left out.
    """

    weights: jax.Array

    @property
    def kept(self) -> jax.Array:
        """``[n]`` bool: the rows that reached the output."""
        return self.weights > 0

    def rejected(self) -> jax.Array:
        """How many rows were left out (int32)."""
        return jnp.sum(~self.kept, dtype=jnp.int32)

    def kept_among(self, rows: jax.Array) -> jax.Array:
        """How many of the rows marked in ``rows`` (``[n]`` bool, e.g. the Byzantine ones)
        reached the output (int32)."""
        return jnp.sum(self.kept & rows, dtype=jnp.int32)

    def weight_of(self, rows: jax.Array) -> jax.Array:
        """The total weight of the rows marked in ``rows`` (float32): the Byzantine share of
        the output when ``rows`` are the Byzantine workers."""
        return jnp.sum(jnp.where(rows, self.weights, 0.0))


def of_weights(weights: jax.Array, total=None) -> Selection:
    """A :class:`Selection` from unnormalised non-negative ``weights`` (divided by ``total``, by
    default their sum; all zero when the total is 0 or not finite)."""
    weights = jnp.asarray(weights, jnp.float32)
    weights = jnp.where(jnp.isfinite(weights) & (weights > 0), weights, 0.0)
    total = jnp.sum(weights) if total is None else jnp.asarray(total, jnp.float32)
    ok = jnp.isfinite(total) & (total > 0)
    return Selection(jnp.where(ok, weights / jnp.where(ok, total, 1.0), 0.0))


def returning(out, report: bool, weights: jax.Array, total=None):
    """``out``, or ``(out, of_weights(weights, total))`` when ``report``: how a reporting rule
    ends."""
    return (out, of_weights(weights, total)) if report else out


__all__ = ("Selection", "of_weights", "returning")
