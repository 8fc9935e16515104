"""Collective mode on 8 simulated CPU devices: the same numbers as stacked mode.

Every aggregating transform, and a full training step (per-worker noise, attack, robust rule,
optimizer), runs (1) stacked under jit, (2) under ``jax.shard_map``, (3) under ``jax.pmap`` and
(4) under ``jax.vmap(axis_name=...)``, and the results must agree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import P

from rbyz import aggregators, distributed, transforms
from rbyz import preaggregators as pre

N = 8
D = 4
AXIS = "workers"

pytestmark = pytest.mark.skipif(jax.device_count() < N, reason="needs 8 (simulated) devices")


@functools.cache
def _mesh(size: int = N):
    return distributed.worker_mesh(size)


def _collective(fn, mode: str):
    """``fn(params, state, per_worker)`` run per worker, params and state replicated."""
    if mode == "shard_map":
        mapped = jax.shard_map(fn, mesh=_mesh(), in_specs=(P(), P(), P(AXIS)),
                               out_specs=(P(), P()))
        return jax.jit(lambda p, s, x: mapped(p, s, distributed.shard_workers(x, _mesh())))
    if mode == "pmap":
        return jax.pmap(fn, axis_name=AXIS, in_axes=(None, None, 0), out_axes=(None, None))
    if mode == "vmap":
        return jax.jit(jax.vmap(fn, axis_name=AXIS, in_axes=(None, None, 0), out_axes=(None, None)))
    raise ValueError(mode)


def _squeeze_shard(x):
    """Under shard_map each shard keeps a leading block axis of size 1; pmap/vmap drop it."""
    return jax.tree.map(lambda leaf: leaf.reshape(leaf.shape[1:]) if leaf.ndim and
                        leaf.shape[0] == 1 else leaf, x)


def _flip_attack(honest, *, f, key=None):
    return jax.tree.map(lambda x: jnp.broadcast_to(-3.0 * x.mean(0), (f,) + x.shape[1:]), honest)


RULES = {
    "median": lambda axis: transforms.aggregate("median", f=2, axis_name=axis),
    "krum": lambda axis: transforms.aggregate("krum", f=2, axis_name=axis),
    "centered_clipping": lambda axis: transforms.aggregate(
        "centered_clipping", f=2, tau=0.5, axis_name=axis),
    "majority_vote": lambda axis: transforms.majority_vote(axis_name=axis),
    "byzantine+trimmed_mean": lambda axis: optax.chain(
        transforms.byzantine(_flip_attack, f=2, key=3, axis_name=axis),
        transforms.aggregate("trimmed_mean", f=2, axis_name=axis)),
}

MODES = ["shard_map", "pmap", "vmap"]


def _updates():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(N, 2, 3)), jnp.float32)}


def _params():
    return {"w": jnp.zeros(D), "b": jnp.zeros((2, 3))}


def _two_steps(tx, update, per_worker):
    state = tx.init(_params())
    outs = []
    for scale in (1.0, 2.0):
        out, state = update(_params(), state, jax.tree.map(lambda x: scale * x, per_worker))
        outs.append(out)
    return outs


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_collective_equals_stacked(rule):
    stacked_tx = RULES[rule](None)
    stacked = _two_steps(stacked_tx, jax.jit(lambda p, s, u: stacked_tx.update(u, s, p)),
                         _updates())
    tx = RULES[rule](AXIS)

    def worker(params, state, update):
        return tx.update(_squeeze_shard(update), state, params)

    for mode in MODES:
        got = _two_steps(tx, _collective(worker, mode), _updates())
        for a, b in zip(stacked, got):
            jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
                         a, b)


# The coordinate-sharded layout: all_to_all, aggregate a slice, all_gather.

def _coordinate_rules():
    nnm_krum = pre.compose(functools.partial(pre.nnm, f=2), functools.partial(aggregators.krum,
                                                                              f=2))
    rules = {name: (name, {"f": 2}) for name in aggregators.names()
             if aggregators.supports_coordinate_layout(aggregators.get(name))}
    rules["bulyan"] = ("bulyan", {"f": 1})  # n = 8 >= 4f + 3
    rules["centered_clipping"] = ("centered_clipping", {"f": 2, "tau": 0.5, "iterations": 2})
    rules["nnm+krum"] = (nnm_krum, {})
    arc_bucketing_median = pre.compose(functools.partial(pre.arc, f=2),
                                       functools.partial(pre.bucketing, s=2), aggregators.median)
    rules["arc+bucketing+median"] = (arc_bucketing_median, {"key": 3})  # the same key per shard
    return rules


def _hostile_updates():
    """Two hostile rows: one NaN in a single coordinate (seen by one shard only), one at 1e30."""
    updates = _updates()
    return {"w": updates["w"].at[7].set(1e30), "b": updates["b"].at[6, 1, 2].set(jnp.nan)}


@pytest.mark.parametrize("rule", sorted(_coordinate_rules()))
def test_coordinate_layout_equals_stacked(rule):
    # Leaves of 4 and 6 coordinates over 8 shards: every slice is padded.
    fn, hparams = _coordinate_rules()[rule]
    make = functools.partial(transforms.aggregate, fn, **hparams)
    updates = _updates() if rule in ("bulyan", "mean") else _hostile_updates()
    stacked_tx = make()
    stacked = _two_steps(stacked_tx, jax.jit(lambda p, s, u: stacked_tx.update(u, s, p)),
                         updates)
    tx = make(axis_name=AXIS, layout="coordinates")

    def worker(params, state, update):
        return tx.update(_squeeze_shard(update), state, params)

    for mode in MODES:
        got = _two_steps(tx, _collective(worker, mode), updates)
        for a, b in zip(stacked, got):
            assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(b))
            jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6),
                         a, b)


WEIGHTED_RULES = {"median": {"f": 2}, "multi_krum": {"f": 2},
                  "centered_clipping": {"f": 2, "tau": 0.5}, "trimmed_mean": {"f": 2}}


@pytest.mark.parametrize("layout", ["gather", "coordinates"])
@pytest.mark.parametrize("rule", sorted(WEIGHTED_RULES))
def test_weights_collective_equal_stacked(rule, layout):
    """Each shard passes its own weight; they are gathered like the updates."""
    weights = jnp.asarray([1.0, 4.0, 0.5, 2.0, 3.0, 1.0, 0.0, 2.5])
    make = functools.partial(transforms.aggregate, rule, **WEIGHTED_RULES[rule])
    stacked_tx = make()
    stacked = _two_steps(
        stacked_tx, jax.jit(lambda p, s, u: stacked_tx.update(u, s, p, weights=weights)),
        _hostile_updates())
    unweighted = _two_steps(stacked_tx, jax.jit(lambda p, s, u: stacked_tx.update(u, s, p)),
                            _hostile_updates())
    assert not np.allclose(stacked[0]["w"], unweighted[0]["w"])  # the weights matter here
    tx = make(axis_name=AXIS, layout=layout)

    def worker(params, state, update_and_weight):
        update, weight = _squeeze_shard(update_and_weight)
        return tx.update(update, state, params, weights=weight)

    for mode in MODES:
        got = _two_steps(tx, _collective(worker, mode), (_hostile_updates(), weights))
        for a, b in zip(stacked, got):
            jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6),
                         a, b)


@pytest.mark.parametrize("layout", ["gather", "coordinates"])
@pytest.mark.parametrize("rule", ["multi_krum", "caf", "centered_clipping"])
def test_selection_collective_equals_stacked(rule, layout):
    """report=True: the selection each shard keeps is the stacked one (whole-update distances
    are summed over the shards in the coordinate layout, so every shard selects alike)."""
    hparams = {"f": 2, **({"tau": 0.5} if rule == "centered_clipping" else {})}
    make = functools.partial(transforms.aggregate, rule, report=True, num_workers=N, **hparams)
    stacked_tx = make()
    _, want = stacked_tx.update(_hostile_updates(), stacked_tx.init(_params()), _params())
    tx = make(axis_name=AXIS, layout=layout)

    def worker(params, state, update):
        _, new = tx.update(_squeeze_shard(update), state, params)
        return new.selection.weights, new.count

    for mode in MODES:
        got, _ = _collective(worker, mode)(_params(), tx.init(_params()), _hostile_updates())
        np.testing.assert_allclose(got, want.selection.weights, rtol=1e-6, atol=1e-7)


def test_weights_refused_by_a_rule_without_them_and_shaped_per_shard():
    tx = transforms.aggregate("meamed", f=2)
    with pytest.raises(ValueError, match="aggregate: meamed takes no per-worker weights"):
        tx.update(_updates(), tx.init(_params()), _params(), weights=jnp.ones(N))
    tx = transforms.aggregate("median", f=2, axis_name=AXIS)
    with pytest.raises(ValueError, match="each shard passes its own weight, a scalar"):
        jax.vmap(lambda u: tx.update(u, tx.init(_params()), _params(), weights=jnp.ones(N)),
                 axis_name=AXIS)(_updates())


def test_coordinate_layout_with_tiled_shards_and_a_large_leaf():
    mesh = _mesh(4)  # 2 workers per shard
    updates = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(N, 1001)), jnp.float32),
               "b": jnp.asarray(np.random.default_rng(3).normal(size=(N, 3)), jnp.float32)}
    stacked_tx = transforms.aggregate("trimmed_mean", f=2)
    expected, _ = stacked_tx.update(updates, stacked_tx.init(None))
    tx = transforms.aggregate("trimmed_mean", f=2, axis_name=AXIS, tiled=True,
                              layout="coordinates")
    step = jax.jit(jax.shard_map(lambda s, u: tx.update(u, s), mesh=mesh,
                                 in_specs=(P(), P(AXIS)), out_specs=(P(), P())))
    sharded = distributed.shard_workers(updates, mesh)
    got, _ = step(tx.init(None), sharded)
    jax.tree.map(np.testing.assert_array_equal, expected, got)
    hlo = step.lower(tx.init(None), sharded).compile().as_text()
    assert "all-to-all" in hlo and "all-gather" in hlo


def test_scatter_then_gather_coordinates_round_trips():
    x = jnp.arange(N * 5 * 3.0).reshape(N, 5, 3)

    def round_trip(row):
        parts = distributed.scatter_coordinates(row, AXIS)
        return parts, distributed.gather_coordinates(parts[3], row, AXIS)  # worker 3, joined

    parts, rows = jax.vmap(round_trip, axis_name=AXIS)(x)
    width = -(-15 // N)  # 2 coordinates per shard, one of padding on the last
    assert parts.shape == (N, N, width)
    flat = np.pad(np.asarray(x).reshape(N, 15), ((0, 0), (0, N * width - 15)))
    for shard in range(N):
        np.testing.assert_array_equal(parts[shard], flat[:, shard * width:(shard + 1) * width])
    for shard in range(N):
        np.testing.assert_array_equal(rows[shard], x[3])


def test_custom_coordinatewise_rule_may_use_the_coordinate_layout():
    def upper_half_mean(updates, *, f=0):
        return jax.tree.map(lambda x: jnp.sort(x, axis=0)[x.shape[0] // 2:].mean(0), updates)

    with pytest.raises(ValueError, match="upper_half_mean is not. Use layout='gather'"):
        transforms.aggregate(upper_half_mean, axis_name=AXIS, layout="coordinates")
    declared = aggregators.declare(coordinate_slices=True)(upper_half_mean)
    tx = transforms.aggregate(declared, axis_name=AXIS, layout="coordinates")
    got = jax.vmap(lambda u: tx.update(u, tx.init(None))[0], axis_name=AXIS)(_updates())
    expected = upper_half_mean(_updates())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-6), got, expected)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: transforms.aggregate(lambda u, f=0: u, axis_name=AXIS, layout="coordinates"),
         r"aggregate: layout='coordinates' needs a rule declared to run on slices .* <lambda> is "
         r"not"),
        (lambda: transforms.aggregate("median", layout="coordinates"),
         r"aggregate: layout='coordinates' splits the coordinates .* pass axis_name="),
        (lambda: transforms.aggregate("median", axis_name=AXIS, layout="rows"),
         r"aggregate: unknown layout 'rows'"),
        (lambda: transforms.aggregate("dnc", f=1, key=0, axis_name=AXIS, layout="coordinates"),
         r"aggregate: layout='coordinates' needs .* but dnc.* dnc is not"),
    ],
)
def test_coordinate_layout_misuse_is_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# A full training step: per-worker gradients, noise, attack, robust rule, optimizer.


def _loss(params, batch):
    batch = batch.reshape(-1, D + 1)  # one worker's batch, with or without a block axis
    pred = batch[:, :D] @ params["w"] + params["b"]
    return jnp.mean((pred - batch[:, D]) ** 2)


def _chain(axis):
    return optax.chain(
        transforms.add_worker_noise(0.05, key=1, axis_name=axis),
        transforms.byzantine(_flip_attack, f=2, key=2, axis_name=axis),
        transforms.aggregate("centered_clipping", f=2, tau=1.0, axis_name=axis),
        optax.clip_by_global_norm(5.0),
        optax.sgd(0.1, momentum=0.9),
    )


def _batches(steps: int = 3):
    return jnp.asarray(np.random.default_rng(1).normal(size=(steps, N, 6, D + 1)), jnp.float32)


def _train(step, tx):
    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    state = tx.init(params)
    for batch in _batches():
        params, state = step(params, state, batch)
    return params


@functools.cache
def _stacked_training():
    tx = _chain(None)

    @jax.jit
    def step(params, state, batch):
        grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return _train(step, tx)


@pytest.mark.parametrize("mode", MODES)
def test_training_step_collective_equals_stacked(mode):
    tx = _chain(AXIS)

    def worker(params, state, batch):
        grads = distributed.local_grad(_loss, AXIS)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    got = _train(_collective(worker, mode), tx)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 _stacked_training(), got)


def test_plain_grad_in_shard_map_sums_workers_but_local_grad_does_not():
    def grads_with(grad_fn):
        step = jax.shard_map(lambda p, x: grad_fn(_loss)(p, x)["w"][None], mesh=_mesh(),
                             in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
        params = {"w": jnp.ones(D), "b": jnp.zeros(())}
        return np.asarray(step(params, distributed.shard_workers(_batches()[0], _mesh())))

    expected = np.stack([np.asarray(jax.grad(_loss)({"w": jnp.ones(D), "b": jnp.zeros(())},
                                                     row)["w"]) for row in _batches()[0]])
    np.testing.assert_allclose(grads_with(lambda fn: distributed.local_grad(fn, AXIS)), expected,
                               rtol=1e-5)
    summed = grads_with(jax.grad)
    np.testing.assert_allclose(summed, np.broadcast_to(expected.sum(0), expected.shape),
                               rtol=1e-5)


def test_tiled_shards_hold_several_workers():
    mesh = _mesh(4)
    tx = transforms.aggregate("median", f=2, axis_name=AXIS, tiled=True)
    stacked_tx = transforms.aggregate("median", f=2)
    updates = _updates()["w"]
    expected, _ = stacked_tx.update(updates, stacked_tx.init(jnp.zeros(D)))
    step = jax.jit(jax.shard_map(lambda s, u: tx.update(u, s), mesh=mesh,
                                 in_specs=(P(), P(AXIS)), out_specs=(P(), P())))
    got, _ = step(tx.init(jnp.zeros(D)), distributed.shard_workers(updates, mesh))
    np.testing.assert_array_equal(got, expected)


def test_worker_noise_identical_in_both_modes():
    stacked_tx = transforms.add_worker_noise(1.0, key=5)
    expected, _ = stacked_tx.update(_updates()["w"], stacked_tx.init(jnp.zeros(D)))
    tx = transforms.add_worker_noise(1.0, key=5, axis_name=AXIS)
    got = jax.vmap(lambda u: tx.update(u, tx.init(jnp.zeros(D)))[0], axis_name=AXIS)(
        _updates()["w"])
    np.testing.assert_array_equal(got, expected)


def test_gather_outside_named_axis_says_which_mode():
    with pytest.raises(ValueError, match="axis_name=None"):
        distributed.gather_workers(jnp.zeros(3), AXIS)
    with pytest.raises(ValueError, match="local_grad: collective mode"):
        jax.jit(distributed.local_grad(_loss, AXIS))(_params(), jnp.zeros((2, D + 1)))


def test_worker_mesh_rejects_too_many_devices():
    with pytest.raises(ValueError, match="num_devices"):
        distributed.worker_mesh(jax.device_count() + 1)


def _momentum_chain(axis=None, per_shard=None):
    mode = dict(axis_name=axis, tiled=True) if axis else {}
    return transforms.robust("trimmed_mean", f=2, attack="sign_flip", momentum=0.9,
                             n=per_shard or 2 * N, optimizer=optax.sgd(0.1), **mode)


def _momentum_batches(steps: int = 3):
    return jnp.asarray(np.random.default_rng(2).normal(size=(steps, 2 * N, 6, D + 1)),
                       jnp.float32)


def test_state_specs_split_the_worker_momenta_and_replicate_the_rest():
    tx = _momentum_chain(AXIS, per_shard=2)
    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    specs = distributed.state_specs(tx, params, _mesh(), num_workers=2 * N)
    assert jax.tree.leaves(specs[0].inner.trace) == [P(AXIS), P(AXIS)]
    assert all(s == P() for s in jax.tree.leaves(specs[1:], is_leaf=lambda x: isinstance(x, P)))
    state = distributed.init_sharded(tx, params, _mesh(), specs)
    stacked = _momentum_chain().init(params)
    assert jax.tree.map(np.shape, state) == jax.tree.map(np.shape, stacked)


@pytest.mark.skipif(not hasattr(jax, "pmap"), reason="this jax has no pmap")
def test_pmap_training_step_with_worker_momentum_equals_stacked():
    """A user's own pmap step: per-device state on a leading device axis, the workers' momenta
    ``[D, m, ...]`` laid out as ``state_specs`` says, the rest replicated per device."""
    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    stacked_tx, tx = _momentum_chain(), _momentum_chain(AXIS, per_shard=2)

    @jax.jit
    def stacked_step(params, state, batch):
        grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, batch)
        updates, state = stacked_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def device_step(params, state, batch):  # batch: this device's [2, ...] workers
        grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.pmap(device_step, axis_name=AXIS, in_axes=(None, 0, 0), out_axes=(None, 0))
    specs = distributed.state_specs(tx, params, _mesh(), num_workers=2 * N)
    per_device = jax.tree.map(
        lambda x, spec: (x.reshape(N, -1, *x.shape[1:]) if spec == P(AXIS)
                         else jnp.broadcast_to(x, (N, *x.shape))),
        stacked_tx.init(params), specs)
    want, got, state = params, params, stacked_tx.init(params)
    for batch in _momentum_batches():
        want, state = stacked_step(want, state, batch)
        got, per_device = step(got, per_device, batch.reshape(N, 2, *batch.shape[1:]))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.parametrize("call", [
    lambda mesh: distributed.shard_workers(jnp.zeros((8, 2)), mesh),
    lambda mesh: distributed.state_specs(transforms.aggregate("median"), jnp.zeros(2), mesh,
                                         num_workers=8),
    lambda mesh: distributed.mesh_size(mesh),
])
def test_a_mesh_without_the_workers_axis_is_a_clear_error(call):
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="the mesh has axes \\('data',\\), none named 'workers'"):
        call(mesh)
