"""LASA and GAS (rbyz.aggregators.layerwise) against the float64 references of
``references_layerwise``.

Each rule on random pytrees in float64 (LASA's layers are the leaves; GAS's chunks contiguous,
shuffled from the key, or over another base rule), a row abnormal in one layer only, hostile
rows, the settings' errors before any compute, GAS's selection, the transform, vmap / jit and
bfloat16, and one hypothesis property per rule.
"""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rbyz import aggregators as agg
from rbyz import transforms

from references_layerwise import ref_gas, ref_lasa

HOSTILE = (np.nan, np.inf, -np.inf, 1e30, -1e30)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def make_tree(rng, n: int, layout: str = "tree", dtype=jnp.float64):
    shapes = ({"w": (n, 3, 4), "b": (n, 5), "c": (n, 2, 2, 2)} if layout == "tree"
              else {"x": (n, int(layout.split("=")[1]))})
    return {k: jnp.asarray(rng.normal(0.3, 1.0, s), dtype) for k, s in shapes.items()}


def ravel(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16
                                      else leaf, np.float64).reshape(leaf.shape[0], -1)
                           for leaf in jax.tree.leaves(tree)], axis=1)


def ravel_row(tree) -> np.ndarray:
    return ravel(jax.tree.map(lambda leaf: leaf[None], tree))[0]


def layers(tree) -> tuple[int, ...]:
    return tuple(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(tree))


def with_outliers(updates, f: int, rng):
    """The last ``f`` rows pushed away: scaled up in one leaf, sign-flipped in another."""
    leaves, treedef = jax.tree.flatten(updates)
    for i, leaf in enumerate(leaves):
        if f and i % 2 == 0:
            leaf = leaf.at[-f:].multiply(8.0)
        elif f:
            leaf = leaf.at[-f:].set(-jnp.abs(leaf[-f:]) - 1.0)
        leaves[i] = leaf
    return jax.tree.unflatten(treedef, leaves)


@functools.cache
def jitted(name: str, **hparams):
    return jax.jit(functools.partial(agg.get(name), **hparams))


def shuffle_order(seed: int, d: int) -> np.ndarray:
    """The permutation GAS draws with ``shuffle=True``: from the first of the two keys split
    from its key."""
    return np.asarray(jax.random.permutation(jax.random.split(jax.random.key(seed), 2)[0], d))


# ------------------------------------------------------------------------------------------------
# LASA.


LASA_CASES = [(5, 2, "tree", {}), (9, 3, "tree", {"sparsity": 0.5}), (7, 1, "d=20", {}),
              (8, 2, "tree", {"sparsity": 0.0, "lambda_n": 1.5, "lambda_s": 0.8}),
              (6, 0, "d=3", {"sparsity": 0.9})]


@pytest.mark.parametrize("n, f, layout, hparams", LASA_CASES,
                         ids=[f"n{n}-f{f}-{l}-{sorted(h.items())}" for n, f, l, h in LASA_CASES])
def test_lasa_matches_float64_reference(x64, n, f, layout, hparams):
    rng = np.random.default_rng(n * 17 + f)
    for _ in range(2):
        updates = with_outliers(make_tree(rng, n, layout), f, rng)
        out = jitted("lasa", f=f, **hparams)(updates)
        want = ref_lasa(ravel(updates), f, layers(updates), **hparams)
        np.testing.assert_allclose(ravel_row(out), want, rtol=1e-12, atol=1e-12)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out))


def test_lasa_judges_each_layer_apart():
    """A row atypical in one layer only is left out of that layer and kept in the others."""
    n = 9
    a = jnp.tile(jnp.arange(1.0, 7.0), (n, 1)).at[0].set(jnp.arange(6.0, 0.0, -1.0))
    b = jnp.ones((n, 6)).at[0].set(-1.0)  # row 0's signs are atypical in "b" only
    updates = {"a": a, "b": b}
    out = agg.lasa(updates, f=2, sparsity=0.0)
    # Same norms everywhere (no clipping); in "a" every statistic is equal: all rows kept.
    np.testing.assert_allclose(out["a"], a.mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["b"], jnp.ones(6), rtol=1e-6)
    np.testing.assert_allclose(ravel_row(out), ref_lasa(ravel(updates), 2, layers(updates),
                                                        sparsity=0.0), rtol=1e-6)


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), f=st.integers(0, 3),
                  scale=st.floats(1.0, 1e6))
