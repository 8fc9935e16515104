"""Attacks tailored to a defence (rbyz.attacks.tailored) against float64 NumPy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rbyz import aggregators
from rbyz import attacks


def make_tree(h, seed=0, d=(3, 4), offset=0.3, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(offset, 1.0, (h,) + d), dtype),
            "b": (jnp.asarray(rng.normal(-offset, 1.0, (h, 5)), dtype),)}


def np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def leaf_uniforms(key, tree, f):
    """The uniforms the random attacks draw: one key per leaf, in the accumulation dtype."""
    flat = jax.tree.leaves(tree)
    keys = jax.random.split(jax.random.key(key), len(flat))
    return [np.asarray(jax.random.uniform(k, (f,) + x.shape[1:], jnp.float32), np.float64)
            for k, x in zip(keys, flat)]


# ------------------------------------------------------------------------------------------------
# Fang et al., trimmed mean / median.


def np_fang_tm_bounds(x, b):
    lo_all, hi_all = x.min(0), x.max(0)
    low, high = np.empty_like(lo_all), np.empty_like(lo_all)
    for j in np.ndindex(lo_all.shape):
        mn, mx = lo_all[j], hi_all[j]
        if x[(slice(None),) + j].mean() > 0:  # below the minimum
            low[j], high[j] = (b * mn, mn) if mn < 0 else (mn / b, mn)
        else:  # above the maximum
            low[j], high[j] = (mx, b * mx) if mx > 0 else (mx, mx / b)
    return low, high


@pytest.mark.parametrize("h,f", [(4, 1), (7, 3), (12, 5)])
@pytest.mark.parametrize("b", [2.0, 3.5])
def test_fang_trimmed_mean_matches_numpy(h, f, b):
    honest = make_tree(h, seed=h + f)
    rows = attacks.fang_trimmed_mean(honest, f=f, key=7, b=b)
    for x, r, u in zip(np_leaves(honest), np_leaves(rows), leaf_uniforms(7, honest, f)):
        low, high = np_fang_tm_bounds(x, b)
        assert r.shape == (f,) + x.shape[1:]
        assert np.all(r >= low - 1e-6) and np.all(r <= high + 1e-6)
        np.testing.assert_allclose(r, low + u * (high - low), rtol=1e-6, atol=1e-6)
        assert np.unique(r).size > 1  # independent draws


def test_fang_trimmed_mean_moves_trimmed_mean_and_median_against_the_honest_mean():
    n, f = 11, 3
    honest = make_tree(n, seed=1, d=(40,))
    out, mask = attacks.inject(honest, "fang_trimmed_mean", f=f, key=0)
    good = [x[~np.asarray(mask)] for x in np_leaves(honest)]
    for rule in (aggregators.trimmed_mean, aggregators.median):
        for g, agg, clean in zip(good, np_leaves(rule(out, f=f)), np_leaves(rule(honest, f=f))):
            s = np.sign(g.mean(0))
            assert np.all(s * (agg - clean) <= 1e-6)  # never towards the honest direction
            assert np.mean(s * (agg - clean)) < 0


@pytest.mark.parametrize("h,f", [(3, 3), (5, 2)])
@pytest.mark.parametrize("ddof", [0, 1])
def test_fang_trimmed_mean_partial_matches_numpy(h, f, ddof):
    own = make_tree(h, seed=h * f)
    rows = attacks.fang_trimmed_mean_partial(own, f=f, key=3, ddof=ddof)
    for x, r, u in zip(np_leaves(own), np_leaves(rows), leaf_uniforms(3, own, f)):
        mu, sd = x.mean(0), x.std(0, ddof=ddof)
        low = np.where(mu > 0, mu - 4 * sd, mu + 3 * sd)
        high = np.where(mu > 0, mu - 3 * sd, mu + 4 * sd)
        assert np.all(r >= low - 1e-5) and np.all(r <= high + 1e-5)
        np.testing.assert_allclose(r, low + u * (high - low), rtol=1e-5, atol=1e-5)
    assert attacks.spec("fang_trimmed_mean_partial").knowledge == "own"


def test_fang_trimmed_mean_float64():
    with jax.enable_x64(True):
        honest = make_tree(6, dtype=jnp.float64)
        rows = attacks.fang_trimmed_mean(honest, f=2, key=0)
        assert all(r.dtype == jnp.float64 for r in jax.tree.leaves(rows))
        for x, r in zip(np_leaves(honest), np_leaves(rows)):
            low, high = np_fang_tm_bounds(x, 2.0)
            assert np.all(r >= low) and np.all(r <= high)


# ------------------------------------------------------------------------------------------------
# Fang et al., Krum.


def np_krum_index(stack, f):
    n = len(stack)
    dist = ((stack[:, None] - stack[None]) ** 2).sum(-1)
    scores = [np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)]
    return int(np.argmin(scores))


def np_fang_krum(x, n, f, threshold=1e-5):
    """The paper's search, as a plain loop: (lambda, sign)."""
    h, d = x.shape
    s = np.sign(x.mean(0))
    near = min(n - f - 2, h - 1)
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    sums = [np.sort(np.delete(dist[i], i))[:near].sum() for i in range(h)]
    lam = min(sums) / ((n - 2 * f - 1) * math.sqrt(d))
    lam += max(np.linalg.norm(x, axis=1)) / math.sqrt(d)
    while lam > threshold:
        stack = np.concatenate([np.stack([-lam * s] * f), x])
        if np_krum_index(stack, f) < f:
            break
        lam /= 2
    return lam, s


