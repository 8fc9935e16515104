"""Tests of rbyz.preaggregators against plain float64 NumPy references."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rbyz
from rbyz import preaggregators as pre
from rbyz._src import order_stats
from rbyz.preaggregators.clipping import arc_clipped_count
from references import is_hostile, ref_arc, ref_bucketing, ref_clip, ref_nnm

ref_median = functools.partial(np.median, axis=0)

HOSTILE_VALUES = (np.nan, np.inf, -np.inf, 1e30)

# Jitted once per module: hyperparameters that decide shapes are static.
nnm_jit = jax.jit(pre.nnm, static_argnames="f")
arc_jit = jax.jit(pre.arc, static_argnames="f")
clip_jit = jax.jit(pre.clip)
bucketing_jit = jax.jit(pre.bucketing, static_argnames="s")


# ----------------------------------------------------------------------------- helpers


def make_tree(n, seed, dtype=jnp.float32, spread=1.0):
    """A two-leaf stacked pytree, {"b": [n, 5], "w": [n, 3, 4]}, as NumPy float64 and JAX."""
    rng = np.random.default_rng(seed)
    tree = {"b": rng.normal(size=(n, 5)) * spread + 3.0, "w": rng.normal(size=(n, 3, 4)) * spread}
    return tree, jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def flat(tree):
    """[n, D] float64: every worker's update over all leaves, in jax.tree.leaves order."""
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0]
    return np.concatenate([np.asarray(leaf, np.float64).reshape(n, -1) for leaf in leaves], axis=1)


def as_f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def hostile_row(tree, index, value):
    return jax.tree.map(lambda x: x.at[index].set(value), tree)


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------- references


# ----------------------------------------------------------------------------- reference tests


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,f", [(1, 0), (4, 1), (7, 2), (10, 3), (12, 0)])
def test_nnm_matches_reference(n, f, dtype):
    _, tree = make_tree(n, seed=n + f)
    out = nnm_jit(tree, f=f)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), out) == jax.tree.map(
        lambda x: (x.shape, x.dtype), tree)
    np.testing.assert_allclose(flat(out), ref_nnm(flat(tree), f), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,max_norm", [(1, 0.5), (5, 1.0), (9, 4.0), (6, 100.0)])
def test_clip_matches_reference(n, max_norm, dtype):
    _, tree = make_tree(n, seed=n, dtype=dtype)
    out = clip_jit(tree, max_norm=max_norm)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, tree)
    np.testing.assert_allclose(flat(out), ref_clip(flat(tree), max_norm), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,f", [(1, 0), (3, 1), (4, 1), (10, 2), (11, 5), (25, 5)])
def test_arc_matches_reference(n, f, dtype):
    rng = np.random.default_rng(n * 7 + f)
    scale = rng.uniform(0.1, 10.0, size=(n, 1, 1))  # spread the norms so clipping bites
    _, tree = make_tree(n, seed=n + f, dtype=dtype)
    tree = {"b": tree["b"], "w": tree["w"] * jnp.asarray(scale, dtype)}
    out = arc_jit(tree, f=f)
    np.testing.assert_allclose(flat(out), ref_arc(flat(tree), f), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,s", [(1, 2), (6, 2), (7, 2), (7, 3), (10, 1), (5, 5), (4, 7)])
def test_bucketing_matches_reference(n, s, dtype):
    _, tree = make_tree(n, seed=n * s, dtype=dtype)
    key = jax.random.key(n + s)
    out = bucketing_jit(tree, key=key, s=s)
    perm = jax.random.permutation(key, n)
    assert jax.tree.leaves(out)[0].shape[0] == -(-n // s)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, tree)
    np.testing.assert_allclose(flat(out), ref_bucketing(flat(tree), perm, s), **tolerance(dtype))


def test_arc_clipped_count_matches_paper_formula():
    for n in range(1, 120):
        for f in range(0, (n + 1) // 2):
            assert arc_clipped_count(n, f) == math.floor(2 * f * (n - f) / n)
    # ByzFL's float product 2 * (f / n) * (n - f) rounds down one too far at valid settings.
    assert arc_clipped_count(242, 33) == 57 and int(2 * (33 / 242) * (242 - 33)) == 56


# ----------------------------------------------------------------------------- hostile rows


@pytest.mark.parametrize("value", HOSTILE_VALUES)
@pytest.mark.parametrize("n,f,bad", [(7, 2, (0, 5)), (10, 3, (9,)), (6, 1, (2,))])
def test_nnm_hostile_rows_do_not_reach_honest_mixes(n, f, bad, value):
    _, tree = make_tree(n, seed=3)
    for index in bad:
        tree = hostile_row(tree, index, value)
    out = flat(nnm_jit(tree, f=f))
    honest = [i for i in range(n) if i not in bad]
    np.testing.assert_allclose(out[honest], ref_nnm(flat(tree), f)[honest], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out[honest]))
    if not np.isfinite(value):
        assert np.all(np.isnan(out[list(bad)]))


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_nnm_with_f_hostile_rows_mixes_exactly_the_honest_rows(value):
    n, f = 9, 3
    _, tree = make_tree(n, seed=5)
    for index in (1, 4, 8):
        tree = hostile_row(tree, index, value)
    out = flat(nnm_jit(tree, f=f))
    honest = [0, 2, 3, 5, 6, 7]
    expected = flat(as_f64(tree))[honest].mean(axis=0)
    for i in honest:
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["clip", "arc"])
@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_clipping_outputs_are_finite_and_bounded(rule, value):
    n, f = 9, 2
    _, tree = make_tree(n, seed=11, spread=5.0)
    for index in (0, 6):
        tree = hostile_row(tree, index, value)
    out = clip_jit(tree, max_norm=2.0) if rule == "clip" else arc_jit(tree, f=f)
    x = flat(tree)
    expected = ref_clip(x, 2.0) if rule == "clip" else ref_arc(x, f)
    got = flat(out)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    norms = np.linalg.norm(got, axis=1)
    bound = 2.0 if rule == "clip" else np.sort(np.linalg.norm(x[[1, 2, 3, 4, 5, 7, 8]], axis=1))[
        n - 1 - arc_clipped_count(n, f)]
    assert np.all(norms <= bound * (1 + 1e-5))


def test_clip_zero_row_stays_zero():
    x = jnp.zeros((3, 4), jnp.float32).at[1].set(1.0)
    np.testing.assert_array_equal(np.asarray(clip_jit(x, max_norm=0.5))[0], np.zeros(4))


# ----------------------------------------------------------------------------- properties


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([4, 7]), data=st.data())
def test_permutation_equivariance(seed, n, data):
    f = data.draw(st.integers(0, (n - 1) // 2))
    perm = np.asarray(data.draw(st.permutations(range(n))))
    _, tree = make_tree(n, seed=seed, spread=float(1 + seed % 5))
    permuted = jax.tree.map(lambda x: x[perm], tree)
    for rule in (functools.partial(nnm_jit, f=f), functools.partial(arc_jit, f=f),
                 functools.partial(clip_jit, max_norm=3.0)):
        np.testing.assert_allclose(flat(rule(permuted)), flat(rule(tree))[perm],
                                   rtol=1e-5, atol=1e-5)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), s=st.sampled_from([1, 2, 3, 6]))
def test_bucketing_preserves_the_mean_when_s_divides_n(seed, s):
    n = 6
    _, tree = make_tree(n, seed=seed)
    out = bucketing_jit(tree, key=seed, s=s)
    np.testing.assert_allclose(flat(out).mean(axis=0), flat(tree).mean(axis=0),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1))
