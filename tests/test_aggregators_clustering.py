"""Clipped clustering, SignGuard and FLAME against float64 references and scikit-learn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import HDBSCAN, AgglomerativeClustering

from rbyz import aggregators as agg
from rbyz.aggregators import clustering

import references_clustering as ref
from references import float64


def tree_of(x, dtype):
    """``{"a": [n, 3], "b": [n, rest]}`` (or one leaf when D <= 3) of a ``[n, D]`` matrix."""
    x = np.asarray(x)
    if x.shape[1] <= 3:
        return {"a": jnp.asarray(x, dtype)}
    return {"a": jnp.asarray(x[:, :3], dtype), "b": jnp.asarray(x[:, 3:], dtype).reshape(
        len(x), 1, x.shape[1] - 3)}


def ravel_out(out):
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(out)])


@functools.cache
def jitted(name, **hparams):
    return jax.jit(functools.partial(agg.get(name), **hparams))


def attacked(rng, n, f, d, kind="flip"):
    """Honest rows around a common direction; ``f`` rows replaced by an attack."""
    mean = rng.normal(0.0, 1.0, d)
    x = mean + 0.7 * rng.normal(0.0, 1.0, (n, d))
    if kind == "flip":
        x[:f] = -4.0 * mean + 0.1 * rng.normal(0.0, 1.0, (f, d))
    elif kind == "scale":
        x[:f] = 30.0 * mean
    elif kind == "random":
        x[:f] = 5.0 * rng.normal(0.0, 1.0, (f, d))
    return x


CASES = [(7, 2, 5, "flip"), (10, 3, 9, "scale"), (12, 5, 16, "random"), (9, 4, 2, "none")]
RULES = {"clipped_clustering": ref.ref_clipped_clustering, "signguard": ref.ref_signguard,
         "flame": ref.ref_flame}


@pytest.mark.parametrize("n, f, d, kind", CASES)
@pytest.mark.parametrize("name", sorted(RULES))
def test_matches_float64_reference(name, n, f, d, kind):
    rng = np.random.default_rng(n * 100 + d)
    x = attacked(rng, n, f, d, kind)
    with float64():
        out = jitted(name, f=f)(tree_of(x, jnp.float64))
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out))
        np.testing.assert_allclose(ravel_out(out), RULES[name](x, f), rtol=1e-10, atol=1e-12)
    out32 = jitted(name, f=f)(tree_of(x, jnp.float32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out32))
    np.testing.assert_allclose(ravel_out(out32), RULES[name](x, f), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("linkage", ["single", "complete"])
def test_clipped_clustering_linkages(linkage):
    rng = np.random.default_rng(3)
    x = attacked(rng, 9, 3, 6, "random")
    with float64():
        out = jitted("clipped_clustering", f=3, linkage=linkage)(tree_of(x, jnp.float64))
    np.testing.assert_allclose(ravel_out(out), ref.ref_clipped_clustering(x, 3, linkage),
                               rtol=1e-10, atol=1e-12)


def test_clipped_clustering_max_tau_caps_the_clipping():
    rng = np.random.default_rng(4)
    x = attacked(rng, 7, 2, 4, "flip")
    with float64():
        out = jitted("clipped_clustering", f=2, max_tau=0.5)(tree_of(x, jnp.float64))
    np.testing.assert_allclose(ravel_out(out), ref.ref_clipped_clustering(x, 2, max_tau=0.5),
                               rtol=1e-10)
    assert np.linalg.norm(ravel_out(out)) <= 0.5 + 1e-12


def test_flame_cosine_rows_variant():
    rng = np.random.default_rng(5)
    x = attacked(rng, 11, 4, 7, "random")
    with float64():
        out = jitted("flame", f=4, distance="cosine_rows")(tree_of(x, jnp.float64))
    np.testing.assert_allclose(ravel_out(out), ref.ref_flame(x, 4, "cosine_rows"), rtol=1e-10,
                               atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The clustering kernels against scikit-learn.


def distance_cases():
    rng = np.random.default_rng(11)
    for n in (5, 8, 13):
        yield ref.ref_cosine_distances(rng.normal(0, 1, (n, 6)), 2.0)
        yield ref.ref_cosine_distances(attacked(rng, n, (n - 1) // 2, 6, "flip"), 2.0)
        yield ref.ref_cosine_distances(attacked(rng, n, (n - 1) // 2, 6, "random"), 2.0)


def partition(labels):
    groups = {}
    for i, label in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(label, set()).add(i)
    return sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
def test_agglomeration_equals_sklearn(linkage):
    for dist in distance_cases():
        want = AgglomerativeClustering(n_clusters=2, metric="precomputed",
                                       linkage=linkage).fit(dist).labels_
        with float64():
            got = clustering._agglomerate(jnp.asarray(dist), linkage, 2)
        assert partition(got) == partition(want)
        assert sorted(ref.ref_agglomerate(dist, linkage, 2)) == partition(want)


def test_majority_cluster_equals_sklearn_hdbscan():
    """HDBSCAN(min_cluster_size=n//2+1, min_samples=1, allow_single_cluster=True) labels one
    cluster; it is the majority single-linkage cluster, on the cosine distances and on the
    released code's Euclidean distances between rows of the cosine matrix."""
    for dist in distance_cases():
        n = len(dist)
        settings = dict(min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True,
                        copy=True)
        rows = np.sqrt(((dist[:, None, :] - dist[None, :, :]) ** 2).sum(-1))
        for matrix, model in ((dist, HDBSCAN(metric="precomputed", **settings).fit(dist)),
                              (rows, HDBSCAN(**settings).fit(dist))):
            want = set(np.flatnonzero(model.labels_ >= 0).tolist())
            assert len(set(model.labels_[model.labels_ >= 0].tolist())) == 1
            with float64():
                got = np.asarray(clustering._majority_cluster(jnp.asarray(matrix)))
            assert set(np.flatnonzero(got).tolist()) == want
            assert ref.ref_majority_cluster(matrix) == want


def test_majority_cluster_includes_rows_joining_at_the_critical_height():
    # 0-1-2 chained at distance 1, 3 joins at 1 too, 4 far: the cluster at t* = 1 is {0,1,2,3}.
    dist = np.full((5, 5), 9.0)
    for i, j in ((0, 1), (1, 2), (2, 3)):
        dist[i, j] = dist[j, i] = 1.0
    np.fill_diagonal(dist, 0.0)
    got = np.asarray(clustering._majority_cluster(jnp.asarray(dist)))
    assert got.tolist() == [True, True, True, True, False]
    assert ref.ref_majority_cluster(dist) == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------------
# Hostile rows, robustness, randomness.


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", sorted(RULES))
def test_non_finite_rows_are_left_out(name, value):
    rng = np.random.default_rng(8)
    x = attacked(rng, 9, 0, 6, "none")
    x[[2, 6]] = value
    x[4, 1] = np.nan
    out = ravel_out(jitted(name, f=4)(tree_of(x, jnp.float32)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, RULES[name](x, 4), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(RULES))
def test_flipped_rows_do_not_win(name):
    """Sign-flipped rows of twice the honest norm (inside SignGuard's norm filter, so that its
    sign statistics must catch them): the output stays near the honest mean, norm at most the
    median norm."""
    rng = np.random.default_rng(9)
    mean = 0.5 + np.abs(rng.normal(0.0, 1.0, 12))
    x = mean + 0.7 * rng.normal(0.0, 1.0, (11, 12))
    x[:4] = -2.0 * mean + 0.1 * rng.normal(0.0, 1.0, (4, 12))
    out = ravel_out(jitted(name, f=4)(tree_of(x, jnp.float32)))
    honest = x[4:].mean(axis=0)
    assert np.dot(out, honest) > 0.8 * np.linalg.norm(out) * np.linalg.norm(honest)
    assert np.linalg.norm(out) <= np.median(np.linalg.norm(x, axis=1)) * (1 + 1e-5)


def test_bfloat16_in_bfloat16_out():
    x = attacked(np.random.default_rng(10), 7, 2, 5)
    for name in RULES:
        out = jitted(name, f=2)(tree_of(x, jnp.bfloat16))
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))
        np.testing.assert_allclose(ravel_out(out), RULES[name](x, 2), rtol=0.05, atol=0.05)