def flat(tree):
    return np.concatenate([x.reshape(x.shape[0], -1) for x in np_leaves(tree)], axis=1)


@pytest.mark.parametrize("n,f,d", [(10, 3, (6, 5)), (7, 2, (10, 4)), (13, 5, (3, 3))])
def test_fang_krum_lambda_matches_a_numpy_loop(n, f, d):
    honest = make_tree(n - f, seed=n, d=d)
    rows = attacks.fang_krum(honest, f=f, n=n)
    lam, s = np_fang_krum(flat(honest), n, f)
    got = flat(rows)
    np.testing.assert_allclose(got, np.stack([-lam * s] * f), rtol=1e-5, atol=1e-7)


def test_fang_krum_is_selected_by_krum_and_moves_it_against_the_honest_mean():
    n, f = 12, 3
    honest = make_tree(n, seed=4, d=(8, 8), offset=0.5)
    out, mask = attacks.inject(honest, "fang_krum", f=f, positions="random", key=2)
    chosen = flat(jax.tree.map(lambda x: x[None], aggregators.krum(out, f=f)))[0]
    byz = flat(out)[np.asarray(mask)]
    assert any(np.array_equal(chosen, row) for row in byz)
    good = flat(honest)[~np.asarray(mask)]
    assert chosen @ good.mean(0) < 0


def test_fang_krum_with_own_knowledge_and_float64():
    with jax.enable_x64(True):
        honest = make_tree(10, seed=5, d=(30,), dtype=jnp.float64)
        out, _ = attacks.inject(honest, "fang_krum", f=3, omniscient=False)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out))
        own = jax.tree.map(lambda x: x[7:], honest)
        lam, s = np_fang_krum(flat(own), 10, 3)
        np.testing.assert_allclose(flat(out)[7:], np.stack([-lam * s] * 3), rtol=1e-12)


def test_fang_krum_survives_non_finite_known_rows():
    honest = make_tree(8, seed=6)
    honest = jax.tree.map(lambda x: x.at[0].set(jnp.nan), honest)
    rows = jax.jit(lambda g: attacks.fang_krum(g, f=2, n=10))(honest)
    assert all(r.shape[0] == 2 for r in jax.tree.leaves(rows))


# ------------------------------------------------------------------------------------------------
# ByzMean.