def test_property_lasa_layers_are_bounded_by_the_median_norm(seed, f, scale):
    """Each layer of the output has norm at most the (lower) median of the rows' norms, which
    is at most the largest honest norm, however large the ``f`` Byzantine rows."""
    rng = np.random.default_rng(seed)
    updates = make_tree(rng, 8, dtype=jnp.float32)
    updates = jax.tree.map(lambda u: u.at[8 - f:].multiply(scale), updates)
    out = jitted("lasa", f=3)(updates)  # f is only checked: one compilation for every f
    norms = np.linalg.norm(ravel(updates), axis=1)
    bound = np.sort(norms)[(len(norms) - 1) // 2]
    assert bound <= norms[: 8 - f].max() * (1 + 1e-6)
    for leaf in jax.tree.leaves(out):
        assert np.linalg.norm(np.asarray(leaf, np.float64)) <= bound * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------
# GAS.


GAS_CASES = [(7, 2, "tree", {"p": 4, "shuffle": False}),
             (9, 3, "d=30", {"p": 7, "shuffle": False}),
             (11, 4, "tree", {"p": 1000, "shuffle": False}), (8, 2, "d=13", {"p": 3}),
             (9, 1, "tree", {"p": 5}), (7, 3, "tree", {"p": 6, "base": "median"}),
             (5, 1, "d=4", {"p": 1, "shuffle": False})]


@pytest.mark.parametrize("n, f, layout, hparams", GAS_CASES,
                         ids=[f"n{n}-f{f}-{l}-{sorted(h.items())}" for n, f, l, h in GAS_CASES])
def test_gas_matches_float64_reference(x64, n, f, layout, hparams):
    rng = np.random.default_rng(n * 13 + f)
    for seed in range(2):
        updates = with_outliers(make_tree(rng, n, layout), f, rng)
        x = ravel(updates)
        out = jitted("gas", f=f, **hparams)(updates, key=seed)
        order = shuffle_order(seed, x.shape[1]) if hparams.get("shuffle", True) else None
        want = ref_gas(x, f, hparams["p"], order=order, base=hparams.get("base", "krum"))
        np.testing.assert_allclose(ravel_row(out), want, rtol=1e-12, atol=1e-12)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out))


def test_gas_reports_the_rows_it_averages():
    rng = np.random.default_rng(2)
    updates = with_outliers(make_tree(rng, 9, dtype=jnp.float32), 2, rng)
    out, selection = jitted("gas", f=2, p=8, report=True)(updates, key=0)
    w = np.asarray(selection.weights)
    np.testing.assert_allclose(w[w > 0], 1 / 7, rtol=1e-6)
    assert int(selection.rejected()) == 2
    np.testing.assert_array_equal(w[-2:], 0.0)
    np.testing.assert_allclose(ravel_row(out), w @ ravel(updates), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(out, jitted("gas", f=2, p=8)(updates, key=0))


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), f=st.integers(0, 3),
                  p=st.sampled_from([3, 24]), offset=st.floats(20.0, 1e6))
