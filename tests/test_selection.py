"""Detection as an output: the rows a rule kept and their weights, from the same pass.

For every rule declared ``reports=True``: asking for the selection changes nothing in the
output (bit for bit, under jit); the weights are a distribution that leaves hostile rows out;
for the rules that average rows the weights reproduce the output in float64
(``out = sum_i w_i x_i``), and Krum / Multi-Krum's selections are the float64 reference's; the
transform keeps the selection in its state; misuse is a clear error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rbyz import aggregators as agg
from rbyz import transforms

from references import ref_krum_scores

REPORTING = tuple(s.name for s in agg.specs() if s.reports)
# out = sum_i w_i x_i exactly (the clipping rules scale their rows' contributions instead).
AVERAGING = ("caf", "cge", "dnc", "geometric_median", "krum", "mda", "mean", "monna",
             "multi_krum", "smea")
HOSTILE = (np.nan, np.inf, 1e30, -1e30)


def call(name, updates, *, report=False, f=2, **hparams):
    declared = agg.spec(name)
    kwargs = {"key": jax.random.key(3)} if declared.key else {}
    return declared.fn(updates, f=f, report=report, **kwargs, **hparams)


@functools.cache
def jitted(name, report):
    return jax.jit(functools.partial(call, name, report=report))


def make_tree(rng, n=9, dtype=jnp.float32):
    return {"w": jnp.asarray(rng.normal(size=(n, 3, 2)), dtype),
            "b": jnp.asarray(rng.normal(size=(n, 4)), dtype)}


def ravel(tree):
    return np.concatenate([np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)
                           for leaf in jax.tree.leaves(tree)], axis=1)


def ravel_row(tree):
    return ravel(jax.tree.map(lambda leaf: leaf[None], tree))[0]


def test_the_reporting_rules():
    assert set(AVERAGING) < set(REPORTING)
    assert set(REPORTING) - set(AVERAGING) >= {"centered_clipping", "clipped_clustering", "flame",
                                               "signguard"}
    for coordinatewise in ("median", "trimmed_mean", "meamed", "phocas", "bulyan"):
        assert not agg.spec(coordinatewise).reports
        assert agg.spec(coordinatewise).summary()["reports"] == "no"


@pytest.mark.parametrize("name", REPORTING)
def test_reporting_changes_nothing_and_weights_are_a_distribution(name):
    rng = np.random.default_rng(0)
    updates = make_tree(rng)
    updates = jax.tree.map(lambda u: u.at[-2:].multiply(20.0), updates)
    out, selection = jitted(name, True)(updates)
    jax.tree.map(np.testing.assert_array_equal, out, jitted(name, False)(updates))
    w = np.asarray(selection.weights)
    assert w.shape == (9,) and w.dtype == np.float32
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    assert int(selection.rejected()) == int(np.sum(w == 0))


@pytest.mark.parametrize("value", HOSTILE, ids=str)
@pytest.mark.parametrize("name", REPORTING)
def test_hostile_rows_have_weight_zero(name, value):
    if name == "mean":
        pytest.skip("the mean is not robust: it keeps every row")
    rng = np.random.default_rng(1)
    updates = make_tree(rng)
    updates = {"w": updates["w"].at[7, 1, 0].set(value), "b": updates["b"].at[8].set(value)}
    _, selection = jitted(name, True)(updates)
    w = np.asarray(selection.weights)
    byzantine = np.arange(9) >= 7
    if np.isfinite(value):  # huge rows may be clipped to a tiny weight rather than left out
        assert w[byzantine].sum() <= 1e-6, w
    else:
        np.testing.assert_array_equal(w[byzantine], 0.0)
        assert int(selection.kept_among(jnp.asarray(byzantine))) == 0
    np.testing.assert_allclose(float(selection.weight_of(jnp.asarray(byzantine))),
                               w[byzantine].sum(), atol=1e-7)


@pytest.mark.parametrize("name", AVERAGING)
def test_weights_reproduce_the_output_in_float64(name):
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(2)
        updates = make_tree(rng, dtype=jnp.float64)
        updates = jax.tree.map(lambda u: u.at[-2:].add(4.0), updates)
        out, selection = call(name, updates, report=True)
        w = np.asarray(selection.weights, np.float64)
        # The weights are stored in float32: reproduce to its precision.
        np.testing.assert_allclose(ravel_row(out), w @ ravel(updates), rtol=1e-6, atol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_krum_and_multi_krum_selections_are_the_reference_ones():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 6))
    x[-2:] += 3.0
    keys = ref_krum_scores(x, neighbours=9 - 2 - 2)
    order = sorted(keys, key=keys.get)
    _, krum = agg.krum(jnp.asarray(x, jnp.float32), f=2, report=True)
    np.testing.assert_array_equal(np.asarray(krum.weights), np.eye(9)[order[0]])
    _, multi = agg.multi_krum(jnp.asarray(x, jnp.float32), f=2, m=4, report=True)
    want = np.zeros(9)
    want[order[:4]] = 0.25
    np.testing.assert_array_equal(np.asarray(multi.weights), want)


def test_weighted_rules_report_their_weights():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(5, 3)), jnp.float32)
    w = jnp.asarray([1.0, 3.0, 0.0, 2.0, 2.0])
    _, selection = agg.mean(x, weights=w, report=True)
    np.testing.assert_allclose(selection.weights, w / 8.0)


# ------------------------------------------------------------------------------------------------
# Through the transform.


def test_transform_keeps_the_selection_in_its_state():
    rng = np.random.default_rng(6)
    updates = make_tree(rng)
    params = jax.tree.map(lambda u: jnp.zeros(u.shape[1:]), updates)
    tx = optax.chain(transforms.aggregate("multi_krum", f=2, report=True, num_workers=9),
                     optax.sgd(0.1))
    state = tx.init(params)
    before = optax.tree_utils.tree_get(state, "selection")
    np.testing.assert_array_equal(before.weights, np.zeros(9))
    step = jax.jit(tx.update)
    out, state = step(updates, state, params)
    selection = optax.tree_utils.tree_get(state, "selection")
    _, direct = agg.multi_krum(updates, f=2, report=True)
    np.testing.assert_array_equal(selection.weights, direct.weights)


def test_transform_selection_in_collective_mode():
    rng = np.random.default_rng(7)
    updates = make_tree(rng, n=8)
    params = jax.tree.map(lambda u: jnp.zeros(u.shape[1:]), updates)
    tx = transforms.aggregate("cge", f=2, report=True, num_workers=8, axis_name="workers")
    state = tx.init(params)
    _, new = jax.vmap(lambda u: tx.update(u, state, params), axis_name="workers",
                      out_axes=(0, None))(updates)
    _, direct = agg.cge(updates, f=2, report=True)
    np.testing.assert_array_equal(new.selection.weights, direct.weights)


@pytest.mark.parametrize("make, message", [
    (lambda: transforms.aggregate("median", f=1, report=True, num_workers=5),
     r"aggregate: median cannot report which rows it kept .* the rules that report are caf, "
     r"centered_clipping"),
    (lambda: transforms.aggregate("krum", f=1, report=True),
     r"aggregate: report=True keeps one weight per worker .* pass num_workers=n"),
    (lambda: transforms.aggregate("krum", f=1, num_workers=5),
     r"aggregate: num_workers=5 only sizes the selection that report=True keeps"),
    (lambda: transforms.aggregate("krum", f=1, report=True, num_workers=0),
     r"aggregate: num_workers must be"),
    (lambda: transforms.aggregate(agg.krum, f=1, report=True, num_workers=5).update(
        jnp.zeros((7, 2)), transforms.aggregate(agg.krum, f=1, report=True,
                                                num_workers=5).init(jnp.zeros(2))),
     r"aggregate: report=True with num_workers=5, but krum aggregated 7 rows"),
    (lambda: agg.spec("median").apply(jnp.zeros((5, 2)), None, None, {"f": 1}, report=True),
     r"apply: median cannot report"),
    (lambda: agg.spec("krum").check_hparams({"f": 1, "report": True}, "tests"),
     r"tests: report is not a hyperparameter of krum"),
    (lambda: agg.spec("median").check_hparams({"f": 1, "report": True}, "tests"),
     r"tests: median cannot report"),
], ids=["non-reporting", "no-n", "n-without-report", "bad-n", "wrong-n", "apply", "hparam",
        "hparam-median"])
def test_misuse_is_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
