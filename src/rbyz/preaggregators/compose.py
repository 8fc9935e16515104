"""Composition of pre-aggregators and an aggregator into one declared rule."""

from __future__ import annotations

from typing import Any, Callable

import jax

from rbyz._src import checks
from rbyz._src import spec as _spec


def _stage(stage, position: int) -> tuple[_spec.Spec, dict, Any]:
    """``(spec, bound hyperparameters, fixed key or None)`` of one stage, validated."""
    if isinstance(stage, str):
        kind = "preaggregator" if stage in _spec.REGISTRIES["preaggregator"].names() else \
            "aggregator"
        declared, bound = _spec.resolve(stage, kind, "compose")
    else:
        checks.require(
            callable(stage),
            "compose",
            f"every stage must be callable or a registered name; got {stage!r} at position "
            f"{position}. Bind hyperparameters with functools.partial(rule, f=...).",
        )
        declared, bound = _spec.resolve(stage, "aggregator", "compose")
    fixed_key = bound.pop("key", None) if declared.key else None
    bound = declared.check_hparams(bound, "compose")
    return declared, bound, fixed_key


def _explainer(stages):
    def explain(n: int, f: int) -> str | None:
        del f  # each stage checks its own bound f
        rows = n
        for declared, bound, _ in stages:
            problem = declared.constraint.explain(rows, bound.get("f", 0))
            if problem is not None:
                seen = f" (it sees {rows} of the {n} rows)" if rows != n else ""
                return f"stage {declared.name}{seen} {problem}"
            rows = declared.output_rows(rows, bound)
        return None

    return explain


def compose(*stages: Callable | str) -> Callable[..., Any]:
    """Chains pre-aggregators and a final aggregator into one declared robust aggregation rule.

    ``compose(p_1, ..., p_m, agg)(x, key=k) = agg(p_m(... p_1(x)))``: the stages run left to
    right, each a declared rule with its hyperparameters bound (``functools.partial(nnm, f=2)``)
    or a registered name, the last one usually an aggregator of :mod:`rbyz.aggregators`. The
    declaration of the result is derived from its stages' (``compose(...).spec``):

    - **hyperparameters** are validated here: an unknown or missing one (a forgotten ``f``)
      raises ``ValueError`` naming the stage;
    - **keys**: every stage that declares a key receives its own, from
      ``jax.random.split(key, m)`` in order (a key bound with ``functools.partial`` stays fixed);
    - **state**: the states of all stateful stages are kept (a tuple, one per stateful stage, in
      order), so ``rbyz.transforms.aggregate(compose(clip, centered_clipping))`` gives centered
      clipping its previous output as it would alone;
    - **constraint**: each stage's, on the rows it sees (after bucketing an aggregator sees
      ``ceil(n / s)`` rows), with the stage's own ``f``;
    - **coordinate slices**: when every stage runs on slices.

    Called directly, stateful stages start from their initial state (centered clipping from a
    zero centre) each time; inside ``aggregate`` their state is carried.

    Args:
      *stages: one or more stages ``stage(updates, **bound) -> updates``.

    Returns:
      ``aggregate(updates, *, key=None)``, a pure function that can be jitted, with its
      declaration as ``.spec``. ``key`` (a JAX key or an int seed) is required when a stage
      declares one.

    Example:
      >>> import functools
      >>> import jax.numpy as jnp
      >>> from rbyz import aggregators, preaggregators as pre
      >>> robust = pre.compose(functools.partial(pre.clip, max_norm=1.0),
      ...                      functools.partial(pre.bucketing, s=2), aggregators.mean)
      >>> robust({"w": jnp.array([[0.5], [1.0], [100.0], [-0.5]])}, key=0)["w"].tolist()
      [0.5]
      >>> robust.spec.key, robust.spec.constraint.text
      (True, 'clip: n >= 1, then bucketing: n >= 1, then mean: 0 <= f < n')

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
    resolved = tuple(_stage(stage, position) for position, stage in enumerate(stages))
    keyed = tuple(declared.key and fixed is None for declared, _, fixed in resolved)
    stateful = tuple(declared for declared, _, _ in resolved if declared.state is not None)

    def run(updates, states, key):
        keys = iter(())
        if any(keyed):
            keys = iter(jax.random.split(checks.as_key(key, "compose"), sum(keyed)))
        states = iter(states if states is not None else [None] * len(stateful))
        new_states = []
        for (declared, bound, fixed), takes_key in zip(resolved, keyed):
            stage_key = next(keys) if takes_key else (checks.as_key(fixed, declared.name)
                                                      if fixed is not None else None)
            state = next(states) if declared.state is not None else None
            updates, state = declared.apply(updates, state, stage_key, bound)
            if declared.state is not None:
                new_states.append(state)
        return updates, (tuple(new_states) if stateful else None)

    def aggregate(updates, *, key=None):
        return run(updates, None, key)[0]

    state = None
    if stateful:
        state = _spec.State(
            arg="state",
            init=lambda params: tuple(declared.init(params, bound)
                                      for declared, bound, _ in resolved
                                      if declared.state is not None),
            model_shaped=all(declared.state.model_shaped for declared in stateful),
            doc="; ".join(f"{declared.name}: {declared.state.doc}" for declared in stateful),
        )
    names = [declared.name for declared, _, _ in resolved]
    aggregate.__name__ = f"compose({', '.join(names)})"
    aggregate.spec = _spec.Spec(
        name=aggregate.__name__,
        kind=resolved[-1][0].kind,
        fn=aggregate,
        key=any(keyed),
        state=state,
        coordinate_slices=all(declared.coordinate_slices for declared, _, _ in resolved),
        constraint=_spec.Constraint(
            ", then ".join(f"{declared.name}: {declared.constraint.text}"
                           for declared, _, _ in resolved),
            lambda n, f: _explainer(resolved)(n, f) is None,
            explainer=_explainer(resolved),
        ),
        hparams={},
        reference=tuple(ref for declared, _, _ in resolved for ref in declared.reference),
        cost=" + ".join(declared.cost for declared, _, _ in resolved),
        rows_out=_rows_through(resolved) if resolved[-1][0].kind != "aggregator" else None,
        applier=lambda updates, state, key, hparams: run(updates, state, key),
    )
    return aggregate


def _rows_through(resolved):
    def rows_out(n: int, hparams) -> int:
        del hparams
        for declared, bound, _ in resolved:
            n = declared.output_rows(n, bound)
        return n

    return rows_out
