"""Rules that judge the workers part by part: per layer (LASA) or per chunk of coordinates (GAS).

A Byzantine update can look ordinary as a whole and still be abnormal in one layer, or hide in
the noise of a high-dimensional distance. :func:`lasa` sparsifies every update, then keeps in
each layer (each pytree leaf) the workers whose layer norm and layer sign balance are typical,
and averages them layer by layer. :func:`gas` splits the coordinates into ``p`` chunks, lets a
robust base rule (Krum by default) aggregate each chunk, scores every worker by its summed
distance to those chunk aggregates and averages the ``n - f`` best-scored workers.

Hostile rows: a row holding NaN/Inf, or whose norm overflows the accumulation dtype, never
reaches the output: LASA leaves it out of every statistic and every mean; in GAS its distance to
a chunk aggregate is infinite, so it is scored last.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection


def _leaf_rows(leaf, dtype) -> jax.Array:
    """``[n, size]`` rows of one leaf in ``dtype`` (also for empty leaves)."""
    return leaf.reshape(leaf.shape[0], math.prod(leaf.shape[1:])).astype(dtype)


# ------------------------------------------------------------------------------------------------
# LASA.


def _kth_largest(rows: list[jax.Array], valid: jax.Array, k: int) -> jax.Array:
    """``[n]``: each row's ``k``-th largest ``|value|`` over all its leaves (0 for rows not
    ``valid``), without joining the leaves.

    Non-negative floats order as their bit patterns do, so the threshold is found by bisection
    over the bits: ``count(|x| >= t) >= k`` holds for ``t = 0`` and fails for ``t = inf``, and
    each of the 31 (float32) or 63 (float64) halvings is one counting pass over the leaves.
    That costs a few passes over memory, where a sort of every row costs ``O(d log d)``.
    """
    dtype = rows[0].dtype
    ints = jnp.int64 if dtype == jnp.float64 else jnp.int32
    # The bit pattern of +inf, a static number (the loop's length), computed in NumPy: a jnp
    # value would be staged out under jit.
    infinity = int(np.array(np.inf, jnp.dtype(dtype)).view(jnp.dtype(ints)))
    magnitudes = [jnp.where(valid[:, None], jnp.abs(r), 0.0) for r in rows]

    def count(threshold_bits):
        threshold = jax.lax.bitcast_convert_type(threshold_bits, dtype)[:, None]
        return sum(jnp.sum(m >= threshold, axis=1, dtype=jnp.int32) for m in magnitudes)

    def halve(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        enough = count(middle) >= k
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    n = valid.shape[0]
    bounds = (jnp.zeros((n,), ints), jnp.full((n,), infinity, ints))
    steps = infinity.bit_length()
    low, _ = jax.lax.fori_loop(0, steps, halve, bounds)
    return jax.lax.bitcast_convert_type(low, dtype)


def _masked_median(values: jax.Array, valid: jax.Array, even: str) -> jax.Array:
    """Median of the ``valid`` entries of ``[n]`` values (``"midpoint"`` or ``"lower"``)."""
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
    count = jnp.maximum(jnp.sum(valid.astype(jnp.int32)), 1)
    low = ordered[(count - 1) // 2]
    return low if even == "lower" else (low + ordered[count // 2]) / 2


def _mz_kept(values: jax.Array, valid: jax.Array, bound: float) -> jax.Array:
    """``[n]`` bool: the valid rows whose MZ-score ``|x_i - median| / std`` (over the valid
    rows, population std) is below ``bound``; all valid rows when the std is 0."""
    dtype = values.dtype
    values = jnp.where(valid, values, 0.0)
    count = jnp.maximum(jnp.sum(valid.astype(dtype)), 1.0)
    middle = _masked_median(values, valid, "midpoint")
    mean = jnp.sum(values) / count
    std = jnp.sqrt(jnp.sum(jnp.where(valid, jnp.square(values - mean), 0.0)) / count)
    score = jnp.where(std > 0, jnp.abs(values - middle) / jnp.where(std > 0, std, 1.0), 0.0)
    return valid & (score < bound)


@_spec.declare(
    "aggregator", coordinate_slices=False, constraint=_spec.MAJORITY, cost="O(n d)",
    reference=_spec.Reference(
        "Xu, Zhang, Hu",
        "Achieving Byzantine-Resilient Federated Learning via Layer-Adaptive Sparsified Model "
        "Aggregation", "WACV", 2025),
    note="Follows the authors' code (JiiahaoXU/LASA, algorithms/defense/lasa.py): clipping to "
         "the median norm (torch's lower median), one top-k over the whole update, MZ-score "
         "|x - median| / std (np.median, population np.std) on each layer's norm and sign "
         "balance, strict bounds, the mean of the clipped and sparsified rows (the code "
         "sparsifies the clipped updates in place, so those are what it averages; FLPoison's "
         "copy averages the dense clipped rows instead). Defaults sparsity=0.3, lambda_n=1, "
         "lambda_s=1 are the code's. Differences: every leaf is sparsified (the code "
         "sparsifies only 2-D and 4-D parameters, leaving biases dense); top-k keeps the k "
         "largest magnitudes with ties (the code keeps those strictly above the k-th, k - 1 "
         "values); the sign balance is sum(sgn) / sum(|sgn|), 0 for an all-zero layer (the "
         "code's 0.5 (1 + (1 - sparsity) sum(sgn) / sum(|sgn|)) is an affine map of it, which "
         "MZ-scores do not see; the code gets NaN for an all-zero layer); a statistic equal for "
         "all rows (zero std) filters nothing (the code divides by zero, keeps no row and falls "
         "back to all). Rows holding NaN/Inf or whose norm overflows are left out of every "
         "statistic and mean (the code drops rows holding NaN).",
)
def lasa(updates, *, f: int, sparsity: float = 0.3, lambda_n: float = 1.0,
         lambda_s: float = 1.0):
    """LASA: top-k sparsification, then a per-layer MZ-score filter on norms and signs.

    With ``M`` the (lower) median of the whole-update norms, every row is clipped,
    ``c_i = g_i min(1, M / ||g_i||)``, and sparsified, ``s_i = c_i * [|g_i| >= t_i]`` with
    ``t_i`` the ``k``-th largest ``|g_ij|`` over all coordinates, ``k = int(d (1 -
    sparsity))``. In each leaf ``l`` (a layer), with ``MZ(x)_i = |x_i - median(x)| / std(x)``
    over the rows, the rows kept are ``S_l = {i : MZ(||s_i^l||)_i < lambda_n and
    MZ(rho^l)_i < lambda_s}`` with the sign balance ``rho_i^l = sum sgn(s_i^l) / sum
    |sgn(s_i^l)|``; ``S_l`` is all rows if that is empty. The output is, leaf by leaf,
    ``mean_{i in S_l} s_i^l``: each layer averages its own rows. Needs ``n > 2f``; ``f`` is
    used for the check only. Identical rows of values ``-1, 0, 1`` aggregate to themselves (the
    ties at the threshold are kept); other identical rows aggregate to their top-k part.

    Rows holding NaN/Inf (or whose norm overflows) are left out of the median, of the
    statistics and of every mean. Each layer of the output has norm at most ``M`` (the whole
    output at most ``sqrt(L) M`` over ``L`` layers, since each layer keeps its own rows), and
    ``M`` is at most the largest honest norm when ``n > 2f``. Cost: 31 (float32) or 63
    (float64) counting passes over the updates find the top-k thresholds, then one pass per
    statistic. Not available with ``layout="coordinates"``: the top-k spans every coordinate.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]`` (one leaf per layer).
      f: number of Byzantine workers, ``n > 2f`` (used for the check only).
      sparsity: fraction of each update's coordinates set to zero, in ``[0, 1)`` (0: none).
      lambda_n: filtering radius ``lambda_n > 0`` of the norms' MZ-scores.
      lambda_s: filtering radius ``lambda_s > 0`` of the sign balances' MZ-scores.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"w": jnp.array([[1.0, 2.0, 0.1], [2.0, 1.0, -0.1], [1.0, 2.0, -0.1],
      ...                      [2.0, 1.0, 0.1], [-2.0, -1.0, 0.1]])}
      >>> lasa(g, f=2)["w"]  # the last row's signs are atypical; top-k drops the small values
      Array([1.5, 1.5, 0. ], dtype=float32)

    References:
      Xu, Zhang, Hu, `Achieving Byzantine-Resilient Federated Learning via Layer-Adaptive
      Sparsified Model Aggregation`, WACV 2025.
    """
    n, f = _common.workers_and_f(updates, f, lasa.spec)
    checks.require(isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0, "lasa",
                   f"needs 0 <= sparsity < 1 (the fraction of coordinates zeroed); got "
                   f"sparsity={sparsity!r}.")
    _common.check_positive(lambda_n, "lasa", "lambda_n")
    _common.check_positive(lambda_s, "lasa", "lambda_s")
    dtype = reductions.accumulation_dtype(updates)
    leaves, treedef = jax.tree.flatten(updates)
    rows = [_leaf_rows(leaf, dtype) for leaf in leaves]
    norms = jnp.sqrt(reductions.row_sq_norms(updates))
    valid = jnp.isfinite(norms)
    bound = _masked_median(norms, valid, "lower")
    scales = jnp.where(norms > bound, bound / jnp.where(norms > 0, norms, 1.0), 1.0)
    scales = jnp.where(valid, scales, 0.0)
    total = sum(r.shape[1] for r in rows)
    keep = int(total * (1.0 - sparsity))
    if sparsity > 0 and total > 0:
        threshold = _kth_largest(rows, valid, max(keep, 1))[:, None]
    else:
        threshold = jnp.zeros((n, 1), dtype)
    out = []
    for leaf, r in zip(leaves, rows):
        sparse = jnp.where(valid[:, None] & (jnp.abs(r) >= threshold), r, 0.0)
        layer_norms = scales * jnp.sqrt(jnp.sum(jnp.square(sparse), axis=1))
        positive = jnp.sum(sparse > 0, axis=1).astype(dtype)
        negative = jnp.sum(sparse < 0, axis=1).astype(dtype)
        nonzero = positive + negative
        balance = jnp.where(nonzero > 0, (positive - negative) / jnp.where(nonzero > 0, nonzero,
                                                                           1.0), 0.0)
        kept = _mz_kept(layer_norms, valid, lambda_n) & _mz_kept(balance, valid, lambda_s)
        kept = jnp.where(jnp.any(kept), kept, valid)
        count = jnp.maximum(jnp.sum(kept.astype(dtype)), 1.0)
        mean = tree_util.weighted_sum_rows(sparse, jnp.where(kept, scales, 0.0)) / count
        out.append(mean.reshape(leaf.shape[1:]).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------------------------------
# GAS.


# The declared constraint is the default base's (Krum's); a call with another base checks
# n > 2f and that base's own constraint instead.
GAS_CONSTRAINT = _spec.Constraint("n >= 2f + 3 (base krum)", _spec.KRUM.holds)


def _base_rule(base, f: int) -> tuple[_spec.Spec, dict]:
    """The base rule's declaration and its hyperparameters (``f`` given unless bound)."""
    try:
        declared, bound = _spec.resolve(base, "aggregator", "gas")
    except ValueError as err:
        raise ValueError(f"gas: base must be a registered aggregator or a declared one; "
                         f"{err}") from None
    if declared.state is not None:
        raise ValueError(
            f"gas: the base rule {declared.name} keeps state ({declared.state.doc}); GAS runs "
            "it afresh on every chunk of one step: use a stateless rule, e.g. base='krum' or "
            "base='median'.")
    if declared.hparams is None or "f" in declared.hparams:
        bound.setdefault("f", f)
    return declared, declared.check_hparams(bound, "gas")


