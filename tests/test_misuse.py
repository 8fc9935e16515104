"""Natural mistakes fail loudly, before compute, with a message that says how to fix them.

One test per mistake found by trying rbyz as a newcomer would (issue 9): each used to run and
give a wrong answer, or fail late inside jit with a bare TypeError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rbyz
from rbyz import aggregators, attacks, preaggregators as pre, transforms

AXIS = "workers"


def _grads(n, d=6, seed=0):
    return {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)) + 1.0, jnp.float32)}


def _params(d=6):
    return {"w": jnp.zeros(d)}


# ----------------------------------------------------------------------------- state and keys


def test_compose_with_centered_clipping_keeps_its_state():
    """clip (inactive) then centered clipping inside aggregate = centered clipping alone."""
    alone = transforms.aggregate("centered_clipping", f=1, tau=0.5)
    composed_rule = pre.compose(functools.partial(pre.clip, max_norm=1e6),
                                functools.partial(aggregators.centered_clipping, f=1, tau=0.5))
    composed = transforms.aggregate(composed_rule)
    params = _params()
    s_alone, s_comp = alone.init(params), composed.init(params)
    assert s_comp.rule_state is not None  # the centre is kept, inside the composition's state
    for step in range(4):
        g = _grads(7, seed=step)
        out_a, s_alone = alone.update(g, s_alone, params)
        out_c, s_comp = composed.update(g, s_comp, params)
        np.testing.assert_array_equal(out_a["w"], out_c["w"])
    np.testing.assert_array_equal(s_comp.rule_state[0]["w"], s_alone.rule_state["w"])


def test_compose_derives_its_declaration():
    rule = pre.compose(functools.partial(pre.bucketing, s=2),
                       functools.partial(aggregators.centered_clipping, f=1))
    declared = rule.spec
    assert declared.key and declared.state is not None and declared.coordinate_slices
    assert declared.constraint.explain(6, 0) is None  # 3 buckets > 2f
    message = declared.constraint.explain(4, 0)  # 2 buckets: centered clipping needs n > 2f
    assert "centered_clipping (it sees 2 of the 4 rows) needs n > 2f" in message
    assert not pre.compose(aggregators.median, ).spec.key


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: pre.compose(aggregators.krum), r"compose: krum needs f=\.\.\."),
        (lambda: pre.compose(functools.partial(pre.nnm, g=1), aggregators.median),
         r"compose: nnm has no hyperparameter 'g'; it accepts f"),
        (lambda: transforms.aggregate(pre.compose(aggregators.median), f=1),
         r"has no hyperparameter 'f'; it accepts none"),
    ],
)
def test_compose_validates_its_stages(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: transforms.aggregate("krum", f=1, neighbors=2),
         r"aggregate: krum has no hyperparameter 'neighbors'; it accepts f, neighbours, squared"),
        (lambda: transforms.aggregate("trimmed_mean"), r"aggregate: trimmed_mean needs f=\.\.\."),
        (lambda: transforms.aggregate("dnc", f=1), r"aggregate: dnc needs a random key"),
        (lambda: transforms.aggregate("median", key=0), "takes no key"),
        (lambda: transforms.byzantine("ipm", f=1, epsilonn=0.1),
         r"byzantine: ipm has no hyperparameter 'epsilonn'"),
        (lambda: transforms.byzantine("gaussian", f=1), r"byzantine: gaussian draws random rows"),
        (lambda: transforms.byzantine("reverse", f=1, positions="random"),
         r"positions='random'.* needs a random key"),
        (lambda: transforms.add_worker_noise(0.1), r"add_worker_noise: needs a random key"),
        (lambda: transforms.noisy_median_sgd(0.1, 1.0), r"needs a random key"),
        (lambda: transforms.noisy_sign_sgd(0.1, 0.5), r"needs a random key"),
        (lambda: transforms.robust("krum", f=2, n=6, optimizer=optax.sgd(0.1)),
         r"krum: needs n >= 2f \+ 3; got n=6, f=2"),
        (lambda: transforms.robust("median", f=1, n=9, attack="alie", optimizer=optax.sgd(0.1),
                                   attack_on="params"), "attack_on must be"),
        (lambda: transforms.robust(pre.compose(functools.partial(pre.bucketing, s=2),
                                               functools.partial(aggregators.krum, f=1)),
                                   n=8, key=0, optimizer=optax.sgd(0.1)),
         r"krum \(it sees 4 of the 8 rows\) needs n >= 2f \+ 3"),
    ],
)
def test_bad_settings_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_deterministic_attack_needs_no_key():
    tx = transforms.byzantine("sign_flip", f=1, omniscient=False)  # -mean of its own row
    out, state = tx.update(_grads(4), tx.init(_params()), _params())
    assert state.key is None
    np.testing.assert_allclose(out["w"][3], -_grads(4)["w"][3], rtol=1e-6)


# ----------------------------------------------------------------------------- ALIE


def test_alie_that_would_do_nothing_raises():
    # The v2 (epfml/Blades) quantile gives z = 0 at n = 10, f = 2: the attack would send the mean.
    tx = transforms.byzantine("alie", f=2, variant="v2")
    with pytest.raises(ValueError, match=r"n=10.*f=2"):
        tx.update(_grads(10), tx.init(_params()), _params())
    # The paper's formula (the default) gives a real attack there.
    tx = transforms.byzantine(attacks.alie, f=2)
    out, _ = tx.update(_grads(10), tx.init(_params()), _params())
    assert not np.allclose(out["w"][8], np.asarray(_grads(10)["w"][:8]).mean(0))


def test_inject_alie_takes_n_from_the_stack():
    out = attacks.inject(_grads(10), "alie", f=2, key=0)
    assert out.updates["w"].shape == (10, 6) and int(out.byzantine.sum()) == 2


# ----------------------------------------------------------------------------- chain order


def test_byzantine_without_aggregation_fails_at_the_next_step():
    tx = optax.chain(transforms.byzantine("sign_flip", f=1), optax.sgd(0.1))
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_grads(5), state, params)
    with jax.numpy_rank_promotion("allow"):  # jax's default: params silently gain [5, ...]
        params = optax.apply_updates(params, updates)
    with pytest.raises(ValueError, match=r"no aggregation.*rbyz.transforms.robust"):
        tx.update(_grads(5), state, params)


def test_robust_orders_momentum_attack_and_aggregation():
    n, f, beta = 5, 1, 0.9
    tx = transforms.robust("median", f=f, n=n, momentum=beta, attack="sign_flip",
                           omniscient=False, optimizer=optax.sgd(1.0))
    params = _params()
    state = tx.init(params)
    momenta = np.zeros((n, 6))
    for step in range(3):
        g = _grads(n, seed=step)
        out, state = tx.update(g, state, params)
        momenta = beta * momenta + np.asarray(g["w"], np.float64)
        sent = momenta.copy()
        sent[n - f:] = -sent[n - f:]  # the attack replaces what the Byzantine workers send
        np.testing.assert_allclose(out["w"], -np.median(sent, axis=0), rtol=1e-5, atol=1e-6)


def test_robust_can_attack_the_gradients_instead():
    n, f, beta = 5, 1, 0.5
    tx = transforms.robust("median", f=f, n=n, momentum=beta, attack="sign_flip",
                           omniscient=False, attack_on="gradients", optimizer=optax.sgd(1.0))
    params = _params()
    state = tx.init(params)
    momenta = np.zeros((n, 6))
    for step in range(3):
        g = np.asarray(_grads(n, seed=step)["w"], np.float64)
        g[n - f:] = -g[n - f:]
        out, state = tx.update(_grads(n, seed=step), state, params)
        momenta = beta * momenta + g
        np.testing.assert_allclose(out["w"], -np.median(momenta, axis=0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- collective mode


def _stacks_per_shard(shards=2, per_shard=3, d=6):
    g = _grads(shards * per_shard, d)
    return jax.tree.map(lambda x: x.reshape(shards, per_shard, *x.shape[1:]), g), g


@pytest.mark.parametrize(
    "make",
    [
        lambda tiled: transforms.aggregate("median", axis_name=AXIS, tiled=tiled),
        lambda tiled: transforms.majority_vote(axis_name=AXIS, tiled=tiled),
        lambda tiled: transforms.noisy_sign_sgd(0.1, 0.0, key=0, axis_name=AXIS, tiled=tiled),
        lambda tiled: transforms.noisy_median_sgd(0.1, 0.0, key=0, axis_name=AXIS, tiled=tiled),
        lambda tiled: transforms.signsgd_majority(0.1, axis_name=AXIS, tiled=tiled),
        lambda tiled: transforms.byzantine("sign_flip", f=1, axis_name=AXIS, tiled=tiled),
        lambda tiled: transforms.add_worker_noise(0.0, key=0, axis_name=AXIS, tiled=tiled),
    ],
)
def test_forgetting_tiled_is_an_error(make):
    """Several workers per shard without tiled=True used to vote over the shards."""
    per_shard, _ = _stacks_per_shard()
    params = _params()
    tx = make(False)
    with pytest.raises(ValueError, match="pass tiled=True"):
        jax.vmap(lambda u: tx.update(u, tx.init(params), params)[0], axis_name=AXIS)(per_shard)
    tx = make(True)
    got = jax.vmap(lambda u: tx.update(u, tx.init(params), params)[0], axis_name=AXIS)(per_shard)
    assert got["w"].shape[0] == 2


@pytest.mark.parametrize(
    "name,stacked_tx,collective_tx",
    [
        ("median", lambda: transforms.aggregate("median", f=2),
         lambda: transforms.aggregate("median", f=2, axis_name=AXIS, tiled=True)),
        ("vote", lambda: transforms.noisy_sign_sgd(0.1, 0.0, key=0),
         lambda: transforms.noisy_sign_sgd(0.1, 0.0, key=0, axis_name=AXIS, tiled=True)),
        ("signum", lambda: transforms.signsgd_majority(0.1),
         lambda: transforms.signsgd_majority(0.1, axis_name=AXIS, tiled=True)),
    ],
)
def test_tiled_collective_equals_stacked(name, stacked_tx, collective_tx):
    per_shard, stacked = _stacks_per_shard()
    params = _params()
    tx = stacked_tx()
    expected, _ = tx.update(stacked, tx.init(params), params)
    tx = collective_tx()
    got = jax.vmap(lambda u: tx.update(u, tx.init(params), params)[0], axis_name=AXIS)(per_shard)
    for shard in range(2):
        np.testing.assert_allclose(got["w"][shard], expected["w"], rtol=1e-6)


def test_one_worker_per_shard_with_tiled_is_an_error():
    g = _grads(4)
    tx = transforms.aggregate("median", axis_name=AXIS, tiled=True)
    with pytest.raises(ValueError, match="drop tiled=True"):
        jax.vmap(lambda u: tx.update(u, tx.init(_params()), _params())[0], axis_name=AXIS)(g)


# ----------------------------------------------------------------------------- user rules


def test_user_declared_rule_is_read_like_a_built_in_one():
    @aggregators.declare(constraint=rbyz._src.spec.MAJORITY, cost="O(n d)")
    def halfway(updates, *, f: int = 0, weight: float = 0.5):
        return jax.tree.map(lambda u: weight * u.mean(0), updates)

    assert "halfway" not in aggregators.names()  # users' rules are not registered by default
    with pytest.raises(ValueError, match="halfway has no hyperparameter 'wieght'"):
        transforms.aggregate(halfway, wieght=1.0)
    tx = transforms.aggregate(halfway, weight=1.0)
    out, _ = tx.update(_grads(3), tx.init(_params()), _params())
    np.testing.assert_allclose(out["w"], np.asarray(_grads(3)["w"]).mean(0), rtol=1e-6)


def test_undeclared_function_is_a_stateless_keyless_rule():
    def plain_mean(updates):
        return jax.tree.map(lambda u: u.mean(0), updates)

    tx = transforms.aggregate(plain_mean)
    state = tx.init(_params())
    assert state.key is None and state.rule_state is None
    with pytest.raises(ValueError, match="plain_mean does not accept"):
        transforms.aggregate(plain_mean, f=1)
