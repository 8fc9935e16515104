"""Multi-device helpers: meshes over workers, gathering updates, per-worker gradients.

Collective mode runs one program per shard of a named worker axis (``jax.shard_map``,
``jax.pmap`` or ``jax.vmap(axis_name=...)``). Each shard holds its own workers' updates; robust
rules need all of them, so they are gathered over the axis with :func:`gather_workers`, which
returns a value typed as replicated (invariant) under ``shard_map`` so that the aggregate can
leave with ``out_specs=P()``.

The aggregation can also be split instead of repeated: :func:`scatter_coordinates` (one
``all_to_all``) gives each of the ``S`` shards every worker's values on its ``1/S`` of the
coordinates, the rule runs on that slice (whole-update norms and distances summed over the shards,
see ``rbyz.transforms.aggregate(layout="coordinates")``), and :func:`gather_coordinates` (one
``all_gather``) reassembles the aggregate on every shard. Each shard then aggregates ``n d / S``
values instead of ``n d``.

Warning (the silent psum): inside ``shard_map`` with ``check_vma=True``, ``jax.grad`` with
respect to *replicated* params returns the gradient already summed over the worker axis (the
transpose of the implicit cast to varying is a ``psum``). Every "worker gradient" is then the
same sum and a robust aggregator sees ``n`` identical rows. :func:`local_grad` casts the params
to varying first so that each shard gets its own gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

P = PartitionSpec

WORKERS = "workers"


def _outside_axis_error(axis_name: str, where: str) -> ValueError:
    return ValueError(
        f"{where}: collective mode (axis_name={axis_name!r}) must run inside shard_map/pmap/"
        f"vmap(axis_name={axis_name!r}); for stacked updates (worker axis first) pass "
        "axis_name=None."
    )


def varying_axes(x) -> frozenset:
    """The manual mesh axes over which ``x`` varies (empty outside ``shard_map``).

    jax >= 0.10 exposes them as ``aval.manual_axis_type.varying``, older versions as
    ``aval.vma``.
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def _gather_leaf(x: jax.Array, axis_name: str, tiled: bool) -> jax.Array:
    if axis_name in varying_axes(x):
        # shard_map with check_vma: gather to an invariant value so out_specs=P() type-checks.
        # ``to='invarying'`` is rejected under vmap/pmap, hence the dispatch.
        return jax.lax.all_gather(x, axis_name, tiled=tiled, to="invarying")
    return jax.lax.all_gather(x, axis_name, tiled=tiled)


def gather_workers(tree, axis_name: str = WORKERS, *, tiled: bool = False,
                   where: str = "gather_workers"):
    """Stacks every shard's updates over the named axis: ``x -> [n, ...]`` on every shard.

    ``out[i] = x`` of shard ``i``. With ``tiled=True`` each shard holds a stack ``[m, ...]`` of
    its own ``m`` workers and the stacks are concatenated to ``[n * m, ...]``.

    Args:
      tree: a pytree of this shard's updates.
      axis_name: the named worker axis of the enclosing ``shard_map``/``pmap``/``vmap``.
      tiled: whether each leaf already carries a local worker axis.
      where: the public name that error messages give (a transform calling this names itself).

    Returns:
      The stacked pytree, replicated over the axis (typed invariant under ``shard_map``).

    Raises:
      ValueError: when ``axis_name`` is not bound by an enclosing map.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> g = jax.vmap(lambda x: gather_workers(x, "workers"), axis_name="workers")
      >>> g(jnp.arange(3.0))[0]
      Array([0., 1., 2.], dtype=float32)
    """
    try:
        return jax.tree.map(lambda x: _gather_leaf(x, axis_name, tiled), tree)
    except NameError:
        raise _outside_axis_error(axis_name, where) from None


def worker_index(axis_name: str = WORKERS, *, where: str = "worker_index") -> jax.Array:
    """This shard's index along the named worker axis (``ValueError`` naming ``where`` outside
    such a map)."""
    try:
        return jax.lax.axis_index(axis_name)
    except NameError:
        raise _outside_axis_error(axis_name, where) from None