def _chunk_distances(chunks: jax.Array, run) -> jax.Array:
    """``[m, n]``: each row's distance to the base rule's aggregate of each of the ``m``
    chunks ``[m, n, c]``, ``+inf`` where it is not finite."""
    centers = run(chunks)
    dist = jnp.sqrt(jnp.sum(jnp.square(chunks - centers[:, None, :]), axis=2))
    return jnp.where(jnp.isfinite(dist), dist, jnp.inf)


@_spec.declare(
    "aggregator", key=True, reports=True, coordinate_slices=False, constraint=GAS_CONSTRAINT,
    cost="O(n^2 d + p n^2 log n)",
    reference=_spec.Reference(
        "Liu, Chen, Lyu, Wu, Wu, Chen",
        "Byzantine-robust Learning on Heterogeneous Data via Gradient Splitting", "ICML", 2023),
    note="Follows the authors' code (YuchenLiu-a/byzantine-gas, server/base.py gas_aggregate): "
         "a random permutation of the coordinates every round (from the key) split as "
         "torch.chunk does into ceil(d / p)-sized chunks (fewer than p when p does not "
         "divide d), scores sum_q ||g_i^q - agg^q|| (Euclidean, not squared), the mean of the "
         "n - f lowest; p=1000 is the code's. shuffle=False splits the coordinates in the "
         "leaves' order instead (deterministic). base='krum' is Krum's selection as in the "
         "paper (rbyz.aggregators.krum); the code's 'krum' averages the n - f best Krum scores "
         "(base='multi_krum'), and its example config uses base='bulyan'. The code passes the "
         "true number of Byzantine workers; here f is the assumed one. A row whose distance to "
         "a chunk aggregate is NaN/Inf is scored last (by its number of such chunks, then its "
         "finite sum).",
)
def gas(updates, *, f: int, key=None, p: int = 1000, base="krum", shuffle: bool = True,
        report: bool = False):
    """GAS (gradient splitting): score the workers chunk by chunk with a robust rule, then
    average the ``n - f`` best.

    The ``d`` coordinates of the whole update (the leaves flattened in order, then randomly
    permuted with ``shuffle=True``) are split into chunks of ``c = ceil(d / p)`` coordinates
    (``ceil(d / c) <= p`` chunks, the last one possibly shorter). With ``A`` the base rule and
    ``g_i^q`` worker ``i``'s chunk ``q``, ``score(i) = sum_q ||g_i^q - A(g_1^q, ..., g_n^q)||``
    and ``agg = (1 / (n - f)) sum_{i in S} g_i`` over the ``n - f`` lowest scores ``S`` (equal
    scores go to the lower index). Each chunk has few coordinates, so the base rule's
    distances are not drowned by the dimension, and a worker must be typical in every chunk to
    be averaged. Needs ``n > 2f`` and the base rule's constraint (Krum's ``n >= 2f + 3`` by
    default, which is what the declaration states). A row holding NaN/Inf, or huge enough that
    a chunk distance overflows, is scored last and, with at most ``f`` such rows, never
    averaged. Not available with ``layout="coordinates"``: the chunks span the leaves.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers; passed to the base rule unless it binds its own.
      key: int seed or JAX key: the permutation of the coordinates (``shuffle=True``) and the
        keys of a base rule that needs one (split over the chunks).
      p: the number of chunks asked for, ``>= 1`` (the authors' code: 1000).
      base: the robust rule run on each chunk: a registry name of ``rbyz.aggregators`` or a
        declared aggregator (a ``functools.partial`` binds its hyperparameters); stateless.
      shuffle: split a random permutation of the coordinates, drawn from ``key`` at every
        call (the authors' code, every round); ``False``: contiguous chunks in the leaves'
        order, and no key needed unless the base rule needs one.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (``1 / (n - f)`` on
        the rows averaged), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"w": jnp.array([[0.0, 1.0, 2.0], [1.0, 1.0, 2.0], [0.0, 2.0, 2.0],
      ...                      [1.0, 2.0, 2.0], [0.5, 1.5, 2.0], [0.5, 30.0, 2.0]])}
      >>> gas(g, f=1, p=3, key=0)["w"]  # the row far off in one chunk is scored last
      Array([0.5, 1.5, 2. ], dtype=float32)
      >>> gas(g, f=1, p=3, shuffle=False, report=True)[1].kept.tolist()
      [True, True, True, True, True, False]

    References:
      Liu, Chen, Lyu, Wu, Wu, Chen, `Byzantine-robust Learning on Heterogeneous Data via
      Gradient Splitting`, ICML 2023.
    """
    n = tree_util.num_workers(updates, "gas")
    f = checks.static_int(f, "gas", "f", minimum=0)
    checks.require(n > 2 * f, "gas",
                   f"needs n > 2f (it averages the n - f best-scored rows); got n={n}, f={f}. "
                   "Use more workers or assume fewer Byzantine ones.")
    checks.require(not isinstance(p, bool), "gas", f"p must be an int >= 1; got p={p!r}.")
    p = checks.static_int(p, "gas", "p", minimum=1)
    checks.require(isinstance(shuffle, bool), "gas",
                   f"shuffle must be True or False; got shuffle={shuffle!r}.")
    declared, hparams = _base_rule(base, f)
    declared.check(n, hparams.get("f", f), where="gas")
    keys = iter(())
    if shuffle or declared.key:
        keys = iter(jax.random.split(checks.as_key(key, "gas"), 2))
    dtype = reductions.accumulation_dtype(updates)
    x = jnp.concatenate([_leaf_rows(leaf, dtype) for leaf in jax.tree.leaves(updates)], axis=1)
    d = x.shape[1]
    inf_count = jnp.zeros((n,), jnp.int32)
    finite_sum = jnp.zeros((n,), dtype)
    if d > 0:
        if shuffle:
            x = x[:, jax.random.permutation(next(keys), d)]
        else:
            next(keys, None)
        base_key = next(keys) if declared.key else None
        width = -(-d // min(p, d))
        sizes = [width] * (d // width) + ([d % width] if d % width else [])
        start = 0
        for size in sorted(set(sizes), reverse=True):
            count = sizes.count(size)
            chunks = x[:, start:start + count * size].reshape(n, count, size).transpose(1, 0, 2)
            start += count * size
            if base_key is None:
                def run(batch):
                    return jax.vmap(lambda c: declared.apply(c, None, None, hparams)[0])(batch)
            else:
                chunk_keys = jax.random.split(jax.random.fold_in(base_key, size), count)

                def run(batch, chunk_keys=chunk_keys):
                    return jax.vmap(lambda c, k: declared.apply(c, None, k, hparams)[0])(
                        batch, chunk_keys)
            dist = _chunk_distances(chunks, run)
            inf_count = inf_count + jnp.sum(jnp.isinf(dist), axis=0, dtype=jnp.int32)
            finite_sum = finite_sum + jnp.sum(jnp.where(jnp.isinf(dist), 0.0, dist), axis=0)
    chosen = jnp.lexsort((finite_sum, inf_count))[: n - f]
    weights = jnp.zeros((n,), dtype).at[chosen].set(1.0)
    out = _common.cast_like(_common.weighted_mean(updates, weights, n - f), updates)
    return _selection.returning(out, report, weights, n - f)
