"""Hierarchical aggregation: an inner rule per bucket of rows, an outer rule over the buckets.

``out = A0(A1(B_1), ..., A1(B_k))``: the (optionally randomly permuted) rows are split into ``k``
consecutive buckets ``B_1..B_k``, the inner rule ``A1`` reduces each bucket to one row and the
outer rule ``A0`` reduces the ``k`` bucket results to the output. DETOX's stage 2 is of this
form (median of means: ``A1 = mean``, ``A0 = median``), and so are the bucketed Multi-Krum and
the geometric median of means. :func:`plain` runs a rule with ``f = 0`` for the steps that
must not be checked against ``f`` (the mean inside a bucket).

:func:`hierarchical` returns a declared aggregator (``rule.spec``): it needs a random key
exactly when it shuffles the rows or one of its stages needs one, and its constraint on
``n`` and ``f`` is its stages' (the inner rule's on the smallest bucket, the outer rule's on
the ``k`` bucket results).

References:
  Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
  More Robust Gradient Aggregation`, NeurIPS 2019.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util

Stage2 = Callable[..., Any]
"""A declared aggregator ``rule(updates, *, f)``, or ``rule(updates, *, f, key)`` when it
draws at random (declared ``key=True``), e.g. what :func:`hierarchical` returns."""

DETOX = _spec.Reference(
    "Rajput, Wang, Charles, Papailiopoulos",
    "DETOX: A Redundancy-based Framework for Faster and More Robust Gradient Aggregation",
    "NeurIPS", 2019,
)

_declare = functools.partial(_spec.declare, "aggregator", register=False)


def _partial_keywords(rule: Callable) -> dict:
    """The keywords bound by ``functools.partial`` (declared or not); outer partials win."""
    keywords: dict = {}
    while isinstance(rule, functools.partial):
        keywords = {**rule.keywords, **keywords}
        rule = rule.func
    return keywords


def bind_stage(rule: Callable, where: str, role: str) -> tuple[_spec.Spec, Callable]:
    """A stage of a combination: its declaration and ``run(rows, f, key) -> pytree``.

    ``rule`` is an aggregator (a declared function, a ``functools.partial`` of one binding
    hyperparameters by keyword, or a plain function ``rule(updates, *, f)``); its
    hyperparameters are checked here, before any compute, and ``f`` is left to the
    combination. Stateful rules are refused (a state per bucket would have no meaning).

    Args:
      rule: the stage's aggregator.
      where: the combination, for error messages (``"hierarchical"``).
      role: the stage's role in it (``"inner"``, ``"outer"``, ``"stage2"``).

    Returns:
      ``(spec, run)``; ``run`` passes ``key`` only when the spec declares one.
    """
    declared, bound = _spec.resolve(rule, "aggregator", where)
    if declared.state is not None:
        raise ValueError(
            f"{where}: the {role} rule {declared.name} keeps state ({declared.state.doc}); "
            f"{where} takes stateless rules only. Use it on its own in "
            "rbyz.transforms.aggregate."
        )
    fixed = _partial_keywords(rule)
    if "f" in fixed:
        raise ValueError(
            f"{where}: the {role} rule {declared.name} binds f={fixed['f']!r}, but {where} "
            "passes f itself; drop f from the partial"
            + ("." if where == "plain" else " (wrap the rule with plain(...) for f=0).")
        )
    declared.check_hparams({**bound, "f": 0}, where)

    def run(rows, f: int, key):
        return declared.apply(rows, None, key if declared.key else None, {**bound, "f": f})[0]

    return declared, run


def plain(rule: Callable) -> Callable:
    """``rule`` called with ``f=0`` whatever ``f`` it is given.

    For the non-robust steps of :func:`hierarchical` (the mean inside a bucket of DETOX-MoM, the
    mean of the bucket results of DETOX-MultiKrum), which must not be checked against ``f``.

    Args:
      rule: a keyless, stateless aggregator ``rule(updates, *, f)`` (or a partial of one).

    Returns:
      A declared aggregator ``wrapped(updates, *, f=0) -> rule(updates, f=0)``, no key.

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import aggregators
      >>> plain(aggregators.mean)(jnp.array([[1.0], [3.0]]), f=5)
      Array([2.], dtype=float32)
    """
    declared, run = bind_stage(rule, "plain", "wrapped")
    checks.require(
        not declared.key,
        "plain",
        f"{declared.name} needs a random key; plain wraps keyless rules. Give it its key through "
        "a rule of your own declared with key=True.",
    )

    def wrapped(updates, *, f: int = 0):
        del f
        return run(updates, 0, None)

    wrapped.__name__ = f"plain({declared.name})"
    return _declare(cost=declared.cost, reference=declared.reference,
                    note="f is ignored: the wrapped rule always runs with f=0.")(wrapped)


def _bucket_bounds(n: int, buckets: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``buckets`` consecutive buckets of ``n`` rows (``np.array_split``)."""
    return [(int(idx[0]), int(idx[-1]) + 1) for idx in np.array_split(np.arange(n), buckets)]