def test_property_gas_averages_the_honest_rows(seed, f, p, offset):
    """With ``f`` rows far from the honest ones in every coordinate, GAS averages exactly the
    ``n - f`` honest rows, whatever the split."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(9, 24)).astype(np.float32)
    x[9 - f:] += offset * np.sign(rng.normal(size=(f, 24))).astype(np.float32)
    out, selection = jax.jit(functools.partial(agg.gas, f=f, p=p, report=True))(
        jnp.asarray(x), key=seed)
    np.testing.assert_array_equal(np.asarray(selection.weights) > 0, np.arange(9) < 9 - f)
    np.testing.assert_allclose(np.asarray(out), x[: 9 - f].mean(0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Both: hostile rows, settings, transform, vmap, bfloat16.


@pytest.mark.parametrize("value", HOSTILE, ids=str)
@pytest.mark.parametrize("name", ["lasa", "gas"])
def test_hostile_rows_do_not_reach_the_output(name, value):
    rng = np.random.default_rng(3)
    updates = make_tree(rng, 9, dtype=jnp.float32)
    updates = {**updates, "w": updates["w"].at[7, 1, 0].set(value),
               "b": updates["b"].at[8].set(value)}
    out = ravel_row(jitted(name, f=2)(updates, **({"key": 0} if name == "gas" else {})))
    x = ravel(updates)
    assert np.all(np.isfinite(out))
    assert np.abs(out).max() <= np.abs(x[:7]).max()
    x[7:] = np.nan  # hostile in float32 (a 1e30 row's squared norm overflows), so in the reference
    want = (ref_lasa(x, 2, layers(updates)) if name == "lasa"
            else ref_gas(x, 2, order=shuffle_order(0, x.shape[1])))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda u: agg.lasa(u, f=3), r"lasa: needs n > 2f; got n=6, f=3"),
    (lambda u: agg.lasa(u, f=1, sparsity=1.0), r"lasa: needs 0 <= sparsity < 1 .*sparsity=1.0"),
    (lambda u: agg.lasa(u, f=1, sparsity=-0.1), r"lasa: .*got sparsity=-0.1"),
    (lambda u: agg.lasa(u, f=1, sparsity="0.3"), r"lasa: .*got sparsity='0.3'"),
    (lambda u: agg.lasa(u, f=1, lambda_n=0.0), r"lasa: needs lambda_n > 0; got lambda_n=0.0"),
    (lambda u: agg.lasa(u, f=1, lambda_s=-1.0), r"lasa: needs lambda_s > 0; got lambda_s=-1.0"),
    (lambda u: agg.lasa(u, f=1.5), r"lasa: f must be a Python int"),
    (lambda u: agg.gas(u, f=3, key=0), r"gas: needs n > 2f .*got n=6, f=3"),
    (lambda u: agg.gas(u, f=2, key=0), r"gas: krum: needs n >= 2f \+ 3; got n=6, f=2"),
    (lambda u: agg.gas(u, f=1, p=0, key=0), r"gas: p must be >= 1; got p=0"),
    (lambda u: agg.gas(u, f=1, p=2.5, key=0), r"gas: p must be a Python int"),
    (lambda u: agg.gas(u, f=1, p=True, key=0), r"gas: p must be an int >= 1; got p=True"),
    (lambda u: agg.gas(u, f=1, shuffle="yes", key=0), r"gas: shuffle must be True or False"),
    (lambda u: agg.gas(u, f=1), r"gas: .*key"),
    (lambda u: agg.gas(u, f=1, base="krumm", key=0),
     r"gas: base must be a registered aggregator .*unknown aggregator 'krumm'"),
    (lambda u: agg.gas(u, f=1, base="centered_clipping", key=0),
     r"gas: the base rule centered_clipping keeps state"),
    (lambda u: agg.gas(u, f=1, base=functools.partial(agg.trimmed_mean, g=1), key=0),
     r"gas: trimmed_mean has no hyperparameter 'g'"),
    (lambda u: transforms.aggregate("gas", f=1),
     r"aggregate: gas needs a random key"),
    (lambda u: transforms.aggregate("lasa", f=1, axis_name="workers", layout="coordinates"),
     r"layout='coordinates' .* lasa is not"),
], ids=["lasa-f", "lasa-sparsity-1", "lasa-sparsity-neg", "lasa-sparsity-str", "lasa-lambda-n",
        "lasa-lambda-s", "lasa-f-float", "gas-f", "gas-krum-f", "gas-p-0", "gas-p-float",
        "gas-p-bool", "gas-shuffle", "gas-key", "gas-base", "gas-base-state",
        "gas-base-hparam", "tx-key", "coordinates"])
def test_bad_settings_raise_naming_the_rule(make, match):
    with pytest.raises(ValueError, match=match):
        make(jnp.zeros((6, 4)))


def test_the_transform_equals_the_rule():
    rng = np.random.default_rng(4)
    updates = with_outliers(make_tree(rng, 7, dtype=jnp.float32), 2, rng)
    params = jax.tree.map(lambda u: jnp.zeros(u.shape[1:]), updates)
    for name, hparams in (("lasa", {"f": 2}), ("gas", {"f": 2, "p": 6, "shuffle": False})):
        tx = transforms.aggregate(name, key=0 if name == "gas" else None, **hparams)
        out, state = jax.jit(tx.update)(updates, tx.init(params), params)
        chex.assert_trees_all_close(out, jitted(name, **hparams)(updates), rtol=1e-6)
        assert state.rule_state is None


@pytest.mark.parametrize("name", ["lasa", "gas"])
def test_vmap_jit_and_bfloat16(name):
    rng = np.random.default_rng(5)
    kwargs = {"key": 1} if name == "gas" else {}
    rule = jitted(name, f=1)
    batch = jnp.asarray(rng.normal(size=(3, 7, 10)), jnp.float32)
    outs = jax.jit(jax.vmap(lambda u: agg.get(name)(u, f=1, **kwargs)))(batch)
    for i in range(3):
        np.testing.assert_allclose(outs[i], rule(batch[i], **kwargs), rtol=1e-5, atol=1e-6)
    updates = make_tree(rng, 7, dtype=jnp.float32)
    low = jax.tree.map(lambda u: u.astype(jnp.bfloat16), updates)
    out = rule(low, **kwargs)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))
    want = ref_lasa(ravel(low), 1, layers(low)) if name == "lasa" else ref_gas(
        ravel(low), 1, order=shuffle_order(1, ravel(low).shape[1]))
    np.testing.assert_allclose(ravel_row(out), want, rtol=2e-2, atol=2e-2)
