"""Tests of rbyz.transforms in stacked mode: numbers against NumPy, state handling, chains."""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rbyz
from rbyz import aggregators, transforms

SHAPES = {"w": (3, 4), "b": (5,)}


def _stacked(n: int, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=(n, *s)), dtype) for k, s in SHAPES.items()}


def _params(dtype=jnp.float32):
    return {k: jnp.zeros(s, dtype) for k, s in SHAPES.items()}


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# Independent float64 references, written plainly.


def ref_mean(x, f):
    return x.mean(axis=0)


def ref_median(x, f):
    return np.median(x, axis=0)


def ref_trimmed_mean(x, f):
    s = np.sort(x, axis=0)
    return s[f:x.shape[0] - f].mean(axis=0)


def ref_sign_vote(x, f):
    return np.sign(np.sign(x).sum(axis=0))


def ref_centered_clipping(rows, center, tau):
    """One clipping step over flat rows [n, d] from ``center`` [d]."""
    moved = np.zeros_like(center)
    for row in rows:
        diff = row - center
        moved += diff * min(1.0, tau / np.linalg.norm(diff))
    return center + moved / len(rows)


REFERENCES = {
    "mean": ref_mean,
    "median": ref_median,
    "trimmed_mean": ref_trimmed_mean,
    "sign_majority": ref_sign_vote,
}