def _axis_size(axis_name: str, where: str) -> int:
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        raise _outside_axis_error(axis_name, where) from None


def _inside_shard_map(axis_name: str, where: str) -> bool:
    """Whether ``axis_name`` is a manual axis of an enclosing ``shard_map`` (not vmap/pmap)."""
    _axis_size(axis_name, where)
    mesh = jax.sharding.get_abstract_mesh()
    return axis_name in getattr(mesh, "manual_axes", ())


def _as_varying(x, axis_name: str):
    if axis_name in varying_axes(x):
        return x
    return jax.lax.pcast(x, axis_name, to="varying")


def local_grad(
    loss_fn: Callable, axis_name: str = WORKERS, *, has_aux: bool = False
) -> Callable:
    """``jax.grad(loss_fn)`` that returns this shard's own gradient, never the sum over shards.

    Inside ``shard_map`` (``check_vma=True``) the params are cast to varying over ``axis_name``
    before differentiation: ``grad_i = d loss_fn(pcast(params), batch_i) / d params``, so that
    the transpose of the cast does not ``psum`` the workers' gradients. Under ``pmap``,
    ``vmap(axis_name=...)`` or ``check_vma=False`` it is plain ``jax.grad``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      axis_name: the named worker axis.
      has_aux: as in ``jax.grad``.

    Returns:
      ``grad_fn(params, *args)`` with the signature of ``jax.grad(loss_fn)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mesh = worker_mesh(4)
      >>> loss = lambda w, x: jnp.sum(w * x[0])  # each shard holds x of shape [1, 2]
      >>> step = jax.shard_map(local_grad(loss), mesh=mesh, in_specs=(P(), P("workers")),
      ...                      out_specs=P("workers"))
      >>> batches = shard_workers(jnp.arange(8.0).reshape(4, 2), mesh)
      >>> step(jnp.ones(2), batches)  # one row per worker, not their sum
      Array([0., 1., 2., 3., 4., 5., 6., 7.], dtype=float32)
    """
    grad_fn = jax.grad(loss_fn, has_aux=has_aux)

    def worker_grad(params, *args):
        # Under vmap(axis_name)/pmap there is no varying type and no implicit psum to avoid.
        if _inside_shard_map(axis_name, "local_grad"):
            params = jax.tree.map(lambda p: _as_varying(p, axis_name), params)
        return grad_fn(params, *args)

    return worker_grad


def _coordinate_blocks(rows: jax.Array, shards: int) -> jax.Array:
    """``[S, m, c]``: the ``[m, D]`` rows zero-padded to ``S c`` columns, ``c = ceil(D / S)``,
    block ``j`` holding columns ``[j c, (j + 1) c)``."""
    width = -(-rows.shape[1] // shards)
    padded = jnp.pad(rows, ((0, 0), (0, shards * width - rows.shape[1])))
    return padded.reshape(rows.shape[0], shards, width).swapaxes(0, 1)


def scatter_coordinates(tree, axis_name: str = WORKERS, *, tiled: bool = False,
                        where: str = "scatter_coordinates"):
    """Every worker's values on this shard's share of the coordinates (one ``all_to_all``).

    Each leaf is flattened to ``D`` coordinates and zero-padded to ``S c`` with ``S`` the axis
    size and ``c = ceil(D / S)``; shard ``j`` receives coordinates ``[j c, (j + 1) c)`` of every
    worker: ``out[i] = x_i[j c : (j + 1) c]``, an ``[n, c]`` stack in the order of
    :func:`gather_workers` (``n = S``, or ``S m`` with ``tiled=True`` and ``m`` workers per
    shard). A coordinate-wise rule applied to it gives this shard's slice of the aggregate;
    :func:`gather_coordinates` joins the slices.

    Args:
      tree: a pytree of this shard's update (``tiled=True``: a stack ``[m, ...]`` of its workers).
      axis_name: the named worker axis of the enclosing ``shard_map``/``pmap``/``vmap``.
      tiled: whether each leaf already carries a local worker axis.
      where: the public name that error messages give.

    Returns:
      A pytree of ``[n, c]`` slices, one per leaf (varying over the axis).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> scatter = jax.vmap(lambda x: scatter_coordinates(x, "workers"), axis_name="workers")
      >>> scatter(jnp.arange(6.0).reshape(2, 3))  # 2 workers, 3 coordinates, c = 2
      Array([[[0., 1.],
              [3., 4.]],
      <BLANKLINE>
             [[2., 0.],
              [5., 0.]]], dtype=float32)
    """
    shards = _axis_size(axis_name, where)
    in_shard_map = _inside_shard_map(axis_name, where)

    def scatter(leaf):
        blocks = _coordinate_blocks(leaf.reshape(leaf.shape[0] if tiled else 1, -1), shards)
        if in_shard_map:
            blocks = _as_varying(blocks, axis_name)
        # Block j goes to shard j; the blocks received are stacked in shard order.
        received = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)
        return received.reshape(-1, blocks.shape[-1])

    return jax.tree.map(scatter, tree)