def test_bucketing_is_deterministic_in_its_key(seed):
    _, tree = make_tree(8, seed=1)
    first = bucketing_jit(tree, key=seed, s=2)
    again = pre.bucketing(tree, key=jax.random.key(seed), s=2)
    np.testing.assert_array_equal(flat(first), flat(again))


def test_bucketing_depends_on_the_key():
    _, tree = make_tree(10, seed=1)
    outputs = {flat(bucketing_jit(tree, key=seed, s=2)).tobytes() for seed in range(5)}
    assert len(outputs) > 1


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([3, 6]))
def test_agreeing_workers_are_left_unchanged(seed, n):
    _, tree = make_tree(1, seed=seed)
    same = jax.tree.map(lambda x: jnp.concatenate([x] * n), tree)
    for out in (nnm_jit(same, f=1), arc_jit(same, f=1), bucketing_jit(same, key=seed, s=2)):
        np.testing.assert_allclose(flat(out), np.repeat(flat(tree), flat(out).shape[0], 0),
                                   rtol=1e-6)


# ----------------------------------------------------------------------------- composition


def coordinate_median(updates):
    return jax.tree.map(order_stats.median, updates)


def test_compose_matches_stage_by_stage_reference():
    n, f, s = 8, 1, 2
    _, tree = make_tree(n, seed=2)
    key = jax.random.key(7)
    robust = jax.jit(pre.compose(functools.partial(pre.nnm, f=f),
                                 functools.partial(pre.bucketing, s=s), coordinate_median))
    (bucket_key,) = jax.random.split(key, 1)
    perm = jax.random.permutation(bucket_key, n)
    expected = ref_median(ref_bucketing(ref_nnm(flat(tree), f), perm, s))
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[None], robust(tree, key=key)))[0],
                               expected, rtol=1e-5, atol=1e-5)


