"""Spectral rules: weight or select rows by the top eigenvalue of their covariance, CAF and SMEA.

Both rules only need the spectrum of an empirical covariance ``Sigma = (1/m) Y^T W Y`` of
centred rows ``Y``, never a ``d x d`` matrix: its nonzero eigenvalues are those of the ``n x n``
matrix ``W^{1/2} (Y Y^T) W^{1/2} / m``, and ``Y Y^T`` follows from the whole-update Gram matrix
``G`` of the rows (centred at any point: ``Y Y^T = (I - 1 w^T) G (I - w 1^T)`` for centring
weights ``w``). ``G`` is summed over the leaves (and over the coordinate slices, through
``rbyz._src.reductions``) once; everything after it is ``n x n`` work, so both rules run on a
slice of the coordinates and cost one Gram matrix plus ``eigh`` of small matrices.

Rows holding NaN/Inf, or whose centred squared norm overflows the accumulation dtype, are
hostile: CAF gives them weight 0 from the start (the limit of the filter as a row goes to
infinity: it is the first row the filter removes, and the means it sees meanwhile have infinite
covariance), SMEA gives every subset holding one an infinite eigenvalue.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import distances
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection

# Above this many candidate subsets, SMEA's exhaustive search is refused: each subset costs an
# eigendecomposition of an n x n matrix (C(25, 5) = 53,130 subsets take about a second here).
SMEA_MAX_SUBSETS = 100_000
SMEA_METHODS = ("exact", "filter", "auto")

_ALLOUAH_TRILEMMA = _spec.Reference(
    "Allouah, Guerraoui, Gupta, Pinot, Stephan",
    "On the Privacy-Robustness-Utility Trilemma in Distributed Learning", "ICML", 2023)
_ALLOUAH_CAF = _spec.Reference(
    "Allouah, Guerraoui, Stephan",
    "Towards Trustworthy Federated Learning with Untrusted Participants", "ICML", 2025)


def _gram(updates) -> tuple[jax.Array, jax.Array]:
    """``(G, ok)``: the ``[n, n]`` whole-update Gram matrix of the rows centred at their per-leaf
    coordinate-wise median, scaled by a power of two so that its largest entry is below 1 (exact;
    eigenvalue orders and weight ratios do not depend on the scale), with the rows and columns of
    hostile rows set to 0; ``ok[i]`` whether row ``i`` is not hostile."""
    dtype = reductions.accumulation_dtype(updates)
    gram = reductions.total(functools.reduce(
        jnp.add, (distances.leaf_gram(leaf, dtype) for leaf in jax.tree.leaves(updates))))
    gram = (gram + gram.T) / 2  # a product need not round G[i, j] and G[j, i] alike
    ok = jnp.isfinite(jnp.diagonal(gram))
    gram = jnp.where(ok[:, None] & ok[None, :], gram, 0.0)
    _, exponent = jnp.frexp(jnp.max(jnp.abs(gram)))
    return jnp.ldexp(gram, -exponent), ok


def _centred(gram: jax.Array, weights: jax.Array) -> jax.Array:
    """``[n, n]`` Gram matrix of the rows centred at their ``weights``-mean (weights sum to 1)."""
    gw = gram @ weights
    return gram - gw[:, None] - gw[None, :] + weights @ gw


# ------------------------------------------------------------------------------------------------
# Covariance-bound Agnostic Filter.


def _caf_weights(gram: jax.Array, ok: jax.Array, f: int) -> jax.Array:
    """``[n]``: the filter weights ``c`` whose mean had the smallest top covariance eigenvalue."""
    n = gram.shape[0]
    floor = n - 2 * f

    def step(_, carry):
        c, best, best_lam = carry
        total = jnp.sum(c)
        running = total > floor
        safe = jnp.where(total > 0, total, 1.0)  # no weight left (every row hostile): no NaN
        centred = _centred(gram, c / safe)
        root = jnp.sqrt(c)
        evals, evecs = jnp.linalg.eigh(root[:, None] * centred * root[None, :] / safe)
        lam, top = evals[-1], evecs[:, -1]
        # (x_i - mu_c) . v is proportional to (Y Y^T W^{1/2} u)_i; only tau's ratios matter.
        tau = jnp.square(centred @ (root * top))
        tau_max = jnp.max(jnp.where(c > 0, tau, 0.0))
        ratio = jnp.where(tau_max > 0, tau / jnp.where(tau_max > 0, tau_max, 1.0), 0.0)
        # The row of largest tau must reach weight exactly 0 (XLA may divide by multiplying with
        # a rounded reciprocal), or it would linger with a tiny weight and take a later step.
        ratio = jnp.where((tau_max > 0) & (tau >= tau_max), 1.0, ratio)
        better = running & (lam < best_lam)
        best = jnp.where(better, c, best)
        best_lam = jnp.where(better, lam, best_lam)
        c = jnp.where(running, c * jnp.clip(1.0 - ratio, 0.0, 1.0), c)
        return c, best, best_lam

    c = ok.astype(gram.dtype)
    # Each running step zeroes the active row of largest tau, and the loop stops once at most
    # n - 2f rows have weight: 2f steps always suffice (later ones change nothing).
    _, best, _ = jax.lax.fori_loop(0, 2 * f, step, (c, c, jnp.array(jnp.inf, gram.dtype)))
    return best


@_spec.declare(
    "aggregator", reports=True, coordinate_slices=True, constraint=_spec.MAJORITY,
    cost="O(n^2 d + f n^3)", reference=_ALLOUAH_CAF,
    note="The top eigenvector is exact (eigh of the n x n weighted centred Gram matrix) where "
         "ByzFL takes one power-method step from a random vector, which makes its CAF random "
         "and approximate; tau_max is the largest tau among rows of positive weight (the "
         "filter of Diakonikolas et al. that CAF builds on), which zeroes one row per step and "
         "bounds the loop by 2f steps; ByzFL takes it over all rows, zero-weight ones included. "
         "With f = 0 the filter does not run and the result is the mean.",
)
def caf(updates, *, f: int, report: bool = False):
    """Covariance-bound Agnostic Filter: down-weight rows along the top covariance direction.

    Weights ``c_i = 1``; while ``sum_i c_i > n - 2f``: ``mu_c = sum_i c_i x_i / sum_i c_i``,
    ``Sigma_c = sum_i c_i (x_i - mu_c)(x_i - mu_c)^T / sum_i c_i`` with top eigenpair
    ``(lambda, v)``, ``tau_i = ((x_i - mu_c)^T v)^2``,
    ``c_i <- c_i (1 - tau_i / max_{j: c_j > 0} tau_j)``. Returns the ``mu_c`` of the smallest
    ``lambda`` met (the first on ties). Each step zeroes one row, so it stops within ``2f``
    steps, the static loop bound. The eigenpair comes exactly from ``eigh`` of the ``n x n``
    matrix ``W^{1/2} Y Y^T W^{1/2} / sum c`` (same nonzero spectrum as ``Sigma_c``), never from a
    ``d x d`` matrix. Needs ``n > 2f``. Rows holding NaN/Inf (or whose squared norm overflows)
    start with weight 0, the limit of the filter as a row goes to infinity (it is removed first,
    and the means before have infinite covariance); the output is a weighted mean of the other
    rows.

    Variants (see the declaration's note): ByzFL approximates ``v`` with one power step from a
    random vector and takes ``max_j tau_j`` over all rows; here ``v`` is exact and the maximum
    runs over rows of positive weight.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [1.2, 0.2], [0.8, -0.2], [1.0, 0.2], [9.0, -9.0]])
      >>> caf(g, f=1).round(3)  # the far row gets weight 0, the others nearly 1
      Array([1.  , 0.05], dtype=float32)

    References:
      Allouah, Guerraoui, Stephan, `Towards Trustworthy Federated Learning with Untrusted
      Participants`, ICML 2025 (Algorithm 2).
    """
    n, f = _common.workers_and_f(updates, f, caf.spec)
    gram, ok = _gram(updates)
    weights = _caf_weights(gram, ok, f)
    out = _common.weighted_mean(updates, weights, jnp.sum(weights))
    return _selection.returning(_common.cast_like(out, updates), report, weights)


# ------------------------------------------------------------------------------------------------
# Smallest Maximum Eigenvalue Averaging.


@functools.cache
def _kept_sets(n: int, f: int) -> np.ndarray:
    """``[C(n, f), n]`` bool: every mask keeping ``n - f`` rows, removed sets in lexicographic
    order."""
    kept = np.ones((math.comb(n, f), n), bool)
    for k, removed in enumerate(itertools.combinations(range(n), f)):
        kept[k, list(removed)] = False
    return kept


def _spreads(gram: jax.Array, ok: jax.Array, kept: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``([S], [S])``: the top eigenvalue and the trace of the empirical covariance of the rows of
    each mask of ``kept`` ``[S, n]``; ``+inf`` for a mask holding a hostile row."""
    n = gram.shape[0]

    def spread(mask):
        m = jnp.sum(mask.astype(gram.dtype))
        inside = mask[:, None] & mask[None, :]
        centred = jnp.where(inside, _centred(gram, mask.astype(gram.dtype) / m), 0.0) / m
        lam = jnp.linalg.eigvalsh(centred)[-1]
        hostile = jnp.any(mask & ~ok)
        return (jnp.where(hostile, jnp.inf, lam),
                jnp.where(hostile, jnp.inf, jnp.trace(centred)))

    return jax.lax.map(spread, kept, batch_size=max(1, min(kept.shape[0], (1 << 20) // (n * n))))


def _smea_exact(gram: jax.Array, ok: jax.Array, f: int) -> jax.Array:
    kept = jnp.asarray(_kept_sets(gram.shape[0], f))
    lam, trace = _spreads(gram, ok, kept)
    return kept[jnp.lexsort((trace, lam))[0]]


def _smea_filter(gram: jax.Array, ok: jax.Array, f: int) -> jax.Array:
    """``f`` times, leave out the kept row farthest from the kept rows' mean along their top
    covariance direction (hostile rows first, the lowest index among them). With the centred
    Gram matrix ``K = Y Y^T`` of the kept rows and its top eigenvector ``u``, the projection of
    row ``i`` on ``Sigma``'s top eigenvector is ``sqrt(lambda_K) u_i``: the row of largest
    ``u_i^2`` goes (equal values: the lower index)."""
    n = gram.shape[0]
    index = jnp.arange(n)

    def remove_one(_, kept):
        m = jnp.sum(kept.astype(gram.dtype))
        inside = kept[:, None] & kept[None, :]
        centred = jnp.where(inside, _centred(gram, kept.astype(gram.dtype) / m), 0.0)
        score = jnp.square(jnp.linalg.eigh(centred)[1][:, -1])
        hostile = kept & ~ok
        score = jnp.where(jnp.any(hostile), hostile.astype(gram.dtype), score)
        score = jnp.where(kept, score, -1.0)
        winner = jnp.lexsort((index, -score))[0]
        return kept & (index != winner)

    return jax.lax.fori_loop(0, f, remove_one, jnp.ones((n,), bool))


def _smea_kept(updates, f: int, method: str) -> jax.Array:
    """``[n]`` bool: the ``n - f`` rows SMEA averages (``method`` already resolved)."""
    gram, ok = _gram(updates)
    return (_smea_exact if method == "exact" else _smea_filter)(gram, ok, f)


def _smea_method(n: int, f: int, method: str) -> str:
    """``"exact"`` or ``"filter"`` for ``method``, else ``ValueError`` naming SMEA."""
    _common.check_choice(method, "smea", "method", SMEA_METHODS)
    subsets = math.comb(n, f)
    if method == "auto":
        return "exact" if subsets <= SMEA_MAX_SUBSETS else "filter"
    checks.require(
        method == "filter" or subsets <= SMEA_MAX_SUBSETS,
        "smea",
        f"method='exact' searches all C(n, f) subsets; got n={n}, f={f}: C(n, f) = {subsets} > "
        f"{SMEA_MAX_SUBSETS}. Use method='filter' (f spectral-filter removals, O(f n^3)) or "
        "method='auto' (exact under the cap, filter above), or assume fewer Byzantine workers.",
    )
    return method


@_spec.declare(
    "aggregator", reports=True, coordinate_slices=True, constraint=_spec.MAJORITY,
    cost="O(n^2 d + C(n,f) n^3) exact, O(n^2 d + f n^3) filter", reference=_ALLOUAH_TRILEMMA,
    note="method='exact' (default) is the paper's rule, searched over the C(n, f) subsets with "
         "exact eigenvalues (ByzFL: one random power step per subset) and refused above "
         "SMEA_MAX_SUBSETS; method='filter' is rbyz's polynomial approximation (f removals of "
         "the row farthest along the top covariance direction); equal eigenvalues go to the "
         "smaller trace.",
)
def smea(updates, *, f: int, method: str = "exact", report: bool = False):
    """Smallest Maximum Eigenvalue Averaging: the mean of the ``n - f`` rows of least spread.

    ``agg = (1/(n-f)) sum_{i in S*} x_i`` with
    ``S* = argmin_{|S| = n-f} lambda_max(Sigma_S)``,
    ``Sigma_S = (1/|S|) sum_{i in S} (x_i - mu_S)(x_i - mu_S)^T``. Each subset's
    ``lambda_max`` is the top eigenvalue of its ``(n-f) x (n-f)`` centred Gram matrix divided by
    ``n - f``, all taken from the whole-update Gram matrix computed once. Equal eigenvalues go to
    the subset of smaller trace (total variance), so that the workers' order does not decide.
    Needs ``n > 2f``. A subset holding a row with NaN/Inf (or whose squared norm overflows) has
    an infinite eigenvalue, so with at most ``f`` such rows none is averaged.

    ``method="exact"`` searches every subset (``C(n, f) <= SMEA_MAX_SUBSETS``, else
    ``ValueError``); ``"filter"`` removes ``f`` rows one at a time, each time the row farthest
    from the kept rows' mean along their top covariance direction (hostile rows first), in
    ``O(f n^3)`` after the Gram matrix; ``"auto"`` is exact under the cap and the filter above.
    The filter's subset is not guaranteed optimal. Measured against the exact rule
    (``tests/test_aggregators_spectral.py``: lambda_max of the filter's subset over the optimum,
    24 problems each with n = 8 to 12, f = 3 to 5, d = 12): exact on f far rows (10 sigma from
    the mean); on Gaussian rows without outliers a median ratio of 1.00 and a worst of 1.31;
    with f rows at 3 sigma, inside the honest cloud, a median of 1.00 and a worst of 1.15.
    Removing instead the row whose removal leaves the smallest lambda_max (a greedy search on
    the objective itself, ``O(f n^4)``) is worse: it keeps outliers that sit in orthogonal
    directions, since removing one of them barely lowers lambda_max while the others remain.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f``.
      method: ``"exact"`` (the paper's rule), ``"filter"`` or ``"auto"``.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [5.0, 5.0], [9.0, -9.0]])
      >>> smea(g, f=2)
      Array([0.06666667, 0.06666667], dtype=float32)
      >>> smea(g, f=2, method="filter")
      Array([0.06666667, 0.06666667], dtype=float32)

    References:
      Allouah, Guerraoui, Gupta, Pinot, Stephan, `On the Privacy-Robustness-Utility Trilemma in
      Distributed Learning`, ICML 2023.
    """
    n, f = _common.workers_and_f(updates, f, smea.spec)
    method = _smea_method(n, f, method)
    weights = _smea_kept(updates, f, method).astype(jnp.float32)
    return _selection.returning(
        _common.cast_like(_common.weighted_mean(updates, weights, n - f), updates), report, weights)
