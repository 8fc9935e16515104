"""FoolsGold (rbyz.aggregators.history) against the float64 reference of
``references_layerwise``, over steps with its history carried.

The rule and its history on random pytrees in float64 for two steps, the sybil property (rows
that repeat one direction get weight 0 and the output is the honest rows' weighted mean),
hostile rows, the settings' errors before any compute, the transform over three steps against
the stepwise ``spec.apply``, vmap / jit / bfloat16, and the harness, which sizes the history
with the rows the rule aggregates.
"""

from __future__ import annotations

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rbyz import aggregators as agg
from rbyz import transforms
from rbyz.sim import config, data, defences, train

from references_layerwise import (hostile_rows, ref_foolsgold, ref_foolsgold_history,
                                  ref_foolsgold_weights)

SPEC = agg.spec("foolsgold")
HOSTILE = (np.nan, np.inf, -np.inf, 1e30, -1e30)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def make_tree(rng, n: int, layout: str = "tree", dtype=jnp.float64):
    shapes = ({"w": (n, 3, 2), "b": (n, 4)} if layout == "tree"
              else {"x": (n, int(layout.split("=")[1]))})
    return {k: jnp.asarray(rng.normal(0.2, 1.0, s), dtype) for k, s in shapes.items()}


def ravel(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16
                                      else leaf, np.float64).reshape(leaf.shape[0], -1)
                           for leaf in jax.tree.leaves(tree)], axis=1)


def ravel_row(tree) -> np.ndarray:
    return ravel(jax.tree.map(lambda leaf: leaf[None], tree))[0]


def one_row(tree):
    return jax.tree.map(lambda leaf: leaf[0], tree)


def with_sybils(updates, count: int, scale: float = 1.0):
    """The last ``count`` rows replaced by one direction (``scale`` times row -1 for the last)."""
    def leaf(u):
        u = u.at[-count:].set(u[-count])
        return u.at[-1].multiply(scale)
    return jax.tree.map(leaf, updates)


@functools.cache
def jitted_apply(n: int, kappa: float = 1.0):
    hparams = SPEC.check_hparams({"num_clients": n, "kappa": kappa}, "tests")
    return jax.jit(lambda u, h: SPEC.apply(u, h, None, hparams, report=True))


# ------------------------------------------------------------------------------------------------
# Against the float64 reference.


CASES = [(5, "tree", 0, 1.0), (11, "tree", 3, 1.0), (6, "d=40", 0, 0.5), (9, "d=3", 2, 2.0),
         (2, "tree", 0, 1.0)]


@pytest.mark.parametrize("n, layout, sybils, kappa", CASES,
                         ids=[f"n{n}-{l}-s{s}-k{k}" for n, l, s, k in CASES])
def test_matches_float64_reference_over_two_steps(x64, n, layout, sybils, kappa):
    rng = np.random.default_rng(n * 31 + sybils)
    updates = make_tree(rng, n, layout)
    history = SPEC.init(one_row(updates), {"num_clients": n})
    assert all(h.shape == (n, *u.shape[1:]) and h.dtype == jnp.float64 for h, u in
               zip(jax.tree.leaves(history), jax.tree.leaves(updates)))
    want_history = None
    for step in range(2):
        if sybils:
            updates = with_sybils(updates, sybils, scale=1.0 + step)
        x = ravel(updates)
        want = ref_foolsgold(x, want_history, kappa)
        weights = ref_foolsgold_weights(ref_foolsgold_history(x, want_history),
                                        ~hostile_rows(x), kappa)
        want_history = ref_foolsgold_history(x, want_history)
        out, history, selection = jitted_apply(n, kappa)(updates, history)
        np.testing.assert_allclose(ravel_row(out), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ravel(history), want_history, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(selection.weights, weights / weights.sum(), rtol=1e-6,
                                   atol=1e-7)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out))
        updates = make_tree(rng, n, layout)