def slice_coordinates(tree, axis_name: str = WORKERS):
    """This shard's slice of a pytree every shard holds whole (no communication).

    Cut as :func:`scatter_coordinates` cuts each worker's update: the flattened leaf,
    zero-padded to ``S c``, coordinates ``[j c, (j + 1) c)`` on shard ``j``. Used for state that
    a rule reads beside the updates, such as centered clipping's centre.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> own = jax.vmap(lambda _: slice_coordinates(jnp.arange(3.0), "workers"),
      ...                axis_name="workers")
      >>> own(jnp.zeros(2))
      Array([[0., 1.],
             [2., 0.]], dtype=float32)
    """
    shards = _axis_size(axis_name, "slice_coordinates")
    index = jax.lax.axis_index(axis_name)

    return jax.tree.map(lambda leaf: _coordinate_blocks(leaf.reshape(1, -1), shards)[index, 0],
                        tree)


def gather_coordinates(slices, like, axis_name: str = WORKERS):
    """Joins every shard's slice of an aggregate into the whole, on every shard (one
    ``all_gather``); the inverse of :func:`scatter_coordinates` for one aggregated row.

    Args:
      slices: a pytree of this shard's ``[c]`` slices (an aggregate of
        :func:`scatter_coordinates`'s output).
      like: a pytree with the aggregate's leaf shapes (arrays or ``jax.ShapeDtypeStruct``),
        e.g. one worker's update.
      axis_name: the named worker axis.

    Returns:
      A pytree shaped like ``like`` (dtypes of ``slices``), replicated over the axis (typed
      invariant under ``shard_map``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def column_max(x):
      ...     part = scatter_coordinates(x, "workers").max(axis=0)
      ...     return gather_coordinates(part, x, "workers")
      >>> jax.vmap(column_max, axis_name="workers")(jnp.array([[1.0, 5, 3], [4, 2, 6]]))[0]
      Array([4., 5., 6.], dtype=float32)
    """
    _axis_size(axis_name, "gather_coordinates")

    def gather(part, template):
        whole = _gather_leaf(part, axis_name, tiled=True)
        return whole[: math.prod(template.shape)].reshape(template.shape)

    return jax.tree.map(gather, slices, like)


def worker_mesh(num_devices: int | None = None, axis_name: str = WORKERS) -> Mesh:
    """A one-axis mesh named ``axis_name`` over the first ``num_devices`` devices (default all).

    Example:
      >>> dict(worker_mesh(4).shape)
      {'workers': 4}
    """
    available = jax.device_count()
    num_devices = available if num_devices is None else num_devices
    if not 1 <= num_devices <= available:
        raise ValueError(
            f"worker_mesh: needs 1 <= num_devices <= {available} (the devices present); got "
            f"num_devices={num_devices}. On the CPU, set jax.config.update('jax_num_cpu_devices',"
            " N) before any JAX operation to simulate more."
        )
    return jax.make_mesh((num_devices,), (axis_name,), devices=jax.devices()[:num_devices])


