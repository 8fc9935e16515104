"""Pre-aggregators: stacked updates ``[n, ...]`` in, stacked updates ``[n', ...]`` out.

A pre-aggregator reshapes the set of workers' updates before a robust aggregator reduces it:
nearest-neighbour mixing (NNM) pulls every row towards its neighbours, bucketing averages random
groups, static clipping and adaptive robust clipping (ARC) bound the rows' norms. Each is a pure
function over a stacked pytree (every leaf has the worker axis first) and composes with any
aggregator of :mod:`rbyz.aggregators` through :func:`compose`::

    robust = compose(functools.partial(nnm, f=2), functools.partial(rbyz.aggregators.krum, f=2))
    update = robust(stacked_grads)

Distances and norms are measured over the whole update (all leaves together); the rows are then
combined or rescaled leaf by leaf, so the model is never ravelled into one vector. 16-bit inputs
are combined in float32 and returned in their own dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import distances
from rbyz._src import registry
from rbyz._src import tree as tree_util

_REGISTRY = registry.Registry("pre-aggregator")
register = _REGISTRY.register
get = _REGISTRY.get
names = _REGISTRY.names

__all__ = ("arc", "bucketing", "clip", "compose", "get", "names", "nnm")


def _per_row(vector: jax.Array, ndim: int) -> jax.Array:
    """Reshapes ``[n]`` to ``[n, 1, ..., 1]`` so that it scales the rows of an ``ndim`` leaf."""
    return vector.reshape(vector.shape[:1] + (1,) * (ndim - 1))


def _clip_rows(updates, threshold: jax.Array):
    """Scales each row whose whole-update norm exceeds ``threshold`` down to that norm.

    Rows with a non-finite squared norm (NaN or Inf values, or a norm beyond float32's range) are
    set to zero: their direction cannot be measured, and zero lies inside every clipping ball.
    """
    norms = jnp.sqrt(tree_util.row_sq_norms(updates))
    measurable = jnp.isfinite(norms)
    tiny = jnp.finfo(jnp.float32).tiny
    factors = jnp.where(measurable, jnp.minimum(1.0, threshold / jnp.maximum(norms, tiny)), 0.0)

    def scale(leaf):
        acc = tree_util.accumulation_dtype(leaf.dtype)
        keep = _per_row(measurable, leaf.ndim)
        scaled = leaf.astype(acc) * _per_row(factors.astype(acc), leaf.ndim)
        return jnp.where(keep, scaled, 0).astype(leaf.dtype)

    return jax.tree.map(scale, updates)


@register("clip")
def clip(updates, *, max_norm: float):
    """Static clipping: scales each worker's whole update to an l2 norm of at most ``max_norm``.

    ``y_i = min(1, c / ||x_i||) x_i`` with ``c = max_norm`` and ``||x_i||`` the Euclidean norm of
    worker ``i``'s update over all leaves. Rows with NaN or Inf values (or a norm that overflows
    float32, above about 1.8e19) are returned as zeros: their norm and direction are undefined,
    and zero is inside the clipping ball. Works for any ``n >= 1``.

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
    return _clip_rows(updates, jnp.asarray(max_norm, jnp.float32))


def _arc_clipped_count(n: int, f: int) -> int:
    """``floor(2 (f / n) (n - f))`` in exact integer arithmetic."""
    return (2 * f * (n - f)) // n


@register("arc")
def arc(updates, *, f: int):
    """Adaptive Robust Clipping: clips the ``k`` largest rows to the norm of the next largest.

    With ``k = floor(2 (f/n) (n - f))`` and the rows' whole-update l2 norms sorted in decreasing
    order ``||x_(1)|| >= ... >= ||x_(n)||``, the threshold is ``C = ||x_(k+1)||`` and
    ``y_i = min(1, C / ||x_i||) x_i``: the ``k`` largest rows are scaled down to norm ``C``, the
    others are unchanged. This follows Algorithm 1 of the paper and ByzFL's ``ARC`` exactly,
    except that ``k`` is computed in exact integer arithmetic (ByzFL's float product rounds down
    one too far for a few large ``n``, e.g. n=121, f=66). Needs ``n > 2f``, so that ``k >= f``
    and ``k < n``: at most ``f`` hostile rows are all among the clipped ones.

    Hostile rows: NaN or Inf rows (or norms that overflow float32) rank as the largest and are
    returned as zeros (see :func:`clip`), so the output is finite and every row has norm ``<= C``.

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
    sq_norms = tree_util.row_sq_norms(updates)
    sq_norms = jnp.where(jnp.isnan(sq_norms), jnp.inf, sq_norms)
    threshold = jnp.sqrt(jnp.sort(sq_norms)[n - 1 - _arc_clipped_count(n, f)])
    return _clip_rows(updates, threshold)


def _neighbour_weights(updates, n: int, f: int) -> jax.Array:
    """``[n, n]`` float32 mixing matrix: ``1/(n-f)`` where ``j`` is among ``i``'s neighbours."""
    sq_dist = distances.pairwise_sq_distances(updates)
    # Every row is its own nearest neighbour, even when another row is identical to it.
    sq_dist = jnp.where(jnp.eye(n, dtype=bool), -1.0, sq_dist)
    rank = jnp.argsort(jnp.argsort(sq_dist, axis=1, stable=True), axis=1)
    return jnp.where(rank < n - f, 1.0 / (n - f), 0.0).astype(jnp.float32)