def hierarchical(inner: Callable, outer: Callable, *, buckets: int,
                 shuffle: bool = True) -> Stage2:
    """Hierarchical aggregation: an inner rule A1 per bucket, then an outer rule A0 over buckets.

    ``out = A0(A1(B_1), ..., A1(B_k))`` where ``B_1..B_k`` split the rows into ``k = buckets``
    consecutive buckets, sizes differing by at most one (``np.array_split``). With ``shuffle``
    (default) the rows are first permuted at random, as the DETOX reference does at every step
    (``np.random.shuffle`` before bucketing), so that the adversary cannot choose its bucket;
    the rule then needs a key. Both rules receive ``f`` as a keyword (``rule(stacked, *, f)``),
    so any ``rbyz.aggregators`` function fits; wrap the non-robust ones with :func:`plain`.

    The key, when there is one, is split as ``k_perm, k_inner, k_outer = jax.random.split(key,
    3)``: the permutation is ``jax.random.permutation(k_perm, n)``, bucket ``j`` of a keyed inner
    rule gets ``jax.random.split(k_inner, buckets)[j]`` and a keyed outer rule ``k_outer``.

    Args:
      inner: A1, applied to each bucket (stateless).
      outer: A0, applied to the ``k`` bucket results (stateless).
      buckets: number of buckets ``k``, ``1 <= k <= rows``.
      shuffle: permute the rows at random before bucketing (needs a key).

    Returns:
      A declared aggregator (``.spec``): ``rule(updates, *, f, key)`` when it shuffles or a stage
      needs a key (declared ``key=True``), else ``rule(updates, *, f)``; usable as
      ``rbyz.coding.detox(..., stage2=...)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rbyz import aggregators
      >>> x = jnp.array([[1.0], [3.0], [5.0], [7.0], [100.0], [300.0]])
      >>> mom = hierarchical(plain(aggregators.mean), aggregators.median, buckets=3,
      ...                    shuffle=False)
      >>> mom(x, f=1)
      Array([6.], dtype=float32)
      >>> shuffled = hierarchical(plain(aggregators.mean), aggregators.median, buckets=3)
      >>> shuffled.spec.key, shuffled(x, f=1, key=jax.random.key(0)).shape
      (True, (1,))

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    buckets = checks.static_int(buckets, "hierarchical", "buckets", minimum=1)
    checks.require(isinstance(shuffle, bool), "hierarchical",
                   f"shuffle must be True or False; got shuffle={shuffle!r}.")
    inner_spec, run_inner = bind_stage(inner, "hierarchical", "inner")
    outer_spec, run_outer = bind_stage(outer, "hierarchical", "outer")
    keyed = shuffle or inner_spec.key or outer_spec.key

    def explain(n: int, f: int) -> str | None:
        if buckets > n:
            return f"needs buckets <= rows; got buckets={buckets}, rows={n}. Use fewer buckets."
        problem = inner_spec.constraint.explain(n // buckets, f)
        if problem is not None:
            return f"the inner rule {inner_spec.name} on buckets of {n // buckets} rows {problem}"
        problem = outer_spec.constraint.explain(buckets, f)
        if problem is not None:
            return f"the outer rule {outer_spec.name} over {buckets} bucket results {problem}"
        return None

    constraint = _spec.Constraint(
        f"buckets={buckets} <= n, {inner_spec.name} on n/{buckets} rows "
        f"({inner_spec.constraint.text}), {outer_spec.name} on {buckets} rows "
        f"({outer_spec.constraint.text})",
        lambda n, f: explain(n, f) is None,
        explainer=explain,
    )

    def combined(updates, f: int, key):
        n = tree_util.num_workers(updates, "hierarchical")
        f = checks.static_int(f, "hierarchical", "f", minimum=0)
        rule.spec.check(n, f)
        perm_key = inner_key = outer_key = None
        if keyed:
            perm_key, inner_key, outer_key = jax.random.split(checks.as_key(key, "hierarchical"), 3)
        if shuffle:
            order = jax.random.permutation(perm_key, n)
            updates = jax.tree.map(lambda x: x[order], updates)
        inner_keys = jax.random.split(inner_key, buckets) if inner_spec.key else [None] * buckets
        results = [
            run_inner(jax.tree.map(lambda x, a=start, b=stop: x[a:b], updates), f, bucket_key)
            for (start, stop), bucket_key in zip(_bucket_bounds(n, buckets), inner_keys)
        ]
        return run_outer(jax.tree.map(lambda *xs: jnp.stack(xs), *results), f, outer_key)

    if keyed:
        def rule(updates, *, f: int, key):
            return combined(updates, f, key)
    else:
        def rule(updates, *, f: int):
            return combined(updates, f, None)

    rule.__name__ = "hierarchical"
    return _declare(
        key=keyed,
        constraint=constraint,
        coordinate_slices=inner_spec.coordinate_slices and outer_spec.coordinate_slices,
        cost=f"{buckets} x {inner_spec.cost} on n/{buckets} rows + {outer_spec.cost} on "
             f"{buckets} rows" + (" + O(n d) permutation" if shuffle else ""),
        reference=DETOX,
        note=("shuffle=True (default) permutes the rows every step, as the DETOX reference "
              "does; shuffle=False keeps their order (then no key is needed)."),
    )(rule)


__all__ = ("Stage2", "hierarchical", "plain")