def shard_workers(tree, mesh: Mesh, axis_name: str = WORKERS):
    """Places a stacked pytree with its worker axis (axis 0) split over ``mesh``'s named axis.

    Example:
      >>> import jax.numpy as jnp
      >>> x = shard_workers(jnp.zeros((8, 3)), worker_mesh(4))
      >>> x.sharding.spec[0]
      'workers'
    """
    mesh_size(mesh, axis_name, "shard_workers")
    return jax.device_put(tree, NamedSharding(mesh, P(axis_name)))


def replicate(tree, mesh: Mesh):
    """Places a pytree (params, optimizer state) replicated on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put(tree, mesh: Mesh, specs=None):
    """Places host values on ``mesh`` as ``specs`` says (default: replicated), in one process or
    across processes (each process passes the same whole values and keeps its own devices'
    parts; ``jax.make_array_from_callback``).

    Args:
      tree: a pytree of arrays, the same on every process.
      mesh: the mesh.
      specs: a ``PartitionSpec``, or a pytree of them matching ``tree`` (``None``: ``P()``).

    Example:
      >>> import jax.numpy as jnp
      >>> put({"w": jnp.ones(8)}, worker_mesh(4), {"w": P("workers")})["w"].sharding.spec[0]
      'workers'
    """
    if specs is None or isinstance(specs, PartitionSpec):
        specs = jax.tree.map(lambda _: specs or P(), tree)

    def place(x, spec):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec),
                                            lambda index: host[index])

    return jax.tree.map(place, tree, specs)


def mesh_size(mesh: Mesh, axis_name: str = WORKERS, where: str = "mesh_size") -> int:
    """The size of ``mesh``'s axis ``axis_name``; a ``ValueError`` naming the mesh's axes and
    the fix when it has no such axis.

    Example:
      >>> mesh_size(worker_mesh(4))
      4
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"{where}: the mesh has axes {tuple(mesh.axis_names)}, none named {axis_name!r}; "
            f"build it with rbyz.distributed.worker_mesh() (axis 'workers'), or pass "
            f"axis_name=<the mesh's worker axis> here and to the transforms.")
    return mesh.shape[axis_name]


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def state_specs(tx, params, mesh: Mesh, *, num_workers: int, axis_name: str = WORKERS,
                rounds: int = 3):
    """The ``PartitionSpec`` of every leaf of ``tx``'s state when ``tx.update`` runs in
    collective mode under ``jax.shard_map`` over ``mesh``'s ``axis_name`` (``tiled``):
    ``P(axis_name)`` for the leaves that hold one value per worker (worker momenta: each device
    keeps its own workers' rows), ``P()`` for the rest (counts, keys, a rule's centre).

    Found by tracing (no compute): the state that ``init`` gives, then ``update`` of
    ``num_workers`` workers' updates shaped like ``params``, until no more leaves become
    per-device (a leaf varies over the axis exactly when it came from the device's own rows).
    Nobody writes ``P('workers')`` trees by hand, and a transform of one's own is handled alike.

    Args:
      tx: a transformation built in collective mode (``axis_name=...``, ``tiled=True``).
      params: the params (arrays or ``jax.ShapeDtypeStruct``).
      mesh: the mesh.
      num_workers: the number of workers over the whole mesh.
      axis_name: the mesh's worker axis.
      rounds: how many updates to trace at most.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``tx.init(params)``.

    Raises:
      ValueError: a scalar leaf of the state varies over the devices (it cannot be split over
        them), or the specs do not settle within ``rounds`` updates.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rbyz import transforms
      >>> tx = transforms.robust("median", f=1, momentum=0.9, n=2, optimizer=optax.sgd(0.1),
      ...                        axis_name="workers", tiled=True)
      >>> specs = state_specs(tx, jnp.zeros(3), worker_mesh(4), num_workers=8)
      >>> specs[0].inner.trace == P("workers"), specs[1].count == P()
      (True, True)
    """
    devices = mesh_size(mesh, axis_name, "state_specs")

    def struct(x, spec, scale=1):
        shape = tuple(np.shape(x))
        if spec != P() and scale > 1:
            shape = (shape[0] * scale, *shape[1:])
        return jax.ShapeDtypeStruct(shape, jnp.result_type(x), sharding=NamedSharding(mesh, spec))

    abstract_params = jax.tree.map(lambda x: struct(x, P()), params)
    updates = jax.tree.map(
        lambda x: struct(np.zeros((num_workers, *np.shape(x)), jnp.result_type(x)),
                         P(axis_name)), params)
    local_state = jax.eval_shape(tx.init, abstract_params)
    varies = []

    def probe(params, updates, state=None):
        _, new = tx.update(updates, tx.init(params) if state is None else state, params)
        varies.append(jax.tree.map(lambda leaf: axis_name in varying_axes(leaf), new))
        return jnp.zeros(())

    specs = jax.tree.map(lambda _: P(), local_state)
    for first in [True] + [False] * (rounds - 1):
        varies.clear()
        if first:  # the state as init gives it, on every device
            jax.eval_shape(jax.shard_map(probe, mesh=mesh, in_specs=(P(), P(axis_name)),
                                         out_specs=P()), abstract_params, updates)
        else:
            state = jax.tree.map(lambda x, spec: struct(x, spec, devices), local_state, specs)
            jax.eval_shape(jax.shard_map(probe, mesh=mesh, in_specs=(P(), P(axis_name), specs),
                                         out_specs=P()), abstract_params, updates, state)
        new_specs = jax.tree.map(lambda v, spec: P(axis_name) if v else spec, varies[0], specs,
                                 is_leaf=_is_spec)
        leaves = jax.tree_util.tree_leaves_with_path(local_state)
        for spec, (path, leaf) in zip(jax.tree.leaves(new_specs, is_leaf=_is_spec), leaves):
            if spec != P() and not np.shape(leaf):
                raise ValueError(
                    f"state_specs: the state leaf {jax.tree_util.keystr(path)} is a scalar "
                    f"that differs between devices; keep one value per worker ([m] per device) "
                    f"or reduce it over {axis_name!r} (jax.lax.psum / pmax) in the transform.")
        if new_specs == specs:
            return specs
        specs = new_specs
    raise ValueError(f"state_specs: the state's per-device leaves did not settle within {rounds} "
                     "traced updates; pass a larger rounds=.")


def init_sharded(tx, params, mesh: Mesh, specs, *, axis_name: str = WORKERS):
    """``tx.init(params)`` on every device of ``mesh``, placed as ``specs`` says
    (:func:`state_specs`): per-worker leaves ``[n, ...]`` split over ``axis_name``, each device
    initialising its own workers' rows, the rest replicated.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rbyz import transforms
      >>> tx = transforms.per_worker(optax.trace(0.9), n=2, axis_name="workers", tiled=True)
      >>> mesh = worker_mesh(4)
      >>> specs = state_specs(tx, jnp.zeros(3), mesh, num_workers=8)
      >>> init_sharded(tx, jnp.zeros(3), mesh, specs).inner.trace.shape  # 8 workers' momenta
      (8, 3)
    """
    mesh_size(mesh, axis_name, "init_sharded")
    params = put(params, mesh)
    return jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs))(params)


__all__ = (
    "gather_coordinates",
    "gather_workers",
    "init_sharded",
    "local_grad",
    "mesh_size",
    "put",
    "replicate",
    "scatter_coordinates",
    "shard_workers",
    "slice_coordinates",
    "state_specs",
    "varying_axes",
    "worker_index",
    "worker_mesh",
)