def test_compose_gives_each_keyed_stage_its_own_key():
    _, tree = make_tree(8, seed=2)
    composed = pre.compose(functools.partial(pre.bucketing, s=1),
                           functools.partial(pre.bucketing, s=1))
    first, second = jax.random.split(jax.random.key(3), 2)
    expected = pre.bucketing(pre.bucketing(tree, key=first, s=1), key=second, s=1)
    np.testing.assert_array_equal(flat(composed(tree, key=3)), flat(expected))


def test_compose_keeps_a_key_bound_by_partial():
    _, tree = make_tree(6, seed=2)
    composed = pre.compose(functools.partial(pre.bucketing, s=2, key=5), coordinate_median)
    expected = coordinate_median(pre.bucketing(tree, key=5, s=2))
    np.testing.assert_array_equal(flat(jax.tree.map(lambda x: x[None], composed(tree))),
                                  flat(jax.tree.map(lambda x: x[None], expected)))


@pytest.mark.parametrize("name", ["krum", "median", "trimmed_mean"])
def test_compose_with_rbyz_aggregators(name):
    n, f = 10, 1
    _, tree = make_tree(n, seed=4)
    tree = hostile_row(tree, 3, np.nan)
    aggregate = functools.partial(rbyz.aggregators.get(name), f=f)
    robust = jax.jit(pre.compose(functools.partial(pre.nnm, f=f),
                                 functools.partial(pre.bucketing, s=2), aggregate))
    out = robust(tree, key=0)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))


# ----------------------------------------------------------------------------- jit


def test_no_recompilation_on_new_values():
    traces = []

    @functools.partial(jax.jit, static_argnames="f")
    def counted(tree, f):
        traces.append(1)
        return pre.nnm(pre.arc(tree, f=f), f=f)

    for seed in range(3):
        jax.block_until_ready(counted(make_tree(6, seed=seed)[1], f=1))
    assert len(traces) == 1


def test_traced_max_norm_and_seed_under_jit():
    _, tree = make_tree(6, seed=0)
    run = jax.jit(lambda t, c, seed: pre.bucketing(pre.clip(t, max_norm=c), key=seed, s=3))
    expected = pre.bucketing(pre.clip(tree, max_norm=1.5), key=4, s=3)
    np.testing.assert_allclose(flat(run(tree, 1.5, 4)), flat(expected), rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,match", [
    (lambda t: pre.nnm(t, f=5), r"nnm: needs 0 <= f < n; got n=5, f=5"),
    (lambda t: pre.nnm(t, f=-1), r"nnm: f must be >= 0"),
    (lambda t: pre.nnm(t, f=1.5), r"nnm: f must be a Python int"),
    (lambda t: pre.arc(t, f=3), r"arc: needs n > 2f; got n=5, f=3"),
    (lambda t: pre.clip(t, max_norm=0.0), r"clip: needs a finite max_norm > 0"),
    (lambda t: pre.clip(t, max_norm=-1), r"clip: needs a finite max_norm > 0"),
    (lambda t: pre.clip(t, max_norm=float("inf")), r"clip: needs a finite max_norm > 0"),
    (lambda t: pre.bucketing(t, key=0, s=0), r"bucketing: s must be >= 1"),
    (lambda t: pre.bucketing(t, s=2), r"bucketing: needs a random key"),
    (lambda t: pre.compose(functools.partial(pre.bucketing, s=2))(t),
     r"compose: needs a random key"),
])
def test_bad_settings_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_tree(5, seed=0)[1])


@pytest.mark.parametrize("rule", [functools.partial(pre.nnm, f=0),
                                  functools.partial(pre.arc, f=0),
                                  functools.partial(pre.clip, max_norm=1.0),
                                  functools.partial(pre.bucketing, key=0)])
def test_bad_trees_raise(rule):
    with pytest.raises(ValueError, match="empty pytree"):
        rule({})
    with pytest.raises(ValueError, match="disagree on the worker count"):
        rule({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4, 2))})


def test_compose_rejects_bad_stages():
    with pytest.raises(ValueError, match="compose: needs at least one stage"):
        pre.compose()
    with pytest.raises(ValueError, match="compose: every stage must be callable"):
        pre.compose(functools.partial(pre.nnm, f=1), 3)


def test_registry():
    assert set(pre.names()) == {"arc", "bucketing", "clip", "nnm"}
    assert pre.get("nnm") is pre.nnm
    with pytest.raises(ValueError, match="unknown preaggregator"):
        pre.get("nope")