@functools.cache
def _jitted_update(tx_args: tuple):
    name, f = tx_args
    tx = transforms.aggregate(name, f=f) if name != "mean" else transforms.aggregate(name)
    return tx, jax.jit(tx.update)


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("n,f", [(5, 1), (7, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_aggregate_matches_numpy(name, n, f, dtype, tol):
    tx, update = _jitted_update((name, f))
    updates = _stacked(n, dtype, seed=n)
    out, state = update(updates, tx.init(_params(dtype)), _params(dtype))
    assert int(state.count) == 1
    for key, leaf in out.items():
        assert leaf.dtype == dtype and leaf.shape == SHAPES[key]
        expected = REFERENCES[name](_np(updates)[key], f)
        np.testing.assert_allclose(np.asarray(leaf, np.float64), expected, rtol=tol, atol=tol)


def test_rule_by_name_equals_rule_by_function():
    updates = _stacked(5)
    by_name = transforms.aggregate("krum", f=1)
    by_fn = transforms.aggregate(aggregators.krum, f=1)
    out_a, _ = by_name.update(updates, by_name.init(_params()), _params())
    out_b, _ = by_fn.update(updates, by_fn.init(_params()), _params())
    jax.tree.map(np.testing.assert_array_equal, out_a, out_b)


def test_centered_clipping_keeps_previous_output_as_center():
    tau = 0.5
    tx = transforms.aggregate("centered_clipping", f=1, tau=tau)
    params = {"v": jnp.zeros(4)}
    state = tx.init(params)
    center = np.zeros(4)
    for seed in range(3):
        rows = np.random.default_rng(seed).normal(size=(5, 4)) + 3.0
        out, state = tx.update({"v": jnp.asarray(rows, jnp.float32)}, state, params)
        center = ref_centered_clipping(rows, center, tau)
        np.testing.assert_allclose(out["v"], center, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(state.rule_state["v"], out["v"])


def test_keyed_rule_gets_fresh_keys_from_state():
    pipeline = rbyz.preaggregators.compose(
        functools.partial(rbyz.preaggregators.bucketing, s=2), aggregators.median)
    tx = transforms.aggregate(pipeline, key=3)
    updates = {"w": jnp.arange(6.0).reshape(6, 1) ** 2}
    state = tx.init({"w": jnp.zeros(1)})
    outs = []
    for _ in range(4):
        out, state = tx.update(updates, state)
        outs.append(float(out["w"][0]))
    again, _ = tx.update(updates, tx.init({"w": jnp.zeros(1)}))
    assert float(again["w"][0]) == outs[0]  # same key, same numbers
    assert len(set(outs)) > 1  # the key moves on every step


def _rows_like(honest, f, fill):
    return jax.tree.map(lambda x: jnp.broadcast_to(fill(x), (f,) + x.shape[1:]), honest)


def _flip_attack(honest, *, f, key=None):
    return _rows_like(honest, f, lambda x: -10.0 * x.mean(0))


def _nan_attack(honest, *, f, key=None):
    return _rows_like(honest, f, lambda x: jnp.array(jnp.nan, x.dtype))


@rbyz.attacks.declare(takes_n=True)
def _n_attack(honest, *, f, n):
    return _rows_like(honest, f, lambda x: jnp.array(n, x.dtype))


@pytest.mark.parametrize("positions", ["last", (0, 2)])
@pytest.mark.parametrize("omniscient", [True, False])
def test_byzantine_replaces_rows_like_numpy(positions, omniscient):
    x = np.random.default_rng(1).normal(size=(6, 3))
    tx = transforms.byzantine(_flip_attack, f=2, positions=positions, omniscient=omniscient)
    out, _ = tx.update(jnp.asarray(x, jnp.float32), tx.init(jnp.zeros(3)))
    bad = [4, 5] if positions == "last" else list(positions)
    good = [i for i in range(6) if i not in bad]
    expected = x.copy()
    expected[bad] = -10.0 * x[good if omniscient else bad].mean(0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_byzantine_supplies_n_and_keeps_key_in_state():
    tx = transforms.byzantine(_n_attack, f=1, key=jax.random.key(7))
    out, state = tx.update(jnp.zeros((4, 2)), tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(out[3], [4.0, 4.0])
    assert state.key.dtype == jnp.uint32 and int(state.count) == 1


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "centered_clipping"])
def test_hostile_rows_never_reach_a_robust_output(rule):
    tx = optax.chain(
        transforms.byzantine(_nan_attack, f=2),
        transforms.aggregate(rule, f=2),
        optax.sgd(0.1),
    )
    params = _params()
    out, _ = jax.jit(tx.update)(_stacked(7), tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))


def test_readme_example():
    tx = optax.chain(
        rbyz.transforms.byzantine(rbyz.attacks.alie, f=5, key=0),
        rbyz.transforms.aggregate(rbyz.aggregators.krum, f=5),
        optax.sgd(0.1),
    )
    params = _params()
    out, state = jax.jit(tx.update)(_stacked(25), tx.init(params), params)
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_worker_noise_statistics_and_dtype(dtype):
    tx = transforms.add_worker_noise(2.0, key=0)
    zeros = jnp.zeros((4, 500), dtype)
    out, state = tx.update(zeros, tx.init(jnp.zeros(500, dtype)))
    assert out.dtype == dtype
    sample = np.asarray(out, np.float64)
    assert abs(sample.std() - 2.0) < 0.15 and abs(sample.mean()) < 0.15
    assert np.abs(np.corrcoef(sample)[0, 1:]).max() < 0.2  # independent across workers
    out2, _ = tx.update(zeros, state)
    assert not np.allclose(out2, out)  # fresh noise each step


def test_sign_and_majority_vote_match_numpy():
    x = np.random.default_rng(2).normal(size=(5, 7))
    signs, _ = transforms.sign().update(jnp.asarray(x, jnp.float32), optax.EmptyState())
    np.testing.assert_array_equal(signs, np.sign(x))
    tx = transforms.majority_vote()
    vote, _ = tx.update(jnp.asarray(x, jnp.float32), tx.init(jnp.zeros(7)))
    np.testing.assert_array_equal(vote, ref_sign_vote(x, 0))


def test_per_worker_momentum_matches_numpy():
    n, beta = 3, 0.9
    tx = transforms.per_worker(optax.trace(beta), n=n)
    state = tx.init({"w": jnp.zeros(2)})
    momentum = np.zeros((n, 2))
    for seed in range(3):
        g = np.random.default_rng(seed).normal(size=(n, 2))
        out, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
        momentum = beta * momentum + g
        np.testing.assert_allclose(out["w"], momentum, rtol=1e-5)


def test_per_worker_noise_differs_between_workers():
    tx = transforms.per_worker(optax.add_noise(1.0, 0.0, 0), n=3)
    with jax.numpy_dtype_promotion("standard"):  # optax.add_noise mixes int and float dtypes
        out, _ = tx.update(jnp.zeros((3, 50)), tx.init(jnp.zeros(50)))
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])


def test_signsgd_majority_with_momentum_matches_numpy():
    n, beta, lr = 3, 0.5, 0.1
    tx = transforms.signsgd_majority(lr, momentum=beta, n=n)
    state = tx.init(jnp.zeros(4))
    v = np.zeros((n, 4))
    for seed in range(3):
        g = np.random.default_rng(seed).normal(size=(n, 4))
        out, state = tx.update(jnp.asarray(g, jnp.float32), state)
        v = beta * v + (1 - beta) * g
        np.testing.assert_allclose(out, -lr * np.sign(np.sign(v).sum(0)), rtol=1e-6)


def test_robust_sgd_worker_momentum_then_rule():
    tx = transforms.robust_sgd("median", 0.5, worker_momentum=0.9, n=3)
    state = tx.init(jnp.zeros(2))
    m = np.zeros((3, 2))
    for seed in range(2):
        g = np.random.default_rng(seed).normal(size=(3, 2))
        out, state = tx.update(jnp.asarray(g, jnp.float32), state)
        m = 0.9 * m + g
        np.testing.assert_allclose(out, -0.5 * np.median(m, axis=0), rtol=1e-5)


# Chains, jit, scan, checkpoints.


def _full_chain():
    schedule = optax.linear_schedule(0.1, 0.01, 10)
    return optax.chain(
        transforms.add_worker_noise(0.01, key=1),
        transforms.byzantine(_flip_attack, f=1, key=2),
        transforms.aggregate("centered_clipping", f=1, tau=1.0),
        optax.clip_by_global_norm(1.0),
        optax.sgd(schedule, momentum=0.9),
    )


def _loss(params, batch):
    return jnp.mean((batch @ params["w"] - 1.0) ** 2) + jnp.sum(params["b"] ** 2)


def _train_scan(tx, params, batches):
    def step(carry, batch):
        params, state = carry
        grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, batch)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), _loss(params, batch[0])

    return jax.lax.scan(step, (params, tx.init(params)), batches)