def test_the_function_is_one_step_from_the_given_history(x64):
    rng = np.random.default_rng(1)
    updates, before = make_tree(rng, 6), make_tree(rng, 6)
    step = jax.jit(functools.partial(agg.foolsgold, kappa=0.7))
    out = step(updates, history=before)
    want = ref_foolsgold(ravel(updates), ravel(before), 0.7)
    np.testing.assert_allclose(ravel_row(out), want, rtol=1e-12, atol=1e-12)
    # No history: the first step (zeros), as spec.init gives.
    zeros = SPEC.init(one_row(updates), {"num_clients": 6})
    chex.assert_trees_all_close(step(updates), step(updates, history=zeros), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Sybils.


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["identical", "parallel"])
def test_sybils_get_weight_zero_and_the_output_is_the_honest_weighted_mean(x64, scale):
    rng = np.random.default_rng(2)
    n, sybils = 10, 4
    honest = n - sybils
    history = SPEC.init(one_row(make_tree(rng, n)), {"num_clients": n})
    for step in range(3):
        updates = with_sybils(make_tree(rng, n), sybils, scale)
        out, history, selection = jitted_apply(n)(updates, history)
        w = np.asarray(selection.weights, np.float64)
        np.testing.assert_array_equal(w[honest:], 0.0)
        # An honest worker too similar to another may get weight 0 as well (the logit cuts
        # a_i below 0.38): at least one keeps a weight.
        assert w[:honest].sum() > 0
        x = ravel(updates)
        np.testing.assert_allclose(ravel_row(out), w[:honest] @ x[:honest] / w[:honest].sum(),
                                   rtol=1e-6)


@functools.cache
def jitted_report():
    return jax.jit(functools.partial(agg.foolsgold, report=True))


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), sybils=st.integers(2, 5),
                  scale=st.floats(0.5, 4.0))
def test_property_repeated_sybils_are_left_out(seed, sybils, scale):
    """Sybils sending one direction (each at its own scale), honest workers anything: every
    sybil has weight 0 and the output is a weighted mean of the honest rows."""
    rng = np.random.default_rng(seed)
    honest = 8 - sybils
    direction = rng.normal(size=6).astype(np.float32)
    x = np.concatenate([rng.normal(size=(honest, 6)),
                        direction * (scale ** np.arange(sybils))[:, None]]).astype(np.float32)
    out, selection = jitted_report()(jnp.asarray(x))
    w = np.asarray(selection.weights)
    np.testing.assert_array_equal(w[honest:], 0.0)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), w[:honest] @ x[:honest], rtol=1e-4, atol=1e-5)


def test_identical_updates_aggregate_to_themselves():
    row = jnp.asarray([1.0, -2.0, 0.5])
    out, selection = jitted_report()(jnp.tile(row, (5, 1)))
    np.testing.assert_allclose(out, row, rtol=1e-6)
    np.testing.assert_allclose(selection.weights, 0.2, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Hostile rows.


@pytest.mark.parametrize("value", HOSTILE, ids=str)
def test_hostile_rows_have_weight_zero_and_stay_out_of_the_history(value):
    rng = np.random.default_rng(3)
    n = 7
    updates = make_tree(rng, n, dtype=jnp.float32)
    history = SPEC.init(one_row(updates), {"num_clients": n})
    out, history, _ = jitted_apply(n)(updates, history)
    updates = make_tree(rng, n, dtype=jnp.float32)
    updates = {"w": updates["w"].at[5, 1, 0].set(value), "b": updates["b"].at[6].set(value)}
    before = ravel(history)
    out, history, selection = jitted_apply(n)(updates, history)
    out = ravel_row(out)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(ravel(history)))
    np.testing.assert_array_equal(np.asarray(selection.weights)[5:], 0.0)
    np.testing.assert_array_equal(ravel(history)[5:], before[5:])
    x = ravel(updates)
    x[5:] = np.nan  # hostile in float32 (a 1e30 row's squared norm overflows), so in the reference
    want = ref_foolsgold(x, before)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert np.abs(out).max() <= np.abs(x[:5]).max()