def test_signguard_coordinate_subsample_uses_the_key():
    x = attacked(np.random.default_rng(12), 9, 3, 40, "flip")
    rule = jax.jit(functools.partial(agg.signguard, f=3, coordinates=0.25))
    a, b = rule(tree_of(x, jnp.float32), key=jax.random.key(1)), rule(tree_of(x, jnp.float32),
                                                                       key=jax.random.key(1))
    np.testing.assert_array_equal(ravel_out(a), ravel_out(b))
    assert np.all(np.isfinite(ravel_out(a)))
    with pytest.raises(ValueError, match="signguard: needs a random key"):
        agg.signguard(tree_of(x, jnp.float32), f=3, coordinates=0.25)


def test_flame_noise_scale_and_key():
    rng = np.random.default_rng(13)
    x = attacked(rng, 7, 2, 4000)
    tree = {"w": jnp.asarray(x, jnp.float32)}
    clean = ravel_out(agg.flame(tree, f=2))
    noisy = ravel_out(agg.flame(tree, f=2, noise=0.01, key=jax.random.key(0)))
    again = ravel_out(agg.flame(tree, f=2, noise=0.01, key=0))
    np.testing.assert_array_equal(noisy, again)
    std = np.std(noisy - clean)
    assert abs(std / (0.01 * np.median(np.linalg.norm(x, axis=1))) - 1) < 0.05
    with pytest.raises(ValueError, match="flame: needs a random key"):
        agg.flame(tree, f=2, noise=0.01)


# ------------------------------------------------------------------------------------------------
# Bad settings.


BAD = [
    ("clipped_clustering", {"f": 2}, 4, "clipped_clustering: needs n > 2f; got n=4, f=2"),
    ("clipped_clustering", {"f": 1, "linkage": "ward"}, 5, "clipped_clustering: unknown linkage"),
    ("clipped_clustering", {"f": 1, "max_tau": 0.0}, 5, "clipped_clustering: needs max_tau > 0"),
    ("signguard", {"f": 3}, 6, "signguard: needs n > 2f; got n=6, f=3"),
    ("signguard", {"f": 1, "lower": 3.0, "upper": 1.0}, 5, "signguard: needs 0 <= lower < upper"),
    ("signguard", {"f": 1, "coordinates": 0.0}, 5, "signguard: needs 0 < coordinates <= 1"),
    ("signguard", {"f": 1, "coordinates": 1.5}, 5, "signguard: needs 0 < coordinates <= 1"),
    ("signguard", {"f": 1, "iterations": 0}, 5, "signguard: iterations must be >= 1"),
    ("flame", {"f": 5}, 9, "flame: needs n > 2f; got n=9, f=5"),
    ("flame", {"f": 1, "distance": "euclidean"}, 5, "flame: unknown distance"),
    ("flame", {"f": 1, "noise": -0.1}, 5, "flame: needs noise >= 0"),
    ("flame", {"f": 1.5}, 5, "flame: f must be a Python int"),
]


@pytest.mark.parametrize("name, hparams, n, message", BAD)
def test_bad_settings_raise(name, hparams, n, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        agg.get(name)({"w": jnp.ones((n, 3))}, **hparams)
