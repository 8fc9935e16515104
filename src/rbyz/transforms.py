"""Optax gradient transformations for Byzantine-robust training.

Robust aggregation, Byzantine attacks, per-worker noise and sign voting as composable
``optax.GradientTransformationExtraArgs``, so that a defended optimizer is one ``optax.chain``:

>>> import optax, rbyz
>>> tx = optax.chain(
...     rbyz.transforms.byzantine(rbyz.attacks.alie, f=5, key=0),
...     rbyz.transforms.aggregate(rbyz.aggregators.krum, f=5),
...     optax.sgd(0.1))  # doctest: +SKIP

Two modes, the same numbers:

- **stacked** (``axis_name=None``): updates carry the worker axis first, every leaf ``[n, ...]``;
- **collective** (``axis_name="workers"``): the transform runs on each shard of a named axis
  (``jax.shard_map``, ``jax.pmap`` or ``jax.vmap(axis_name=...)``), each shard holding its own
  worker's update (``tiled=True``: a stack of its own workers); the aggregating transforms
  gather over the axis and return the aggregate replicated on every shard (built-in rules can
  instead split the coordinates over the shards: ``layout="coordinates"`` in :func:`aggregate`).
  Compute the per-shard gradients with :func:`rbyz.distributed.local_grad` (inside ``shard_map``
  a plain ``jax.grad`` of replicated params silently sums the workers' gradients).

Warning:
  A transform that consumes stacked (or per-worker) updates must come first in a chain, before
  any transform that expects the model's shapes, and does not compose with ``optax.MultiSteps``
  or ``optax.apply_every`` (they would accumulate per-worker values). This is the same caveat as
  ``optax.contrib.differentially_private_aggregate``.

Random keys live in the states as raw ``uint32`` key data (``jax.random.key_data``), so states are
plain arrays that ``np.savez`` or any checkpointer stores as they are.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rbyz import distributed
from rbyz._src import checks
from rbyz._src import coordinates
from rbyz._src import tree as tree_util

Rule = Callable[..., Any]


# ----------------------------------------------------------------------------------------------
# Shared pieces: keys, rules, modes.


def _key_data(key, rule: str) -> jax.Array:
    """Raw ``uint32`` key data (what optax states can hold) from any key form ``as_key`` takes."""
    return jax.random.key_data(checks.as_key(key, rule))


def _split(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(next key data, typed key for this step)``."""
    carry, step = jax.random.split(jax.random.wrap_key_data(key_data))
    return jax.random.key_data(carry), step


def _resolve(rule: Rule | str, registry_module, kind: str) -> Rule:
    if isinstance(rule, str):
        return registry_module.get(rule)
    if not callable(rule):
        raise ValueError(f"{kind}: must be a function or a registered name; got {rule!r}.")
    return rule


def _parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return {}


def _takes(fn: Callable, name: str) -> bool:
    if isinstance(fn, functools.partial) and name in fn.keywords:
        return False  # already bound by the caller
    return name in _parameters(fn)


def _requires(fn: Callable, name: str) -> bool:
    param = _parameters(fn).get(name)
    return param is not None and param.default is inspect.Parameter.empty


def _rule_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _stacked_count(updates, params, where: str) -> int:
    """Validates stacked updates (worker axis first) and returns the worker count ``n``."""
    try:
        n = tree_util.num_workers(updates, where)
    except ValueError as err:
        raise ValueError(
            f"{err} (stacked mode, axis_name=None, expects every leaf [n, ...]; for one "
            "worker's update per shard of a named axis pass axis_name='workers')."
        ) from None
    if params is not None:
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
            checks.require(
                jnp.ndim(u) == jnp.ndim(p) + 1,
                where,
                f"stacked mode (axis_name=None) expects updates of shape [n, *param.shape]; got "
                f"a leaf of shape {jnp.shape(u)} for a param of shape {jnp.shape(p)}. Stack the "
                "workers' updates first, or pass axis_name='workers' inside shard_map/pmap/vmap.",
            )
    return n


def _gathered(updates, params, axis_name: str | None, tiled: bool, where: str):
    """The stacked updates of all workers, in either mode."""
    if axis_name is None:
        _stacked_count(updates, params, where)
        return updates
    try:
        return distributed.gather_workers(updates, axis_name, tiled=tiled)
    except ValueError as err:
        raise ValueError(str(err).replace("gather_workers", where)) from None