def test_chain_trains_under_scan_and_jit():
    params = {"w": jnp.zeros((3,)), "b": jnp.ones((2,))}
    batches = jnp.asarray(np.random.default_rng(0).normal(size=(30, 5, 8, 3)), jnp.float32)
    (final, state), losses = jax.jit(functools.partial(_train_scan, _full_chain()))(
        params, batches)
    assert float(losses[-1]) < float(losses[0])
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(final))
    assert int(state[2].count) == 30


def test_composes_with_adam():
    tx = optax.chain(transforms.aggregate("median"), optax.adam(0.05))
    params = {"w": jnp.zeros((3,)), "b": jnp.ones((2,))}
    batches = jnp.asarray(np.random.default_rng(0).normal(size=(20, 5, 8, 3)), jnp.float32)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction mixes dtypes
        (final, _), losses = jax.jit(functools.partial(_train_scan, tx))(params, batches)
    assert float(losses[-1]) < float(losses[0])


def test_state_survives_save_and_load():
    tx = _full_chain()
    params = {"w": jnp.zeros((3,)), "b": jnp.ones((2,))}
    grads = jax.tree.map(lambda p: jnp.ones((5, *p.shape)), params)
    _, state = tx.update(grads, tx.init(params), params)
    leaves, treedef = jax.tree.flatten(state)
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(leaf) for leaf in leaves])
    buffer.seek(0)
    loaded = np.load(buffer)
    restored = jax.tree.unflatten(treedef, [jnp.asarray(loaded[f"arr_{i}"]) for i in
                                            range(len(leaves))])
    out_a, _ = tx.update(grads, state, params)
    out_b, _ = tx.update(grads, restored, params)
    jax.tree.map(np.testing.assert_array_equal, out_a, out_b)


