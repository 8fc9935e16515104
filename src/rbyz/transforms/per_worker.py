"""Transforms applied to each worker's row: any optax transform lifted, worker noise, signs."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rbyz import distributed
from rbyz._src import checks
from rbyz._src import tree as tree_util
from rbyz.transforms import _modes


class PerWorkerState(NamedTuple):
    """State of :func:`per_worker`: the inner state with every leaf stacked ``[n, ...]`` (in
    collective mode, per shard: ``[m, ...]`` with ``tiled=True``, unstacked otherwise)."""

    inner: Any


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _fold_worker_into_keys(state, worker: jax.Array):
    """Distinct streams per worker: folds the worker index into every typed key of a state."""
    return jax.tree.map(lambda leaf: jax.random.fold_in(leaf, worker) if _is_key(leaf) else leaf,
                        state)


def per_worker(
    tx: optax.GradientTransformation,
    *,
    n: int | None = None,
    axis_name: str | None = None,
    tiled: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Lifts ``tx`` to act on each worker's row: ``u_i, s_i = tx.update(u_i, s_i)`` for every i.

    Worker momentum, per-worker clipping or noise: each worker ``i`` keeps its own state ``s_i``.
    Random keys in ``tx``'s state (typed jax keys, as ``optax.add_noise`` keeps) get the worker
    index folded in, so the workers draw independent noise.

    In stacked mode the state is stacked ``[n, ...]``, so ``n`` must be given. In collective mode
    (``axis_name`` set) each shard holds one worker (``tx`` runs as it is, its keys folded with
    the shard's index at every step) or, with ``tiled=True``, ``n`` workers of its own (the state
    is stacked ``[n, ...]`` per shard, keys folded with the local index at init and the shard's
    index at every step). Keep the state per shard (``out_specs=P('workers')`` in ``shard_map``).

    Warning: comes first in a chain, with the other stacked transforms.

    Args:
      tx: any optax transformation.
      n: number of workers (stacked mode), or workers per shard (collective mode, tiled).
      axis_name: the named worker axis (collective mode), or ``None``.
      tiled: collective mode only: each shard holds a stack of ``n`` workers.

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
    stacked = axis_name is None or tiled
    if stacked:
        n = checks.static_int(n, "per_worker", "n", minimum=1)
    shapes = _modes.ParamShapes()

    def init_fn(params):
        shapes.record(params)
        if not stacked:
            return PerWorkerState(tx.init(params))
        return PerWorkerState(
            jax.vmap(lambda i: _fold_worker_into_keys(tx.init(params), i))(jnp.arange(n)))

    def update_fn(updates, state, params=None, **extra_args):
        inner = state.inner
        if axis_name is None:
            count = _modes.check_stacked(updates, shapes.of(params), "per_worker")
        else:
            _modes.check_shard(updates, shapes.of(params), tiled, "per_worker")
            count = tree_util.num_workers(updates, "per_worker") if tiled else 1
            if any(_is_key(leaf) for leaf in jax.tree.leaves(inner)):
                shard = distributed.worker_index(axis_name, where="per_worker")
                inner = _fold_worker_into_keys(inner, shard)
        if not stacked:
            out, inner = tx.update(updates, inner, params, **extra_args)
            return out, PerWorkerState(inner)
        checks.require(count == n, "per_worker", f"built for n={n} workers; got {count}.")
        out, inner = jax.vmap(lambda u, s: tx.update(u, s, params, **extra_args))(updates, inner)
        return out, PerWorkerState(inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class WorkerNoiseState(NamedTuple):
    """State of :func:`add_worker_noise`: the step count and raw key data (``None`` for
    ``b = 0``, which draws nothing)."""

    count: jax.Array
    key: jax.Array | None


NOISE_DISTRIBUTIONS = ("gaussian", "laplace")


def add_worker_noise(
    b: float, *, key=None, distribution: str = "gaussian", axis_name: str | None = None,
    tiled: bool = False
) -> optax.GradientTransformationExtraArgs:
    """Adds independent noise to every worker's update: ``u_i + b * xi_i``.

    ``xi_i`` fresh per worker and per step, drawn from ``fold_in(key_t, i)`` with ``i`` the
    global worker index, so that stacked and collective modes draw the same numbers: standard
    normal coordinates (``distribution="gaussian"``, std ``b``) or standard Laplace ones
    (``"laplace"``, density ``exp(-|x|) / 2``: scale ``b``, std ``sqrt(2) b``), for the paper's
    "any symmetric unimodal" noise. This is the perturbation of Chen et al.'s noisy signSGD
    (Alg. 3) and noisy medianSGD (Alg. 4): noise *before* the sign or the median (noise added
    after aggregation does not close the median-mean gap), and the worker-level noise of
    :mod:`rbyz.privacy`. Any ``n``; ``b >= 0``.

    Args:
      b: the noise's standard deviation (Gaussian) or scale (Laplace) (static, ``>= 0``).
      key: int seed or jax key (required for ``b > 0``: experiments must not share a default
        seed).
      distribution: ``"gaussian"`` or ``"laplace"``.
      axis_name: ``None`` for stacked updates, else the named worker axis (one worker per shard,
        or ``tiled=True`` for a stack of the shard's own workers).
      tiled: collective mode only.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`WorkerNoiseState`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = add_worker_noise(0.0, key=0)
      >>> tx.update(jnp.ones((3, 2)), tx.init(jnp.zeros(2)))[0].shape
      (3, 2)

    References:
      Chen, Chen, Sun, Wu, Hong, `Distributed Training with Heterogeneous Data: Bridging Median-
      and Mean-Based Algorithms`, NeurIPS 2020.
    """
    if not (isinstance(b, (int, float)) and b >= 0 and np.isfinite(b)):
        raise ValueError(f"add_worker_noise: b must be a finite float >= 0; got b={b!r}.")
    if distribution not in NOISE_DISTRIBUTIONS:
        raise ValueError(f"add_worker_noise: distribution must be one of "
                         f"{', '.join(NOISE_DISTRIBUTIONS)}; got {distribution!r}.")
    draw = jax.random.normal if distribution == "gaussian" else jax.random.laplace
    # b = 0 draws nothing (signSGD-MV, medianSGD): no key is needed then.
    key_data = _modes.key_data(key, "add_worker_noise") if b > 0 or key is not None else None
    shapes = _modes.ParamShapes()

    def noisy(row, worker, step_key):
        leaves, treedef = jax.tree.flatten(row)
        keys = jax.random.split(jax.random.fold_in(step_key, worker), len(leaves))
        acc = [tree_util.accumulation_dtype(x.dtype) for x in leaves]
        out = [(x.astype(a) + b * draw(k, x.shape, a)).astype(x.dtype)
               for x, k, a in zip(leaves, keys, acc)]
        return jax.tree.unflatten(treedef, out)

    def init_fn(params):
        shapes.record(params)
        return WorkerNoiseState(jnp.zeros([], jnp.int32), key_data)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if axis_name is None:
            _modes.check_stacked(updates, shapes.of(params), "add_worker_noise")
        else:
            _modes.check_shard(updates, shapes.of(params), tiled, "add_worker_noise")
        if state.key is None:
            return updates, WorkerNoiseState(optax.safe_increment(state.count), None)
        next_key, step_key = _modes.split(state.key)
        stacked = axis_name is None or tiled
        rows = updates if stacked else jax.tree.map(lambda x: x[None], updates)
        count = tree_util.num_workers(rows, "add_worker_noise")
        workers = jnp.arange(count)
        if axis_name is not None:
            workers = distributed.worker_index(axis_name, where="add_worker_noise") * count + \
                workers
        out = jax.vmap(noisy, in_axes=(0, 0, None))(rows, workers, step_key)
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
