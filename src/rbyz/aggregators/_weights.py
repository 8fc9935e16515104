"""Per-worker weights for the weighted rules: validation and weighted order statistics.

Federated clients hold different amounts of data; the rules declared ``weights=True`` take a
non-negative ``[n]`` array ``w`` (e.g. the clients' sample counts) as ``weights=``, a per-step
input like the key (traced, may change every step), never a static hyperparameter.

Validation (:func:`prepare`): a wrong shape is a ``ValueError`` at trace time; concrete weights
(NumPy arrays, Python lists, JAX arrays outside ``jit``) that are negative, non-finite or all
zero are a ``ValueError`` too. Traced weights cannot be checked before the run, so they are made
safe instead: a negative or non-finite entry counts as weight 0 (a worker can neither flip the
sign of its contribution nor poison the total), and when every weight is then 0 the rule returns
NaN (there is nothing to aggregate; a silent fallback would hide the bug).

Weighted order statistics sort each coordinate's values together with their workers' weights
(compare-exchange networks carrying the weights for ``n <= order_stats.NETWORK_MAX_ROWS``,
``lax.sort`` with the weights as a payload beyond), NaN mapped to ``+inf`` first as in the
unweighted kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import order_stats
from rbyz._src import tree as tree_util


def prepare(weights, n: int, rule: str, dtype) -> jax.Array:
    """``weights`` as a float ``[n]`` array in ``dtype`` with invalid entries set to 0.

    Args:
      weights: ``[n]`` non-negative per-worker weights (traced values allowed).
      n: the worker count of the updates.
      rule: the public name of the calling rule, for error messages.
      dtype: the accumulation dtype of the rule (float32, or float64 for float64 updates).

    Raises:
      ValueError: the shape is not ``(n,)``, the dtype is not real, or concrete weights are
        negative, non-finite or all zero.
    """
    shape = jnp.shape(weights)
    checks.require(
        shape == (n,), rule,
        f"weights must have shape (n,) = ({n},), one per worker; got shape {shape}. Pass one "
        "non-negative weight per row of the stacked updates.",
    )
    kind = jnp.result_type(weights)
    checks.require(
        jnp.issubdtype(kind, jnp.integer) or jnp.issubdtype(kind, jnp.floating)
        or kind == jnp.bool_, rule,
        f"weights must be real numbers (e.g. sample counts); got dtype {kind}.",
    )
    try:
        concrete = np.asarray(weights, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None:
        bad = np.flatnonzero(~np.isfinite(concrete) | (concrete < 0))
        checks.require(
            bad.size == 0, rule,
            f"weights must be finite and >= 0; got {concrete[bad].tolist()} at worker(s) "
            f"{bad.tolist()}. Give excluded workers weight 0.",
        )
        checks.require(
            concrete.sum() > 0, rule,
            "weights are all zero; at least one worker needs a positive weight (pass "
            "weights=None for the unweighted rule).",
        )
    w = jnp.asarray(weights).astype(dtype)
    return jnp.where(jnp.isfinite(w) & (w > 0), w, jnp.zeros((), dtype))


def nan_if_empty(result, weights: jax.Array):
    """``result`` with every leaf NaN where the (prepared) weights sum to 0."""
    empty = jnp.sum(weights) <= 0
    return jax.tree.map(lambda out: jnp.where(empty, jnp.array(jnp.nan, out.dtype), out), result)


def sorted_rows_with_weights(x: jax.Array, weights: jax.Array):
    """``(values, weights)``: the rows of ``x`` sorted coordinate-wise (NaN last), and for each
    sorted value the weight of the worker it came from.

    Args:
      x: ``[n, ...]``.
      weights: ``[n]``.

    Returns:
      Two lists of ``n`` arrays of shape ``x.shape[1:]``; the weights in ``weights.dtype``.
    """
    n = x.shape[0]
    row_shape = x.shape[1:]
    if n > order_stats.NETWORK_MAX_ROWS:
        w = jnp.broadcast_to(weights.reshape((n,) + (1,) * len(row_shape)), x.shape)
        values, carried = jax.lax.sort((order_stats.sanitize(x), w), dimension=0, num_keys=1)
        return tree_util.rows(values), tree_util.rows(carried)
    values = [order_stats.sanitize(row) for row in tree_util.rows(x)]
    carried = [jnp.broadcast_to(weights[i], row_shape) for i in range(n)]
    for a, b in order_stats.batcher_pairs(n):
        swap = values[b] < values[a]
        values[a], values[b] = jnp.minimum(values[a], values[b]), jnp.maximum(values[a], values[b])
        carried[a], carried[b] = (jnp.where(swap, carried[b], carried[a]),
                                  jnp.where(swap, carried[a], carried[b]))
    return values, carried


def _below_and_above(ws: list[jax.Array]):
    """Per rank ``r``: ``(sum_{j<r} ws[j], sum_{j>r} ws[j])``, each summed from its own end, so
    that equal weights give bit-equal sums for equal counts of terms."""
    n = len(ws)
    zero = jnp.zeros_like(ws[0])
    below, above = [zero] * n, [zero] * n
    for r in range(1, n):
        below[r] = ws[r - 1] if r == 1 else below[r - 1] + ws[r - 1]
    for r in range(n - 2, -1, -1):
        above[r] = ws[r + 1] if r == n - 2 else above[r + 1] + ws[r + 1]
    return below, above


def median(x: jax.Array, weights: jax.Array, even: str = "midpoint") -> jax.Array:
    """Coordinate-wise weighted median over axis 0 (see ``rbyz.aggregators.median``).

    Lower weighted median: the smallest sorted value ``s_(r)`` whose cumulative weight
    ``sum_{j<=r} w_(j)`` reaches the weight above it, ``sum_{j>r} w_(j)`` (that is, half the
    total); upper: the largest ``s_(r)`` with ``sum_{j>=r} w_(j) >= sum_{j<r} w_(j)``. They
    differ only when the cumulative weight hits exactly half at a boundary; ``even`` then picks
    the midpoint, the lower or the upper one, as the unweighted median does for an even count.
    """
    acc = tree_util.accumulation_dtype(x.dtype)
    s, ws = sorted_rows_with_weights(x, weights.astype(acc))
    n = len(s)
    below, above = _below_and_above(ws)
    lower, upper = s[n - 1], s[0]
    for r in range(n - 2, -1, -1):
        lower = jnp.where(below[r] + ws[r] >= above[r], s[r], lower)
    for r in range(1, n):
        upper = jnp.where(above[r] + ws[r] >= below[r], s[r], upper)
    if even == "lower":
        return lower
    if even == "upper":
        return upper
    mid = ((lower.astype(acc) + upper.astype(acc)) / 2).astype(x.dtype)
    return jnp.where(lower == upper, lower, mid)


def trimmed_mean(x: jax.Array, weights: jax.Array, f: int) -> jax.Array:
    """Coordinate-wise weighted trimmed mean over axis 0, trimming ``f / n`` of the total weight
    from each side (see ``rbyz.aggregators.trimmed_mean``).

    With ``T = (f / n) W`` and the sorted values' weights ``w_(r)``, value ``r`` keeps
    ``k_r = w_(r) - clip(T - sum_{j<r} w_(j), 0, w_(r)) - clip(T - sum_{j>r} w_(j), 0, w_(r))``
    and the result is ``sum_r k_r s_(r) / sum_r k_r``. A kept weight below ``4 n eps W`` (the
    rounding error of the weight sums) is dropped, so that rounding never leaks a sliver of
    weight onto a fully trimmed (possibly hostile) value.
    """
    n = x.shape[0]
    acc = tree_util.accumulation_dtype(x.dtype)
    weights = weights.astype(acc)
    s, ws = sorted_rows_with_weights(x, weights)
    below, above = _below_and_above(ws)
    total = jnp.sum(weights)
    trim = total * f / n
    tol = 4 * n * jnp.finfo(acc).eps * total
    kept = []
    for r in range(n):
        k = ws[r] - jnp.clip(trim - below[r], 0, ws[r]) - jnp.clip(trim - above[r], 0, ws[r])
        kept.append(jnp.where(k > tol, k, jnp.zeros((), acc)))
    numer = tree_util.sum_rows([jnp.where(k != 0, k * v.astype(acc), 0) for k, v in zip(kept, s)])
    denom = tree_util.sum_rows(kept)
    return (numer / denom).astype(x.dtype)