@pytest.mark.parametrize("n,f", [(10, 3), (9, 4), (6, 1)])
@pytest.mark.parametrize("variant", ["paper", "signguard_code"])
def test_byzmean_matches_numpy(n, f, variant):
    honest = make_tree(n - f, seed=n + f)
    rows = attacks.byzmean(honest, f=f, n=n, variant=variant)
    m1 = f // 2
    m2 = f - m1
    for x, r in zip(np_leaves(honest), np_leaves(rows)):
        mu, sd = x.mean(0), x.std(0, ddof=1)
        t = mu - 0.5 * sd
        if variant == "paper":
            v = ((n - m1) * t - x.sum(0)) / m2
        else:  # SignGuard's byzMean.py, the Byzantine workers' own gradients ~ mu
            v = ((n - f - m1) * t - (x.sum(0) + f * mu)) / m2
        np.testing.assert_allclose(r, np.stack([t] * m1 + [v] * m2), rtol=1e-5, atol=1e-5)
        if variant == "paper":  # the mean of all n rows is the target
            np.testing.assert_allclose((x.sum(0) + r.sum(0)) / n, t, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# ROP against centered clipping.


def np_rop(x, center, radius, angle, pi, lamb):
    mu = x.mean(0)
    c = mu if center is None else center
    ref = lamb * c + (1 - lamb) * mu
    loc = pi * c + (1 - pi) * mu
    p = np.ones_like(ref)
    p = p - ref * (p @ ref) / (ref @ ref)
    p /= np.linalg.norm(p)
    q = math.sin(math.radians(angle)) * p + math.cos(math.radians(angle)) * ref / np.linalg.norm(ref)
    if angle == 90:
        q = p
    return loc + radius * q / np.linalg.norm(q)


@pytest.mark.parametrize("kwargs", [{}, {"radius": 3.0, "angle": 60.0},
                                    {"radius": 1.0, "pi": 0.5, "lamb": 0.9, "center": True}])
def test_rop_matches_numpy(kwargs):
    kwargs = dict(kwargs)
    honest = make_tree(7, seed=8)
    center = None
    if kwargs.pop("center", False):
        center = jax.tree.map(lambda x: x[0] * 0.5, honest)
    rows = attacks.rop(honest, f=3, center=center, **kwargs)
    expected = np_rop(flat(honest), None if center is None else flat(
        jax.tree.map(lambda x: x[None], center))[0], kwargs.get("radius", 99.0),
        kwargs.get("angle", 90.0), kwargs.get("pi", 0.0), kwargs.get("lamb", 0.0))
    np.testing.assert_allclose(flat(rows), np.stack([expected] * 3), rtol=1e-5, atol=1e-4)


def test_rop_survives_centered_clipping_and_drifts_orthogonally():
    n, f, tau = 10, 3, 100.0
    honest = make_tree(n, seed=9, d=(20,))
    out, mask = attacks.inject(honest, "rop", f=f)
    good = flat(honest)[~np.asarray(mask)]
    mu = good.mean(0)
    center = jax.tree.map(lambda x: x[~np.asarray(mask)].mean(0), honest)
    agg = flat(jax.tree.map(lambda x: x[None],
                            aggregators.centered_clipping(out, f=f, center=center, tau=tau)))[0]
    np.testing.assert_allclose(agg, flat(out).mean(0), rtol=1e-4, atol=1e-4)  # nothing clipped
    drift = agg - mu
    assert abs(drift @ mu) < 1e-3 * np.linalg.norm(drift) * np.linalg.norm(mu)
    np.testing.assert_allclose(np.linalg.norm(drift), f * 99.0 / n, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad settings: ValueError naming the rule and the values.


@pytest.mark.parametrize("call,match", [
    (lambda: attacks.fang_trimmed_mean(make_tree(4), f=1, key=0, b=1.0),
     r"fang_trimmed_mean: needs b > 1 .* got b=1.0"),
    (lambda: attacks.fang_trimmed_mean(make_tree(4), f=1),
     r"fang_trimmed_mean: needs a random key"),
    (lambda: attacks.fang_trimmed_mean_partial(make_tree(4), f=1, key=0, low=5.0),
     r"fang_trimmed_mean_partial: needs 0 <= low <= high .* low=5.0, high=4.0"),
    (lambda: attacks.fang_trimmed_mean_partial(make_tree(1), f=1, key=0),
     r"fang_trimmed_mean_partial: .* got 1 rows, ddof=1"),
    (lambda: attacks.fang_krum(make_tree(5), f=3, n=8),
     r"fang_krum: needs n >= 2f \+ 3; got n=8, f=3"),
    (lambda: attacks.fang_krum(make_tree(5), f=1, n=8, threshold=0.0),
     r"fang_krum: needs threshold > 0"),
    (lambda: attacks.byzmean(make_tree(5), f=1, n=6, variant="code"),
     r"byzmean: variant must be 'paper' or 'signguard_code'; got 'code'"),
    (lambda: attacks.byzmean(make_tree(1), f=1, n=6), r"byzmean: .* got 1 rows, ddof=1"),
    (lambda: attacks.byzmean(make_tree(3), f=6, n=6), r"byzmean: needs f < n; got n=6, f=6"),
    (lambda: attacks.rop(make_tree(3), f=1, radius=-1.0), r"rop: needs radius >= 0"),
    (lambda: attacks.rop(make_tree(3), f=1, center=jnp.zeros(3)),
     r"rop: center must be a pytree like one row"),
])
def test_bad_settings(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_injection_path_checks_krum_constraint():
    with pytest.raises(ValueError, match=r"fang_krum: needs n >= 2f \+ 3; got n=8, f=3"):
        attacks.inject(make_tree(8), "fang_krum", f=3)