def test_no_recompilation_on_second_update():
    tx = _full_chain()
    traces = []
    params = {"w": jnp.zeros((3,)), "b": jnp.ones((2,))}

    @jax.jit
    def update(grads, state):
        traces.append(1)
        return tx.update(grads, state, params)

    grads = jax.tree.map(lambda p: jnp.ones((5, *p.shape)), params)
    state = tx.init(params)
    for _ in range(3):
        _, state = update(grads, state)
    assert len(traces) == 1


@settings(max_examples=10)
@given(st.integers(3, 9), st.data())
def test_median_aggregate_stays_in_honest_range_and_ignores_order(n, data):
    f = (n - 1) // 2
    seed = data.draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    x[n - f:] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
    perm = np.random.default_rng(seed + 1).permutation(n)
    tx = transforms.aggregate("median", f=f)
    out, _ = tx.update(jnp.asarray(x), tx.init(jnp.zeros(4)))
    out_perm, _ = tx.update(jnp.asarray(x[perm]), tx.init(jnp.zeros(4)))
    np.testing.assert_array_equal(out, out_perm)
    honest = x[: n - f]
    assert np.all(out >= honest.min(0)) and np.all(out <= honest.max(0))


# Bad input.


@pytest.mark.parametrize(
    "updates,params,match",
    [
        ({"w": jnp.zeros((3, 4))}, {"w": jnp.zeros((3, 4))}, "stacked mode"),
        ({"w": jnp.zeros((3, 4)), "b": jnp.zeros((2, 5))}, None, "disagree on the worker"),
        ({"w": jnp.zeros(())}, None, "scalar"),
    ],
)
def test_stacked_transform_rejects_unstacked_updates(updates, params, match):
    tx = transforms.aggregate("mean")
    with pytest.raises(ValueError, match=match):
        tx.update(updates, tx.init(params), params)


@pytest.mark.parametrize(
    "make",
    [
        lambda: transforms.aggregate("median", axis_name="workers"),
        lambda: transforms.byzantine(_flip_attack, f=1, axis_name="workers"),
        lambda: transforms.add_worker_noise(1.0, key=0, axis_name="workers"),
        lambda: transforms.majority_vote(axis_name="workers"),
    ],
)
def test_collective_transform_outside_named_axis(make):
    tx = make()
    with pytest.raises(ValueError, match="collective mode .* must run inside shard_map"):
        tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: transforms.aggregate("nope"), "unknown aggregator"),
        (lambda: transforms.aggregate("median", key=0), "takes no key"),
        (lambda: transforms.add_worker_noise(-1.0), "b must be"),
        (lambda: transforms.byzantine(_flip_attack, f=1.5), "f must be a Python int"),
        (lambda: transforms.per_worker(optax.trace(0.9)), "n must be a Python int"),
        (lambda: transforms.signsgd_majority(0.1, momentum=0.5), "pass n="),
        (lambda: transforms.robust_sgd("median", 0.1, worker_momentum=1.0), "worker_momentum"),
    ],
)
def test_invalid_settings_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "tx,n,match",
    [
        (transforms.byzantine(_flip_attack, f=3), 3, "f < n"),
        (transforms.byzantine(_flip_attack, f=2, positions=(0, 0)), 4, "distinct"),
        (transforms.per_worker(optax.trace(0.9), n=4), 3, "built for n=4"),
        (transforms.aggregate("krum", f=2), 4, "krum"),
    ],
)
def test_invalid_counts_raise_at_trace_time(tx, n, match):
    with pytest.raises(ValueError, match=match):
        jax.jit(tx.update)(jnp.zeros((n, 2)), tx.init(jnp.zeros(2)))