# ------------------------------------------------------------------------------------------------
# Settings: ValueError naming the rule and the value, before any compute.


@pytest.mark.parametrize("make, match", [
    (lambda u: agg.foolsgold(u, kappa=0.0), r"foolsgold: needs kappa > 0; got kappa=0.0"),
    (lambda u: agg.foolsgold(u, kappa=-1.0), r"foolsgold: needs kappa > 0; got kappa=-1.0"),
    (lambda u: agg.foolsgold(u, num_clients=6),
     r"foolsgold: .*got n=5 rows but num_clients=6"),
    (lambda u: agg.foolsgold(u, num_clients=0), r"foolsgold: num_clients must be >= 1"),
    (lambda u: agg.foolsgold(u, num_clients=2.5), r"foolsgold: num_clients must be a Python int"),
    (lambda u: agg.foolsgold(u, f=5), r"foolsgold: needs 0 <= f < n; got n=5, f=5"),
    (lambda u: agg.foolsgold(u, history=jnp.zeros((4, 3))),
     r"foolsgold: history leaves must be shaped like the updates .* \(4, 3\)"),
    (lambda u: agg.foolsgold(u, history={"w": jnp.zeros((5, 3))}),
     r"foolsgold: history must have the structure of the updates"),
    (lambda u: SPEC.init(jnp.zeros(3)), r"foolsgold: keeps one history row per worker.*"
                                        r"num_clients=n"),
    (lambda u: SPEC.init(jnp.zeros(3), {"num_clients": -1}),
     r"foolsgold: num_clients must be >= 1; got num_clients=-1"),
    (lambda u: SPEC.check_hparams({"kapa": 1.0}, "tests"),
     r"tests: foolsgold has no hyperparameter 'kapa'; it accepts f, num_clients, kappa"),
    (lambda u: transforms.aggregate("foolsgold").init(jnp.zeros(3)),
     r"foolsgold: keeps one history row per worker"),
    (lambda u: (lambda tx: tx.update(u, tx.init(jnp.zeros(3)), jnp.zeros(3)))(
        transforms.aggregate("foolsgold", num_clients=4)),
     r"foolsgold: .*got n=5 rows but num_clients=4"),
    (lambda u: transforms.aggregate("foolsgold", num_clients=5, axis_name="workers",
                                    layout="coordinates"),
     r"layout='coordinates' .* foolsgold is not"),
], ids=["kappa-0", "kappa-neg", "num-clients", "num-clients-0", "num-clients-float", "f",
        "history-shape", "history-tree", "init", "init-neg", "hparam", "tx-init", "tx-n",
        "coordinates"])
def test_bad_settings_raise_naming_the_rule(make, match):
    with pytest.raises(ValueError, match=match):
        make(jnp.zeros((5, 3)))


# ------------------------------------------------------------------------------------------------
# The transform, vmap, jit, bfloat16.


def test_transform_over_three_steps_equals_the_stepwise_apply():
    rng = np.random.default_rng(4)
    n = 6
    steps = [with_sybils(make_tree(rng, n, dtype=jnp.float32), 2) for _ in range(3)]
    params = jax.tree.map(jnp.zeros_like, one_row(steps[0]))
    tx = transforms.aggregate("foolsgold", num_clients=n, report=True, num_workers=n)
    state = tx.init(params)
    history = SPEC.init(params, {"num_clients": n})
    update = jax.jit(tx.update)
    for updates in steps:
        out, state = update(updates, state, params)
        want, history, selection = jitted_apply(n)(updates, history)
        chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(state.rule_state, history, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state.selection.weights, selection.weights, rtol=1e-5,
                                   atol=1e-7)
    assert int(state.count) == 3
    np.testing.assert_array_equal(state.selection.weights[-2:], 0.0)


