"""What every rbyz transform shares: keys kept in state, and the checks of the two modes.

Stacked mode: updates carry the worker axis first, every leaf ``[n, *param.shape]``.
Collective mode: each shard of a named axis holds one worker's update (``param.shape``) or, with
``tiled=True``, a stack of its own workers (``[m, *param.shape]``). Both are checked against the
params' shapes (given to ``update``, or recorded by ``init``) before any compute, so that a
forgotten ``tiled=True`` or a missing aggregation fails loudly instead of voting over the wrong
axis or giving the params a worker axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz import distributed
from rbyz._src import checks
from rbyz._src import tree as tree_util

ORDER_HINT = (
    "A defended chain runs the stacked transforms first (worker momentum, noise, byzantine), then "
    "one aggregation (aggregate, majority_vote), then model-shaped ones (optax.sgd, adam, clip); "
    "rbyz.transforms.robust(rule, f=..., optimizer=...) builds it in that order."
)


def key_data(key, where: str) -> jax.Array:
    """Raw ``uint32`` key data (what optax states can hold) from any key form ``as_key`` takes."""
    return jax.random.key_data(checks.as_key(key, where))


def split(data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(next key data, typed key for this step)``."""
    carry, step = jax.random.split(jax.random.wrap_key_data(data))
    return jax.random.key_data(carry), step


class ParamShapes:
    """The params' leaf shapes, recorded by ``init`` (static), to check updates against."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] | None = None

    def record(self, params) -> None:
        if params is not None:
            self.shapes = [tuple(jnp.shape(p)) for p in jax.tree.leaves(params)]

    def of(self, params) -> list[tuple[int, ...]] | None:
        if params is not None:
            return [tuple(jnp.shape(p)) for p in jax.tree.leaves(params)]
        return self.shapes


def check_stacked(updates, shapes, where: str) -> int:
    """Validates stacked updates ``[n, *param.shape]`` and returns ``n``."""
    try:
        n = tree_util.num_workers(updates, where)
    except ValueError as err:
        raise ValueError(
            f"{err} (stacked mode, axis_name=None, expects every leaf [n, ...]; for one "
            "worker's update per shard of a named axis pass axis_name='workers')."
        ) from None
    leaves = jax.tree.leaves(updates)
    if shapes is None or len(shapes) != len(leaves):
        return n
    for u, p in zip(leaves, shapes):
        if tuple(u.shape[1:]) == p:
            continue
        if tuple(u.shape) == p:
            raise ValueError(
                f"{where}: stacked mode (axis_name=None) expects updates of shape "
                f"[n, *param.shape]; got a leaf of shape {u.shape} for a param of the same shape. "
                "Either these are one worker's updates (stack the workers' updates first, or pass "
                "axis_name='workers' inside shard_map/pmap/vmap), or the params have gained a "
                "worker axis because a previous step's chain had no aggregation after its stacked "
                f"transforms, so apply_updates broadcast the stacked updates. {ORDER_HINT}"
            )
        raise ValueError(
            f"{where}: stacked mode (axis_name=None) expects updates of shape [n, *param.shape]; "
            f"got a leaf of shape {u.shape} for a param of shape {p}. {ORDER_HINT}"
        )
    return n


def check_shard(updates, shapes, tiled: bool, where: str) -> None:
    """Collective mode: each shard holds ``param.shape`` (or ``[m, *param.shape]`` if tiled)."""
    if shapes is None:
        return
    leaves = jax.tree.leaves(updates)
    if len(leaves) != len(shapes):
        return
    for u, p in zip(leaves, shapes):
        shape = tuple(jnp.shape(u))
        fits = (len(shape) == len(p) + 1 and shape[1:] == p) if tiled else shape == p
        if fits:
            continue
        if not tiled and shape[1:] == p:
            fix = (f"this shard holds a stack of {shape[0]} workers: pass tiled=True, or the vote "
                   "runs over devices instead of workers")
        elif tiled and shape == p:
            fix = "this shard holds one worker's update: drop tiled=True"
        else:
            fix = "each shard must hold its own workers' updates, shaped like the params"
        raise ValueError(
            f"{where}: collective mode (tiled={tiled}) expects per-shard updates of shape "
            f"{'[m, *param.shape]' if tiled else 'param.shape'}; got {shape} for a param of shape "
            f"{p}: {fix}."
        )


def gathered(updates, shapes, axis_name: str | None, tiled: bool, where: str):
    """The stacked updates of all workers, in either mode, after the mode's shape checks."""
    if axis_name is None:
        check_stacked(updates, shapes, where)
        return updates
    check_shard(updates, shapes, tiled, where)
    return distributed.gather_workers(updates, axis_name, tiled=tiled, where=where)


def own_rows(stacked, axis_name: str | None, tiled: bool, where: str):
    """This shard's rows of a stacked pytree (all rows in stacked mode)."""
    if axis_name is None:
        return stacked
    index = distributed.worker_index(axis_name, where=where)

    def own(leaf):
        if not tiled:
            return leaf[index]
        size = leaf.shape[0] // jax.lax.axis_size(axis_name)
        return jax.lax.dynamic_slice_in_dim(leaf, index * size, size, axis=0)

    return jax.tree.map(own, stacked)
