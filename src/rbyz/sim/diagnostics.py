"""Why a defence fails, step by step: what a run logs with ``diagnostics.enabled = true``.

Per training step, beside the loss:

- ``below_z<z>``: the number of coordinates ``j`` with ``|mu_j| < z sigma_j``, where ``mu_j``
  and ``sigma_j`` are the mean and the standard deviation (``ddof = 0``) of the ``n`` workers'
  true gradients (computed before any attack). These are the coordinates whose sign an attacker
  can flip by moving ``z`` standard deviations, the quantity Baruch et al. plot in their
  rebuttal (``z in {1/2, 1, 2}``) to show that the variance across workers is large: "many
  gradients can change direction even with a change of only 1/2 sigma", against the assumption
  of Krum-like defences that the spread is small beside the gradient. ``coordinates`` is ``d``.
- ``byzantine_share``: the Byzantine rows' share of the aggregate. For a rule that reports its
  selection (declared ``reports=True``, no pre-aggregators) it is the total weight the rule
  gave the Byzantine rows, read from the same pass (:class:`rbyz.aggregators.Selection`);
  otherwise :func:`byzantine_share` measures it (how far the output moves when the Byzantine
  rows move, against when all rows move; the pre-aggregators included). For the selection rules it is the fraction of the selection that
  is Byzantine: for Krum 1 when it picks a Byzantine row, else 0; for Multi-Krum the Byzantine
  fraction of the ``m`` rows it averages; for Bulyan the Byzantine part of its per-coordinate
  means. ``f/n`` for the mean; ``nan`` for a rule whose output does not move with its input
  (a sign vote).
- ``byzantine_kept`` and ``rejected``: for a reporting rule, how many Byzantine rows reached
  the aggregate (weight > 0) and how many rows it left out; ``-1`` for the other rules. With
  ``diagnostics.fail_closed = true`` a run stops (:class:`FailClosed`) at the first step whose
  rule rejected more rows than the ``f`` it assumes: more workers look Byzantine than the
  defence is built for.

The Byzantine rows are the rows the attack changed in that step (a Byzantine worker that sends
exactly its own honest update is not counted). The share is defined for the
aggregators of :mod:`rbyz.aggregators`; whole algorithms (sign votes, DETOX, Election Coding)
log ``nan`` there, and the ``below_z`` counts for every rule.

Example:
  >>> import jax.numpy as jnp
  >>> g = jnp.array([[1.0, 0.1], [1.2, -0.1], [0.8, 0.3]])
  >>> coordinates_below(g, (0.5, 2.0)).tolist()  # column 2: mu = 0.1, sigma = 0.16
  [0, 1]
  >>> from rbyz import aggregators
  >>> krum = lambda u: (aggregators.krum(u, f=1), None)
  >>> g = jnp.array([[0.0], [0.1], [0.15], [0.3], [9.0]])
  >>> [float(byzantine_share(krum, g, jnp.arange(5) == i)[2]) for i in range(5)]  # row 1 wins
  [0.0, 1.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rbyz.transforms.robust import Stages

Z = (0.5, 1.0, 2.0)
"""The rebuttal's values of ``z``, the default of ``diagnostics.z``."""


def column(z: float) -> str:
    """The results column of the count at ``z``: ``below_z0.5``, ``below_z1``, ``below_z2``."""
    return f"below_z{z:g}"


def columns(z: Sequence[float]) -> list[str]:
    """Every diagnostic column, in the order rows hold them."""
    return [*(column(v) for v in z), "coordinates", "byzantine_share", "byzantine_kept",
            "rejected"]


class FailClosed(RuntimeError):
    """A step's rule rejected more rows than the ``f`` it assumes (``diagnostics.fail_closed``).

    Attributes:
      step: the first such step (1-based).
      rejected: how many rows the rule left out there.
      f: the number of Byzantine workers assumed.
    """

    def __init__(self, step: int, rejected: int, f: int, rule: str):
        self.step, self.rejected, self.f = step, rejected, f
        super().__init__(
            f"fail closed: at step {step} {rule} rejected {rejected} rows, more than the f={f} "
            "Byzantine workers the run assumes; the run stopped before saving that chunk (the "
            "last checkpoint holds the state before it). Raise workers.f if more workers may "
            "be faulty, or set diagnostics.fail_closed = false to log and go on.")


def _rows(leaf: jax.Array) -> jax.Array:
    return jnp.reshape(leaf, (leaf.shape[0], -1)).astype(jnp.float32)


def coordinates_below(stacked, z: Sequence[float]) -> jax.Array:
    """``[len(z)]`` counts of coordinates with ``|mu_j| < z sigma_j`` over the rows.

    Args:
      stacked: pytree, every leaf ``[n, ...]`` (the workers' gradients).
      z: the multiples of the standard deviation.

    Returns:
      int32 ``[len(z)]``.
    """
    z = jnp.asarray(z, jnp.float32)[:, None]
    total = jnp.zeros(z.shape[:1], jnp.int32)
    for leaf in jax.tree.leaves(stacked):
        x = _rows(leaf)
        mu, sigma = jnp.mean(x, axis=0), jnp.std(x, axis=0)
        total += jnp.sum(jnp.abs(mu)[None] < z * sigma[None], axis=1, dtype=jnp.int32)
    return total