def test_vmap_and_jit_over_a_batch_of_problems():
    rng = np.random.default_rng(5)
    batch = jnp.stack([jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) for _ in range(3)])
    histories = jnp.stack([jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
                           for _ in range(3)])
    one = jax.jit(lambda u, h: SPEC.apply(u, h, None, {"num_clients": 6}))
    outs, news = jax.jit(jax.vmap(one))(batch, histories)
    for i in range(3):
        out, new = one(batch[i], histories[i])
        np.testing.assert_allclose(outs[i], out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(news[i], new, rtol=1e-6)


def test_bfloat16_keeps_its_dtype_and_a_float32_history():
    rng = np.random.default_rng(6)
    updates = with_sybils(make_tree(rng, 8, dtype=jnp.bfloat16), 3)
    history = SPEC.init(one_row(updates), {"num_clients": 8})
    assert all(h.dtype == jnp.float32 for h in jax.tree.leaves(history))
    out, history, selection = jitted_apply(8)(updates, history)
    assert all(o.dtype == jnp.bfloat16 for o in jax.tree.leaves(out))
    assert all(h.dtype == jnp.float32 for h in jax.tree.leaves(history))
    x = ravel(updates)
    np.testing.assert_array_equal(np.asarray(selection.weights)[-3:], 0.0)
    np.testing.assert_allclose(ravel_row(out), ref_foolsgold(x), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# The harness sizes the history with the rows the rule aggregates.


def experiment(**sections) -> config.Experiment:
    base = {"data": {"dataset": "synthetic", "batch_size": 8, "test_size": 100},
            "model": {"name": "mlp", "hidden": 8},
            "workers": {"n": 8, "f": 2},
            "defence": {"rule": "foolsgold"},
            "train": {"steps": 3, "eval_every": 3, "lr": 0.1, "checkpoint_every": 0}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return config.from_dict(base)


def history_rows(exp) -> int:
    """The rows of the history that the harness's chain starts with."""
    tx = defences.defence(exp).tx
    state = tx.init(jnp.zeros(3))
    rule_state = optax.tree_utils.tree_get(state, "rule_state")
    history = rule_state[0] if isinstance(rule_state, tuple) else rule_state
    return int(history.shape[0])


def test_the_harness_sets_num_clients_to_the_rows_aggregated():
    assert history_rows(experiment()) == 8
    assert history_rows(experiment(defence={"hparams": {"num_clients": 8}})) == 8
    # Bucketing in pairs leaves ceil(8 / 2) = 4 rows, in threes ceil(8 / 3) = 3.
    assert history_rows(experiment(defence={"pre": ["bucketing"]})) == 4
    assert history_rows(experiment(defence={"pre": ["bucketing"],
                                            "pre_hparams": {"bucketing": {"s": 3}}})) == 3


@pytest.mark.parametrize("defence, match", [
    ({"hparams": {"num_clients": 10}},
     r"config: defence.hparams.num_clients: foolsgold keeps one state row per row it "
     r"aggregates, 8 here \(workers.n = 8\); got num_clients = 10. Drop it"),
    ({"hparams": {"num_clients": 8}, "pre": ["bucketing"]},
     r"4 here \(workers.n = 8 after defence.pre = \['bucketing'\]\); got num_clients = 8\. "
     r"Drop it .* or set it to 4"),
    ({"hparams": {"num_clients": True}}, r"got num_clients = True"),
])
def test_the_harness_refuses_a_wrong_num_clients(defence, match):
    with pytest.raises(ValueError, match=match):
        defences.defence(experiment(defence=defence))


def test_the_harness_refuses_the_coordinates_layout():
    exp = experiment(parallel={"devices": 2, "layout": "coordinates"})
    with pytest.raises(ValueError, match=r"config: parallel: .*layout='coordinates'.*foolsgold"):
        train.train(exp, dataset=data.synthetic(seed=0))


def test_trains_a_few_steps_under_attack():
    exp = experiment(attack={"name": "alie"}, diagnostics={"enabled": True})
    history = train.train(exp, dataset=data.synthetic(seed=0))
    last = history.rows[-1]
    assert last["step"] == 3 and np.isfinite(last["train_loss"])
    assert last["rule"] == "foolsgold"