def _own_rows(stacked, axis_name: str | None, tiled: bool, where: str):
    """This shard's rows of a stacked pytree (all rows in stacked mode)."""
    if axis_name is None:
        return stacked
    index = _worker_index(axis_name, where)

    def own(leaf):
        if not tiled:
            return leaf[index]
        size = leaf.shape[0] // jax.lax.axis_size(axis_name)
        return jax.lax.dynamic_slice_in_dim(leaf, index * size, size, axis=0)

    return jax.tree.map(own, stacked)


def _worker_index(axis_name: str, where: str) -> jax.Array:
    try:
        return distributed.worker_index(axis_name)
    except ValueError as err:
        raise ValueError(str(err).replace("worker_index", where)) from None


# ----------------------------------------------------------------------------------------------
# aggregate


class AggregateState(NamedTuple):
    """State of :func:`aggregate`.

    Attributes:
      count: number of updates so far (int32).
      key: raw key data for rules that take a ``key`` (e.g. bucketing), else ``None``.
      center: the previous aggregate, for rules that take a ``center`` (centered clipping),
        else ``None``.
    """

    count: jax.Array
    key: jax.Array | None
    center: Any


_LAYOUTS = ("gather", "coordinates")


def aggregate(
    rule: Rule | str,
    *,
    axis_name: str | None = None,
    tiled: bool = False,
    layout: str = "gather",
    key=None,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """Aggregates the workers' updates with a (robust) rule: ``u = rule([u_1; ...; u_n])``.

    Stacked in, aggregated out. Rules whose signature has a ``center`` parameter are stateful
    (centered clipping): the state keeps the previous output ``v_{t-1}`` (zeros at the start) and
    passes it as ``center``, so ``v_t = rule(u; center=v_{t-1})``. Rules with a ``key``
    parameter (e.g. bucketing pipelines) receive a fresh key each step, split from ``key``.

    Constraints on ``n`` and ``f`` are the rule's, checked at trace time (``n`` from the shapes,
    ``f`` a keyword Python int in ``hparams``).

    Warning: must come first in an ``optax.chain`` (it consumes stacked updates) and does not
    compose with ``optax.MultiSteps``.

    Args:
      rule: an aggregator ``rule(updates, *, f, **hparams) -> pytree`` or its registry name in
        ``rbyz.aggregators``.
      axis_name: ``None`` for stacked updates; otherwise the named worker axis to gather over
        (collective mode, inside ``shard_map``/``pmap``/``vmap(axis_name=...)``).
      tiled: collective mode only: each shard holds a stack ``[m, ...]`` of its own workers.
      layout: collective mode only. ``"gather"``: every shard gathers all updates
        (``all_gather``) and computes the whole aggregate. ``"coordinates"``: each of the ``S``
        shards receives every worker's values on ``1/S`` of the coordinates (``all_to_all``) and
        aggregates that slice; whole-update norms and distances are summed over the shards
        (a ``psum`` of ``[n]`` or ``[n, n]`` values), so every shard selects and weights alike;
        the slices are joined (``all_gather``). The same numbers (up to float rounding of the
        distance sums) for ``1/S`` of the compute and memory per shard. Every rule of
        :mod:`rbyz.aggregators` but ``dnc`` (see
        :func:`rbyz.aggregators.supports_coordinate_layout`).
      key: int seed or jax key, for rules that take a ``key``.
      **hparams: passed to the rule (``f=...``, ``tau=...``, ...).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AggregateState`.

    Example:
      >>> import jax.numpy as jnp
      >>> def mean(updates, *, f=0):
      ...     return jax.tree.map(lambda u: u.mean(0), updates)
      >>> tx = aggregate(mean)
      >>> params = {"w": jnp.zeros(2)}
      >>> out, _ = tx.update({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, tx.init(params), params)
      >>> out["w"]
      Array([2., 3.], dtype=float32)

    References:
      Karimireddy, He, Jaggi, `Learning from History for Byzantine Robust Optimization`,
      ICML 2021 (centered clipping, stateful centre).
    """
    from rbyz import aggregators  # resolved late: the registry fills as rbyz is imported

    rule = _resolve(rule, aggregators, "aggregate")
    name = _rule_name(rule)
    stateful = _takes(rule, "center")
    takes_key = _takes(rule, "key")
    if key is not None and not takes_key:
        raise ValueError(f"aggregate: rule {name} takes no key; drop key={key!r}.")
    if takes_key and key is None and _requires(rule, "key"):
        raise ValueError(f"aggregate: rule {name} needs a random key; pass key=0 or a jax key.")
    key_data = _key_data(key, "aggregate") if key is not None else None
    _check_layout(layout, rule, axis_name)

    def init_fn(params):
        center = jax.tree.map(jnp.zeros_like, params) if stateful else None
        return AggregateState(jnp.zeros([], jnp.int32), key_data, center)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        kwargs = dict(hparams)
        next_key = state.key
        if state.key is not None:
            next_key, kwargs["key"] = _split(state.key)
        if layout == "coordinates":
            out = _aggregate_coordinates(rule, updates, state.center, axis_name, tiled, kwargs)
        else:
            stacked = _gathered(updates, params, axis_name, tiled, "aggregate")
            if stateful:
                kwargs["center"] = _cast_like_rows(state.center, stacked)
            out = rule(stacked, **kwargs)
        center = jax.tree.map(lambda o, c: o.astype(c.dtype), out, state.center) if stateful \
            else None
        return out, AggregateState(optax.safe_increment(state.count), next_key, center)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_layout(layout: str, rule: Rule, axis_name: str | None) -> None:
    from rbyz import aggregators

    checks.require(
        layout in _LAYOUTS,
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
        aggregators.supports_coordinate_layout(rule),
        "aggregate",
        f"layout='coordinates' needs a rule that runs on slices of the coordinates (every rule "
        f"of rbyz.aggregators but dnc, a compose() of built-in stages, or a coordinate-wise rule "
        f"of your own marked coordinate_slices = True); {_rule_name(rule)} is none of these. Use "
        "layout='gather'.",
    )


def _aggregate_coordinates(rule: Rule, updates, center, axis_name: str, tiled: bool, kwargs):
    """``rule`` on this shard's slice of the coordinates (sums over coordinates completed over
    the axis), the slices joined into the aggregate."""
    like = jax.tree.map(
        lambda u: jax.ShapeDtypeStruct(u.shape[1:] if tiled else u.shape, u.dtype), updates)
    try:
        stacked = distributed.scatter_coordinates(updates, axis_name, tiled=tiled)
        if center is not None:
            own = distributed.slice_coordinates(center, axis_name)
            kwargs = {**kwargs, "center": _cast_like_rows(own, stacked)}
        with coordinates.sharded(axis_name):
            part = rule(stacked, **kwargs)
        return distributed.gather_coordinates(part, like, axis_name)
    except ValueError as err:
        raise ValueError(str(err).replace("scatter_coordinates", "aggregate")) from None


def _cast_like_rows(center, stacked):
    """``center`` in the dtypes of the stacked updates' rows."""
    return jax.tree.map(lambda c, leaf: c.astype(leaf.dtype), center, stacked)


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

    Warning: must come first in an ``optax.chain`` (after other per-worker transforms).

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


# ----------------------------------------------------------------------------------------------
# byzantine


class ByzantineState(NamedTuple):
    """State of :func:`byzantine`: the step count and the attack's raw key data."""

    count: jax.Array
    key: jax.Array


def _byzantine_rows(n: int, f: int, positions: Sequence[int] | None) -> np.ndarray:
    rows = np.arange(n - f, n) if positions is None else np.asarray(positions, dtype=int)
    checks.require(
        rows.shape == (f,) and len(set(rows.tolist())) == f and all(0 <= r < n for r in rows),
        "byzantine",
        f"positions must be {f} distinct worker indices in [0, {n}); got {positions!r}.",
    )
    return rows


def byzantine(
    attack: Rule | str,
    *,
    f: int,
    key=0,
    positions: Sequence[int] | None = None,
    omniscient: bool = True,
    axis_name: str | None = None,
    tiled: bool = False,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """Replaces ``f`` workers' updates by an attack: ``u_B = attack(u_H; f, key)``.

    ``B`` are the Byzantine rows (``positions``, default the last ``f``), ``H`` the others. An
    omniscient attack sees the honest rows ``u_H``; otherwise it sees only the Byzantine workers'
    own honest updates ``u_B``. Attacks that take ``n`` receive the total worker count. The key
    lives in the state and is split every step. Needs ``0 <= f < n``.

    Warning: must come first in an ``optax.chain`` (before the aggregation).

    Args:
      attack: ``attack(honest, *, f, key=None, **hparams) -> [f, ...]`` or its registry name in
        ``rbyz.attacks``.
      f: number of Byzantine workers (static Python int).
      key: int seed or jax key.
      positions: the ``f`` Byzantine worker indices (static), default the last ``f``.
      omniscient: whether the attack sees the honest workers' updates.
      axis_name: ``None`` for stacked updates, else the named worker axis: the updates are
        gathered, attacked as in stacked mode, and each shard keeps its own row(s).
      tiled: collective mode only: each shard holds a stack of its own workers.
      **hparams: passed to the attack (e.g. ``z=1.0``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ByzantineState`.

    Example:
      >>> import jax.numpy as jnp
      >>> def opposite(honest, *, f, key=None):
      ...     return jnp.broadcast_to(-honest.mean(0), (f,) + honest.shape[1:])
      >>> tx = byzantine(opposite, f=1)
      >>> g = jnp.array([[1.0], [3.0], [5.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0][:, 0]
      Array([ 1.,  3., -2.], dtype=float32)

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
      Learning`, NeurIPS 2019.
    """
    from rbyz import attacks  # resolved late: the registry fills as rbyz is imported

    attack = _resolve(attack, attacks, "byzantine")
    f = checks.static_int(f, "byzantine", "f", minimum=0)
    key_data = _key_data(key, "byzantine")
    pass_key, pass_n = _takes(attack, "key"), _takes(attack, "n") and "n" not in hparams

    def attacked(stacked, step_key):
        n = tree_util.num_workers(stacked, "byzantine")
        checks.require(f < n, "byzantine", f"needs f < n; got n={n}, f={f}. Lower f.")
        bad = _byzantine_rows(n, f, positions)
        good = np.setdiff1d(np.arange(n), bad)
        seen = tree_util.take_rows(stacked, good if omniscient else bad)
        kwargs = dict(hparams, f=f)
        if pass_key:
            kwargs["key"] = step_key
        if pass_n:
            kwargs["n"] = n
        fake = attack(seen, **kwargs)
        return jax.tree.map(lambda u, b: u.at[bad].set(b.astype(u.dtype)), stacked, fake)

    def init_fn(params):
        del params
        return ByzantineState(jnp.zeros([], jnp.int32), key_data)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        stacked = _gathered(updates, params, axis_name, tiled, "byzantine")
        next_key, step_key = _split(state.key)
        out = _own_rows(attacked(stacked, step_key), axis_name, tiled, "byzantine")
        return out, ByzantineState(optax.safe_increment(state.count), next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Per-worker transforms


class PerWorkerState(NamedTuple):
    """State of :func:`per_worker`: the inner state with every leaf stacked ``[n, ...]``."""

    inner: Any


def _fold_worker_into_keys(state, worker: jax.Array):
    """Distinct streams per worker: folds the worker index into every typed key of a state."""

    def fold(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(leaf, worker)
        return leaf

    return jax.tree.map(fold, state)


def per_worker(
    tx: optax.GradientTransformation, *, n: int | None = None, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """Lifts ``tx`` to act on each worker's row: ``u_i, s_i = tx.update(u_i, s_i)`` for every i.

    Worker momentum, per-worker clipping or noise: each worker ``i`` keeps its own state ``s_i``.
    Random keys in ``tx``'s state (typed jax keys, as ``optax.add_noise`` keeps) get the worker
    index folded in, so the workers draw independent noise.

    In stacked mode the state is stacked ``[n, ...]``, so ``n`` must be given. In collective mode
    (``axis_name`` set) each shard already holds one worker: ``tx`` runs as it is on the shard's
    update, its keys folded with the shard's index at every step (so its random stream differs
    from stacked mode's); keep its state per shard (e.g. ``out_specs=P('workers')`` in
    ``shard_map``).

    Warning: must come first in an ``optax.chain`` (it consumes per-worker updates).

    Args:
      tx: any optax transformation.
      n: number of workers (stacked mode).
      axis_name: the named worker axis (collective mode), or ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`PerWorkerState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = per_worker(optax.clip_by_global_norm(1.0), n=2)
      >>> g = jnp.array([[3.0, 4.0], [0.3, 0.4]])
      >>> tx.update(g, tx.init(jnp.zeros(2)))[0]
      Array([[0.6, 0.8],
             [0.3, 0.4]], dtype=float32)
    """
    tx = optax.with_extra_args_support(tx)
    if axis_name is None:
        n = checks.static_int(n, "per_worker", "n", minimum=1)

    def init_fn(params):
        if axis_name is not None:
            return PerWorkerState(tx.init(params))
        workers = jnp.arange(n)
        return PerWorkerState(
            jax.vmap(lambda i: _fold_worker_into_keys(tx.init(params), i))(workers))

    def update_fn(updates, state, params=None, **extra_args):
        if axis_name is not None:
            inner = state.inner
            if _has_keys(inner):
                inner = _fold_worker_into_keys(inner, _worker_index(axis_name, "per_worker"))
            out, inner = tx.update(updates, inner, params, **extra_args)
            return out, PerWorkerState(inner)
        count = _stacked_count(updates, params, "per_worker")
        checks.require(count == n, "per_worker", f"built for n={n} workers; got {count}.")
        out, inner = jax.vmap(
            lambda u, s: tx.update(u, s, params, **extra_args))(updates, state.inner)
        return out, PerWorkerState(inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _has_keys(state) -> bool:
    return any(
        jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        for leaf in jax.tree.leaves(state) if hasattr(leaf, "dtype")
    )


class WorkerNoiseState(NamedTuple):
    """State of :func:`add_worker_noise`: the step count and raw key data."""

    count: jax.Array
    key: jax.Array


def add_worker_noise(
    b: float, *, key=0, axis_name: str | None = None, tiled: bool = False
) -> optax.GradientTransformationExtraArgs:
    """Adds independent Gaussian noise to every worker's update: ``u_i + b * xi_i``.

    ``xi_i ~ N(0, I)`` fresh per worker and per step, drawn from ``fold_in(key_t, i)`` so that
    stacked and collective modes draw the same numbers. This is the perturbation of Chen et al.'s
    noisy signSGD (Alg. 3) and noisy medianSGD (Alg. 4): noise *before* the sign or the median
    (noise added after aggregation does not close the median-mean gap). Any ``n``; ``b >= 0``.

    Args:
      b: noise standard deviation (static, ``>= 0``).
      key: int seed or jax key.
      axis_name: ``None`` for stacked updates, else the named worker axis (one worker per shard,
        or ``tiled=True`` for a stack of the shard's own workers).
      tiled: collective mode only.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`WorkerNoiseState`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = add_worker_noise(0.0)
      >>> tx.update(jnp.ones((3, 2)), tx.init(jnp.zeros(2)))[0].shape
      (3, 2)

    References:
      Chen, Chen, Sun, Wu, Hong, `Distributed Training with Heterogeneous Data: Bridging Median-
      and Mean-Based Algorithms`, NeurIPS 2020.
    """
    if not (isinstance(b, (int, float)) and b >= 0 and np.isfinite(b)):
        raise ValueError(f"add_worker_noise: b must be a finite float >= 0; got b={b!r}.")
    key_data = _key_data(key, "add_worker_noise")

    def noisy(row, worker, step_key):
        keys = jax.random.split(jax.random.fold_in(step_key, worker), len(jax.tree.leaves(row)))
        leaves, treedef = jax.tree.flatten(row)
        out = [
            (x.astype(jnp.float32) + b * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
            for x, k in zip(leaves, keys)
        ]
        return jax.tree.unflatten(treedef, out)

    def worker_ids(updates):
        count = tree_util.num_workers(updates, "add_worker_noise")
        if axis_name is None:
            return jnp.arange(count)
        return _worker_index(axis_name, "add_worker_noise") * count + jnp.arange(count)

    def init_fn(params):
        del params
        return WorkerNoiseState(jnp.zeros([], jnp.int32), key_data)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        next_key, step_key = _split(state.key)
        if axis_name is None:
            _stacked_count(updates, params, "add_worker_noise")
        stacked = axis_name is None or tiled
        rows = updates if stacked else jax.tree.map(lambda x: x[None], updates)
        out = jax.vmap(noisy, in_axes=(0, 0, None))(rows, worker_ids(rows), step_key)
        out = out if stacked else jax.tree.map(lambda x: x[0], out)
        return out, WorkerNoiseState(optax.safe_increment(state.count), next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sign() -> optax.GradientTransformationExtraArgs:
    """Elementwise sign of the updates: ``u -> sign(u)``, ``sign(0) = 0``; any mode or shape.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = sign()
      >>> tx.update(jnp.array([-2.0, 0.0, 3.0]), tx.init(None))[0]
      Array([-1.,  0.,  1.], dtype=float32)

    References:
      Bernstein, Wang, Azizzadenesheli, Anandkumar, `signSGD: Compressed Optimisation for
      Non-Convex Problems`, ICML 2018.
    """

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return jax.tree.map(jnp.sign, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


# ----------------------------------------------------------------------------------------------
# Algorithms


def noisy_sign_sgd(
    learning_rate: optax.ScalarOrSchedule,
    b: float,
    *,
    key=0,
    axis_name: str | None = None,
    layout: str = "gather",
) -> optax.GradientTransformationExtraArgs:
    """Noisy signSGD with majority vote (Chen et al. 2020, Alg. 3).

    ``x_{t+1} = x_t - lr * sign(sum_i sign(g_i + b * xi_i))``, ``xi_i ~ N(0, I)`` per worker and
    step. ``b = 0`` is signSGD-MV. The theory takes odd ``n``.

    Warning: consumes stacked (or, with ``axis_name``, per-shard) gradients: use it alone or
    first in a chain; not with ``optax.MultiSteps``.

    Args:
      learning_rate: step size or schedule.
      b: noise standard deviation.
      key: int seed or jax key for the noise.
      axis_name: ``None`` (stacked) or the named worker axis (collective).
      layout: collective mode only: ``"gather"`` or ``"coordinates"`` (each shard votes on its
        share of the coordinates), as in :func:`aggregate`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = noisy_sign_sgd(0.1, 0.0)
      >>> g = jnp.array([[1.0], [2.0], [-3.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]
      Array([-0.1], dtype=float32)

    References:
      Chen, Chen, Sun, Wu, Hong, `Distributed Training with Heterogeneous Data: Bridging Median-
      and Mean-Based Algorithms`, NeurIPS 2020.
    """
    return optax.chain(
        add_worker_noise(b, key=key, axis_name=axis_name),
        majority_vote(axis_name=axis_name, layout=layout),
        optax.sgd(learning_rate),
    )


def noisy_median_sgd(
    learning_rate: optax.ScalarOrSchedule,
    b: float,
    *,
    key=0,
    axis_name: str | None = None,
    layout: str = "gather",
) -> optax.GradientTransformationExtraArgs:
    """Noisy medianSGD (Chen et al. 2020, Alg. 4).

    ``x_{t+1} = x_t - lr * med_i(g_i + b * xi_i)`` (coordinate-wise median, NaN ranked last),
    ``xi_i ~ N(0, I)`` per worker and step. ``b = 0`` is medianSGD. The theory takes odd ``n``;
    for even ``n`` the two middle values are averaged.

    Warning: consumes stacked (or per-shard) gradients: use it alone or first in a chain.

    Args:
      learning_rate: step size or schedule.
      b: noise standard deviation.
      key: int seed or jax key for the noise.
      axis_name: ``None`` (stacked) or the named worker axis (collective).
      layout: collective mode only: ``"gather"`` or ``"coordinates"`` (each shard votes on its
        share of the coordinates), as in :func:`aggregate`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = noisy_median_sgd(0.1, 0.0)
      >>> g = jnp.array([[1.0], [2.0], [10.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]
      Array([-0.2], dtype=float32)

    References:
      Chen, Chen, Sun, Wu, Hong, `Distributed Training with Heterogeneous Data: Bridging Median-
      and Mean-Based Algorithms`, NeurIPS 2020.
    """
    return optax.chain(
        add_worker_noise(b, key=key, axis_name=axis_name),
        aggregate("median", axis_name=axis_name, layout=layout),
        optax.sgd(learning_rate),
    )


def _worker_momentum(
    tx: optax.GradientTransformation, n: int | None, axis_name: str | None
) -> optax.GradientTransformation:
    if axis_name is None and n is None:
        raise ValueError(
            "worker momentum keeps one state per worker: pass n=<number of workers> in stacked "
            "mode (or axis_name='workers' in collective mode)."
        )
    return per_worker(tx, n=n, axis_name=axis_name)


def signsgd_majority(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.0,
    n: int | None = None,
    axis_name: str | None = None,
    layout: str = "gather",
) -> optax.GradientTransformationExtraArgs:
    """signSGD with majority vote, and Signum with majority vote when ``momentum > 0``.

    Worker ``i``: ``v_i <- beta v_i + (1 - beta) g_i`` (``beta = momentum``); server:
    ``V = sign(sum_i sign(v_i))``; ``x <- x - lr * V``. ``sign(0) = 0``. Robust to ``f < n/2``
    sign-flipping workers.

    Args:
      learning_rate: step size or schedule.
      momentum: worker momentum ``beta`` in ``[0, 1)``.
      n: number of workers (stacked mode with momentum: the per-worker state is ``[n, ...]``).
      axis_name: ``None`` (stacked) or the named worker axis (collective).
      layout: collective mode only: ``"gather"`` or ``"coordinates"`` (each shard votes on its
        share of the coordinates), as in :func:`aggregate`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = signsgd_majority(0.5, momentum=0.9, n=3)
      >>> g = jnp.array([[1.0], [2.0], [-3.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]
      Array([-0.5], dtype=float32)

    References:
      Bernstein, Zhao, Azizzadenesheli, Anandkumar, `signSGD with Majority Vote is Communication
      Efficient and Fault Tolerant`, ICLR 2019.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"signsgd_majority: momentum must be in [0, 1); got {momentum}.")
    parts = []
    if momentum > 0:
        parts.append(_worker_momentum(optax.ema(momentum, debias=False), n, axis_name))
    parts += [majority_vote(axis_name=axis_name, layout=layout), optax.sgd(learning_rate)]
    return optax.chain(*parts)


def robust_sgd(
    rule: Rule | str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    worker_momentum: float = 0.0,
    n: int | None = None,
    axis_name: str | None = None,
    key=None,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """SGD on a robust aggregate, with optional worker momentum.

    Worker ``i``: ``m_i <- beta m_i + g_i`` (no dampening, as Karimireddy et al. 2021);
    server: ``u = rule([m_1; ...; m_n])``; ``x <- x - lr * u``. ``beta = 0`` is plain robust
    SGD. The rule's own constraints on ``n`` and ``f`` apply.

    Args:
      rule: an aggregator or its registry name.
      learning_rate: step size or schedule.
      worker_momentum: ``beta`` in ``[0, 1)``.
      n: number of workers (needed for worker momentum in stacked mode).
      axis_name: ``None`` (stacked) or the named worker axis (collective).
      key: int seed or jax key for rules that take a key.
      **hparams: passed to :func:`aggregate` and the rule (``f=...``, ``layout=...``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = robust_sgd("median", 1.0)
      >>> g = jnp.array([[1.0], [2.0], [1e30]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]
      Array([-2.], dtype=float32)

    References:
      Karimireddy, He, Jaggi, `Learning from History for Byzantine Robust Optimization`,
      ICML 2021.
    """
    if not 0.0 <= worker_momentum < 1.0:
        raise ValueError(f"robust_sgd: worker_momentum must be in [0, 1); got {worker_momentum}.")
    parts = []
    if worker_momentum > 0:
        parts.append(_worker_momentum(optax.trace(worker_momentum), n, axis_name))
    parts += [
        aggregate(rule, axis_name=axis_name, key=key, **hparams),
        optax.sgd(learning_rate),
    ]
    return optax.chain(*parts)


__all__ = (
    "AggregateState",
    "ByzantineState",
    "PerWorkerState",
    "WorkerNoiseState",
    "add_worker_noise",
    "aggregate",
    "byzantine",
    "majority_vote",
    "noisy_median_sgd",
    "noisy_sign_sgd",
    "per_worker",
    "robust_sgd",
    "sign",
    "signsgd_majority",
)