@register("nnm")
def nnm(updates, *, f: int):
    """Nearest-neighbour mixing: replaces each row by the mean of its ``n - f`` nearest rows.

    ``y_i = (1 / (n - f)) sum_{j in N_i} x_j``, where ``N_i`` holds the ``n - f`` rows closest to
    ``x_i`` in l2 distance over the whole update (all leaves), ``x_i`` itself included; ties are
    broken by the lower worker index. Distances come from ``rbyz._src.distances`` (accurate,
    centred Gram); each leaf is then mixed by the ``[n, n]`` neighbour matrix. Needs
    ``0 <= f < n``. Follow it by any robust aggregator on the ``n`` mixed rows.

    Hostile rows: a row with NaN/Inf values, or with a norm that overflows float32, is at
    infinite distance from every other row, so with at most ``f`` such rows no other row mixes
    it in. A row whose neighbourhood does contain a NaN/Inf row (only a hostile row's own mix, or
    any row if more than ``f`` rows are hostile) is returned as all NaN, which every robust
    aggregator ranks last.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: the number of Byzantine workers (Python int, ``0 <= f < n``).

    Returns:
      A stacked pytree with the structure, shapes and dtypes of ``updates`` (``n`` mixed rows).

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import preaggregators
      >>> x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
      >>> preaggregators.nnm(x, f=1).tolist()
      [[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]]

    References:
      Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, `Fixing by Mixing: A Recipe for
      Optimal Byzantine ML under Heterogeneity`, AISTATS 2023.
    """
    n = tree_util.num_workers(updates, "nnm")
    f = checks.byzantine_count(f, n, "nnm", "0 <= f < n", lambda n, f: f < n)
    weights = _neighbour_weights(updates, n, f)
    finite = tree_util.finite_rows(updates)
    poisoned = jnp.any((weights > 0) & ~finite[None, :], axis=1)

    def mix(leaf):
        acc = tree_util.accumulation_dtype(leaf.dtype)
        flat = leaf.reshape(n, -1).astype(acc)
        mixing = weights.astype(acc)

        def combine(rows):
            return jnp.matmul(mixing, rows, precision=jax.lax.Precision.HIGHEST)

        def combine_sanitized():
            # A weight of 0 times NaN/Inf is still NaN: zero the non-finite values first. This
            # costs a pass over memory, so it only runs when some row is non-finite.
            return combine(jnp.where(jnp.isfinite(flat), flat, 0))

        mixed = jax.lax.cond(jnp.all(finite), lambda: combine(flat), combine_sanitized)
        mixed = jnp.where(_per_row(poisoned, 2), jnp.nan, mixed)
        return mixed.reshape(leaf.shape).astype(leaf.dtype)

    return jax.tree.map(mix, updates)