def changed_rows(before, after) -> jax.Array:
    """``[n]`` bool: the rows where ``after`` differs from ``before`` (NaN equals NaN)."""
    changed = None
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        a, b = _rows(a), _rows(b)
        differ = jnp.any(~((a == b) | (jnp.isnan(a) & jnp.isnan(b))), axis=1)
        changed = differ if changed is None else changed | differ
    return changed


def byzantine_share(update, updates, byzantine: jax.Array, *, epsilon: float = 1e-3):
    """Runs ``update(updates) -> (out, aux)`` and measures the Byzantine rows' share of ``out``.

    ``share = W_B / W_all`` with ``W_S = sum_j (out(u + h 1_S) - out(u))_j / h``: how far the
    output moves when the rows of ``S`` move by ``h`` in every coordinate (``h`` is ``epsilon``
    times each leaf's root-mean-square entry). That is ``f/n`` for the mean; for Krum 1 when it
    picks a Byzantine row, else 0; for Multi-Krum the Byzantine fraction of the rows it
    averages; for the median the fraction of coordinates whose median is a Byzantine value.
    Differences rather than derivatives: forward or reverse mode through a sorting network takes
    minutes to compile, two more evaluations of the rule do not. Non-finite differences, from
    hostile rows, count as zero. A selection that an exact tie decides may flip under the
    shift; the share of that step is then off (``nan`` when the output moved backwards).

    Returns:
      ``(out, aux, share)``; ``share`` is ``nan`` when the output does not move with its input
      (a sign vote).
    """
    out, aux = update(updates)

    def finite(x):
        return jnp.where(jnp.isfinite(x), x, 0.0)

    steps = [epsilon * jnp.sqrt(jnp.mean(finite(leaf.astype(jnp.float32)) ** 2)) + 1e-30
             for leaf in jax.tree.leaves(updates)]

    def moved(rows):
        leaves, treedef = jax.tree.flatten(updates)
        shifted = [leaf + jnp.reshape(rows, (-1, *([1] * (leaf.ndim - 1)))).astype(leaf.dtype)
                   * h.astype(leaf.dtype) for leaf, h in zip(leaves, steps)]
        new, _ = update(jax.tree.unflatten(treedef, shifted))
        # Leaf by leaf of the output, scaled by its own input leaf's step (same structure).
        diffs = [finite((a.astype(jnp.float32) - b.astype(jnp.float32)) / h)
                 for a, b, h in zip(jax.tree.leaves(new), jax.tree.leaves(out), steps)]
        return sum(jnp.sum(d) for d in diffs)

    on_byzantine = moved(byzantine.astype(jnp.float32))
    on_all = moved(jnp.ones(byzantine.shape, jnp.float32))
    share = jnp.where(on_all > 0, on_byzantine / jnp.where(on_all > 0, on_all, 1.0),
                      jnp.float32(np.nan))
    return out, aux, jnp.clip(share, 0.0, 1.0).astype(jnp.float32)


def inspected_update(stages: Stages, updates, state: tuple, params):
    """``optax.chain(*stages.transforms).update`` run part by part, looking inside.

    Returns:
      ``(updates, state, detection)``: the chain's output and new state (the same
      computation as the chain's), and a dict for this step, the Byzantine rows being those
      the attack changed: ``byzantine_share`` (float32), ``byzantine_kept`` and ``rejected``
      (int32, ``-1`` unless the aggregation reports its selection). A reporting aggregation
      (``AggregateState.selection``) gives all three from its own pass; otherwise the share is
      :func:`byzantine_share`'s.
    """
    states = list(state)
    x = updates
    byzantine = None
    detection = None
    for i, tx in enumerate(stages.transforms):
        if i == stages.aggregate:
            if byzantine is None:
                byzantine = jnp.zeros(jax.tree.leaves(x)[0].shape[:1], bool)
            if getattr(states[i], "selection", None) is not None:
                x, states[i] = tx.update(x, states[i], params)
                selection = states[i].selection
                detection = {"byzantine_share": selection.weight_of(byzantine),
                             "byzantine_kept": selection.kept_among(byzantine),
                             "rejected": selection.rejected()}
                continue
            x, states[i], share = byzantine_share(
                lambda u, s=states[i], t=tx: t.update(u, s, params), x, byzantine)
            detection = {"byzantine_share": share, "byzantine_kept": jnp.int32(-1),
                         "rejected": jnp.int32(-1)}
            continue
        before = x
        x, states[i] = tx.update(x, states[i], params)
        if i == stages.attack:
            byzantine = changed_rows(before, x)
    return x, tuple(states), detection


__all__ = ("FailClosed", "Z", "byzantine_share", "changed_rows", "column", "columns",
           "coordinates_below", "inspected_update")
