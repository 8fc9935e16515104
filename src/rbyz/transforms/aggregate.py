"""The aggregating transforms: stacked worker updates in, one model-shaped update out."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rbyz import distributed
from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz.aggregators.selection import Selection
from rbyz.transforms import _modes

LAYOUTS = ("gather", "coordinates")


class AggregateState(NamedTuple):
    """State of :func:`aggregate`.

    Attributes:
      count: number of updates so far (int32).
      key: raw key data for rules that declare a key (e.g. bucketing pipelines, DnC), else
        ``None``.
      rule_state: the rule's declared state (``spec.init(params)``; centered clipping: the
        previous aggregate), else ``None``.
      selection: with ``report=True``, the last step's
        :class:`~rbyz.aggregators.Selection` (each worker's weight in the aggregate; zeros
        before the first step), else ``None``.
    """

    count: jax.Array
    key: jax.Array | None
    rule_state: Any
    selection: Any = None


def _check_layout(layout: str, declared: _spec.Spec, axis_name: str | None) -> None:
    checks.require(
        layout in LAYOUTS,
        "aggregate",
        f"unknown layout {layout!r}; use 'gather' (every shard aggregates all coordinates) or "
        "'coordinates' (each shard aggregates its share of the coordinates).",
    )
    if layout == "gather":
        return
    checks.require(
        axis_name is not None,
        "aggregate",
        "layout='coordinates' splits the coordinates over the named worker axis: pass "
        "axis_name='workers' (collective mode), or drop layout for stacked updates.",
    )
    checks.require(
        declared.coordinate_slices,
        "aggregate",
        f"layout='coordinates' needs a rule declared to run on slices of the coordinates (every "
        f"rule of rbyz.aggregators but dnc, a compose() of such stages, or a rule of your own "
        f"declared with coordinate_slices=True); {declared.name} is not. Use layout='gather'.",
    )
    checks.require(
        declared.state is None or declared.state.model_shaped,
        "aggregate",
        f"layout='coordinates' cuts a rule's state into coordinate slices, but {declared.name}'s "
        "state is not shaped like one worker's update. Use layout='gather'.",
    )


def _cast_like(new, old):
    return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)), new, old)


def aggregate(
    rule: Callable | str,
    *,
    axis_name: str | None = None,
    tiled: bool = False,
    layout: str = "gather",
    key=None,
    report: bool = False,
    num_workers: int | None = None,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """Aggregates the workers' updates with a (robust) rule: ``u = rule([u_1; ...; u_n])``.

    Stacked in, aggregated out. What the rule needs is read from its declaration
    (``rule.spec``, see ``rbyz.aggregators.spec``): a rule that keeps state (centered clipping)
    has it initialised by ``spec.init(params)`` and carried in :class:`AggregateState`, so
    ``v_t = rule(u; center=v_{t-1})``; a rule that declares a key receives a fresh one each step,
    split from ``key``. A plain undeclared function works as a stateless, keyless rule.

    Hyperparameters are validated here, before any compute: an unknown keyword (a misspelt one)
    or a missing required one (a forgotten ``f``) raises ``ValueError`` naming the rule and the
    accepted keywords. Constraints on ``n`` and ``f`` are the rule's, checked at trace time
    (``n`` from the shapes). The updates' shapes are checked against the params' (given to
    ``update`` or recorded by ``init``) in both modes.

    Warning: must come after the stacked transforms and before the model-shaped ones in an
    ``optax.chain``; :func:`rbyz.transforms.robust` builds the chain in that order. Does not
    compose with ``optax.MultiSteps``.

    Args:
      rule: an aggregator (declared, a ``functools.partial`` of one, a
        :func:`rbyz.preaggregators.compose`, or a plain function) or its registry name in
        ``rbyz.aggregators``.
      axis_name: ``None`` for stacked updates; otherwise the named worker axis to gather over
        (collective mode, inside ``shard_map``/``pmap``/``vmap(axis_name=...)``).
      tiled: collective mode only: each shard holds a stack ``[m, ...]`` of its own workers.
      layout: collective mode only. ``"gather"``: every shard gathers all updates
        (``all_gather``) and computes the whole aggregate. ``"coordinates"``: each of the ``S``
        shards receives every worker's values on ``1/S`` of the coordinates (``all_to_all``) and
        aggregates that slice; whole-update norms and distances are summed over the shards
        (a ``psum`` of ``[n]`` or ``[n, n]`` values), so every shard selects and weights alike;
        the slices are joined (``all_gather``). For rules declared ``coordinate_slices=True``.
      key: int seed or jax key, required for rules that declare one, refused otherwise.
      report: keep each step's :class:`~rbyz.aggregators.Selection` (which workers' updates
        reached the aggregate, with what weight; computed by the rule in the same pass) in
        ``AggregateState.selection``, read with ``optax.tree_utils.tree_get(state,
        "selection")``. For rules declared ``reports=True`` (``rbyz list``); needs
        ``num_workers``.
      num_workers: the total number of workers ``n`` (the state is sized at ``init``); only
        with ``report=True``.
      **hparams: the rule's hyperparameters (``f=...``, ``tau=...``, ...).

    Per-worker weights (e.g. the workers' data sizes) are a per-step input:
    ``update(updates, state, params, weights=w)``, ``w`` of shape ``[n]`` for stacked updates
    or, in collective mode, each shard's own weight (a scalar; ``[m]`` when tiled), gathered
    like the updates. Only rules declared ``weights=True`` accept them (``rbyz list`` shows
    which); any other rule refuses them with ``ValueError`` rather than ignore them.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AggregateState`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = aggregate("trimmed_mean", f=1)
      >>> params = {"w": jnp.zeros(2)}
      >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [1e9, -1e9]])}
      >>> tx.update(g, tx.init(params), params)[0]["w"]
      Array([4., 3.], dtype=float32)
      >>> tx = aggregate("median", f=1)
      >>> tx.update(g, tx.init(params), params, weights=jnp.array([1.0, 1.0, 5.0, 1.0]))[0]["w"]
      Array([5., 6.], dtype=float32)
      >>> aggregate("krum", f=1, neighbors=2)
      Traceback (most recent call last):
      ...
      ValueError: aggregate: krum has no hyperparameter 'neighbors'; it accepts f, neighbours, squared.

    References:
      Karimireddy, He, Jaggi, `Learning from History for Byzantine Robust Optimization`,
      ICML 2021 (centered clipping, stateful centre).
    """
    declared, bound = _spec.resolve(rule, "aggregator", "aggregate")
    hparams = declared.check_hparams({**bound, **hparams}, "aggregate")
    if "f" in hparams:
        hparams["f"] = checks.static_int(hparams["f"], declared.name, "f", minimum=0)
    if declared.key and key is None:
        raise ValueError(
            f"aggregate: {declared.name} needs a random key; pass key=<int seed> or "
            "key=jax.random.key(...) (each step gets a fresh key split from it)."
        )
    if key is not None and not declared.key:
        raise ValueError(f"aggregate: rule {declared.name} takes no key; drop key={key!r}.")
    key_data = _modes.key_data(key, "aggregate") if declared.key else None
    _check_layout(layout, declared, axis_name)
    _check_report(report, num_workers, declared)
    shapes = _modes.ParamShapes()

    def init_fn(params):
        shapes.record(params)
        selection = (Selection(jnp.zeros((num_workers,), jnp.float32)) if report else None)
        return AggregateState(jnp.zeros([], jnp.int32), key_data, declared.init(params, hparams),
                              selection)

    def update_fn(updates, state, params=None, *, weights=None, **extra_args):
        del extra_args
        if weights is not None:
            if not declared.weights:
                raise ValueError(_spec.weights_refused(declared.name, "aggregate"))
            weights = _gathered_weights(weights, axis_name, tiled)
        next_key, step_key = (None, None) if state.key is None else _modes.split(state.key)
        if layout == "coordinates":
            _modes.check_shard(updates, shapes.of(params), tiled, "aggregate")
            out, rule_state, selection = _aggregate_coordinates(
                declared, updates, state.rule_state, step_key, hparams, axis_name, tiled,
                weights, report)
        else:
            stacked = _modes.gathered(updates, shapes.of(params), axis_name, tiled, "aggregate")
            out, rule_state, *selection = declared.apply(
                stacked, state.rule_state, step_key, hparams, weights=weights, report=report)
            selection = selection[0] if report else None
        if state.rule_state is not None:
            rule_state = _cast_like(rule_state, state.rule_state)
        if report and selection.weights.shape != (num_workers,):
            raise ValueError(
                f"aggregate: report=True with num_workers={num_workers}, but {declared.name} "
                f"aggregated {selection.weights.shape[0]} rows; pass num_workers=n, the number "
                "of rows the rule sees.")
        return out, AggregateState(optax.safe_increment(state.count), next_key, rule_state,
                                   selection)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_report(report: bool, num_workers, declared: _spec.Spec) -> None:
    if not report:
        checks.require(num_workers is None, "aggregate",
                       f"num_workers={num_workers!r} only sizes the selection that report=True "
                       "keeps; pass report=True, or drop num_workers.")
        return
    if not declared.reports:
        raise ValueError(_spec.report_refused(declared.name, "aggregate"))
    checks.require(num_workers is not None, "aggregate",
                   f"report=True keeps one weight per worker in the state, which is sized at "
                   f"init: pass num_workers=n (the rows {declared.name} aggregates).")
    checks.static_int(num_workers, "aggregate", "num_workers", minimum=1)


def _gathered_weights(weights, axis_name: str | None, tiled: bool) -> jax.Array:
    """Every worker's weight ``[n]``: as given in stacked mode; in collective mode each shard
    passes its own (a scalar, or ``[m]`` when tiled) and they are gathered like the updates."""
    weights = jnp.asarray(weights)
    if axis_name is None:
        return weights
    want = 1 if tiled else 0
    if weights.ndim != want:
        raise ValueError(
            f"aggregate: in collective mode each shard passes its own weight"
            f"{'s, shape [m] (tiled)' if tiled else ', a scalar'}; got shape {weights.shape}. "
            "The weights are gathered over the worker axis like the updates.")
    return distributed.gather_workers(weights, axis_name, tiled=tiled, where="aggregate")


def _like(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _aggregate_coordinates(declared, updates, rule_state, key, hparams, axis_name, tiled,
                           weights=None, report=False):
    """The rule on this shard's slice of the coordinates (sums over coordinates completed over
    the axis), the slices of the output and of the state joined again."""
    like = jax.tree.map(
        lambda u: jax.ShapeDtypeStruct(u.shape[1:] if tiled else u.shape, u.dtype), updates)
    stacked = distributed.scatter_coordinates(updates, axis_name, tiled=tiled, where="aggregate")
    own_state = None
    if rule_state is not None:
        own_state = distributed.slice_coordinates(rule_state, axis_name)
    with reductions.sharded(axis_name):
        part, new_part, *selection = declared.apply(stacked, own_state, key, hparams,
                                                    weights=weights, report=report)
    # Whole-update norms and distances are summed over the shards: every shard selects alike.
    selection = selection[0] if report else None
    out = distributed.gather_coordinates(part, like, axis_name)
    if rule_state is None:
        return out, None, selection
    return (out, distributed.gather_coordinates(new_part, _like(rule_state), axis_name),
            selection)


def majority_vote(
    *,
    zero_sign: int = 0,
    axis_name: str | None = None,
    tiled: bool = False,
    layout: str = "gather",
) -> optax.GradientTransformationExtraArgs:
    """Coordinate-wise majority vote of the workers' signs: ``u = sign(sum_i sign(u_i))``.

    ``sign(0) = 0``, so a tied vote leaves the coordinate unchanged (ties need an even number of
    voters or zero entries). For odd ``n`` and no zeros this equals the sign of the coordinate
    median. Any ``n >= 1``; the vote is robust to ``f < n/2`` sign-flipping workers.

    Warning: comes after the stacked transforms, before the model-shaped ones.

    Args:
      zero_sign: what ``sign(0)`` maps to (``0``, or ``1`` as the ICLR'19 bit packing), as in
        ``rbyz.aggregators.sign_majority``.
      axis_name: ``None`` for stacked updates, else the named worker axis (collective mode).
      tiled: collective mode only: each shard holds a stack of its own workers.
      layout: collective mode only: ``"gather"`` or ``"coordinates"`` (each shard votes on its
        share of the coordinates), as in :func:`aggregate`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state :class:`AggregateState`).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = majority_vote()
      >>> g = jnp.array([[1.0, -2.0], [3.0, 1.0], [-1.0, -5.0]])
      >>> tx.update(g, tx.init(jnp.zeros(2)))[0]
      Array([ 1., -1.], dtype=float32)

    References:
      Bernstein, Zhao, Azizzadenesheli, Anandkumar, `signSGD with Majority Vote is Communication
      Efficient and Fault Tolerant`, ICLR 2019.
    """
    return aggregate("sign_majority", zero_sign=zero_sign, axis_name=axis_name, tiled=tiled,
                     layout=layout)