@register("bucketing")
def bucketing(updates, *, key=None, s: int = 2):
    """Bucketing: randomly permutes the rows and averages them in buckets of ``s``.

    With a uniformly random permutation ``pi`` of the ``n`` rows and ``T = ceil(n / s)``,
    ``y_b = mean(x_pi(b s), ..., x_pi(min(b s + s, n) - 1))`` for ``b = 0, ..., T - 1``: ``T - 1``
    buckets of ``s`` consecutive permuted rows and a last one of ``n - (T - 1) s`` rows, as in the
    paper's code (ByzFL instead makes ``floor(n/s)`` full buckets plus one of the remainder, which
    is the same partition). The aggregator after it sees only ``T`` rows: its own constraints
    apply to ``n = T`` (e.g. Krum then needs ``T > 2f + 2``), and one Byzantine row spoils its
    whole bucket, so with ``f`` Byzantine workers up to ``f`` buckets are Byzantine. A NaN/Inf
    row makes its bucket's mean non-finite, which robust aggregators rank last. Any ``n >= 1``.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      key: a JAX PRNG key or an int seed (required; the same key gives the same buckets).
      s: the bucket size, a Python int ``>= 1`` (``s = 1`` only permutes the rows).

    Returns:
      A stacked pytree with ``T = ceil(n / s)`` rows per leaf, in the dtypes of ``updates``.

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import preaggregators
      >>> x = {"w": jnp.arange(10.0).reshape(5, 2)}
      >>> out = preaggregators.bucketing(x, key=0, s=2)
      >>> out["w"].shape, float(out["w"][:2].sum() * 2 + out["w"][2].sum())  # total preserved
      ((3, 2), 45.0)

    References:
      Karimireddy, He, Jaggi, `Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing`, ICLR 2022.
    """
    n = tree_util.num_workers(updates, "bucketing")
    s = checks.static_int(s, "bucketing", "s", minimum=1)
    key = checks.as_key(key, "bucketing")
    num_buckets = -(-n // s)
    # Slot r of bucket b holds permuted row b*s + r; index n (out of range) marks an empty slot.
    slots = jnp.concatenate([
        jax.random.permutation(key, n),
        jnp.full((num_buckets * s - n,), n, jnp.int32),
    ]).reshape(num_buckets, s)
    sizes = jnp.array([s] * (num_buckets - 1) + [n - (num_buckets - 1) * s], jnp.float32)

    def average(leaf):
        acc = tree_util.accumulation_dtype(leaf.dtype)
        members = [
            jnp.take(leaf, slots[:, r], axis=0, mode="fill", fill_value=0).astype(acc)
            for r in range(s)
        ]
        total = tree_util.sum_rows(members)
        return (total / _per_row(sizes.astype(acc), leaf.ndim)).astype(leaf.dtype)

    return jax.tree.map(average, updates)


def _takes_key(stage: Callable) -> bool:
    """Whether ``stage`` has a ``key`` parameter that is not already bound by a partial."""
    if isinstance(stage, functools.partial) and "key" in stage.keywords:
        return False
    try:
        return "key" in inspect.signature(stage).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def compose(*stages: Callable) -> Callable[..., Any]:
    """Chains pre-aggregators and a final aggregator into one robust aggregation function.

    ``compose(p_1, ..., p_m, agg)(x, key=k) = agg(p_m(... p_1(x)))``: the stages run left to
    right, each a callable with its hyperparameters already bound (e.g.
    ``functools.partial(nnm, f=2)``), the last one usually an aggregator of
    :mod:`rbyz.aggregators` (``functools.partial(rbyz.aggregators.krum, f=1)``). Signatures are
    inspected once, here: every stage with a ``key`` parameter (not bound already) receives its
    own key from ``jax.random.split(key, m)``, in order, so stages never share randomness.
    Remember that an aggregator after :func:`bucketing` sees ``ceil(n / s)`` rows.

    Args:
      *stages: one or more callables ``stage(updates, **bound) -> updates``.

    Returns:
      ``aggregate(updates, *, key=None)``. ``key`` (a JAX key or an int seed) is required when a
      stage takes one; ``ValueError`` otherwise. The function is pure and can be jitted.

    Example:
      >>> import functools
      >>> import jax, jax.numpy as jnp
      >>> from rbyz import preaggregators as pre
      >>> def mean(u):
      ...     return jax.tree.map(lambda x: x.sum(axis=0) / x.shape[0], u)
      >>> robust = pre.compose(functools.partial(pre.clip, max_norm=1.0),
      ...                      functools.partial(pre.bucketing, s=2), mean)
      >>> robust({"w": jnp.array([[0.5], [1.0], [100.0], [-0.5]])}, key=0)["w"].tolist()
      [0.5]

    References:
      Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, `Fixing by Mixing: A Recipe for
      Optimal Byzantine ML under Heterogeneity`, AISTATS 2023 (pre-aggregation then a robust
      aggregator).
    """
    checks.require(
        len(stages) > 0,
        "compose",
        "needs at least one stage (the final aggregator); got none. Pass e.g. "
        "compose(functools.partial(nnm, f=1), functools.partial(rbyz.aggregators.krum, f=1)).",
    )
    for position, stage in enumerate(stages):
        checks.require(
            callable(stage),
            "compose",
            f"every stage must be callable; got {stage!r} at position {position}. Bind "
            "hyperparameters with functools.partial(rule, f=...).",
        )
    keyed = tuple(_takes_key(stage) for stage in stages)
    num_keyed = sum(keyed)

    def aggregate(updates, *, key=None):
        keys = iter(())
        if num_keyed:
            keys = iter(jax.random.split(checks.as_key(key, "compose"), num_keyed))
        for stage, takes_key in zip(stages, keyed):
            updates = stage(updates, key=next(keys)) if takes_key else stage(updates)
        return updates

    aggregate.coordinate_slices = _built_in_stages(stages)
    return aggregate


def _built_in_stages(stages) -> bool:
    """Whether every stage is a built-in pre-aggregator, then a rule that runs on coordinate
    slices (see ``rbyz.aggregators.supports_coordinate_layout``)."""
    from rbyz import aggregators  # late: rbyz.aggregators does not need this module

    def built_in(stage):
        while isinstance(stage, functools.partial):
            stage = stage.func
        return any(stage is rule for rule in (nnm, bucketing, clip, arc))

    *pres, last = stages
    return all(map(built_in, pres)) and aggregators.supports_coordinate_layout(last)
