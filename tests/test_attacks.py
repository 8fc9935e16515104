"""Tests of rbyz.attacks against float64 NumPy references, the defences they break or not, the
scale search, the injection path and bad input. Registry-wide properties: test_attack_properties.py.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbyz import aggregators
from rbyz import attacks

DTYPES = [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)]


# ------------------------------------------------------------------------------------------
# Data and small reference aggregators (independent of rbyz.aggregators).


def make_tree(h, seed=0, dtype=jnp.float32, offset=0.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(offset, 1.0, (h, 3, 4)), dtype),
        "b": jnp.asarray(rng.normal(offset, 1.0, (h, 5)), dtype),
    }


def np_tree(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def assert_close(tree, expected, tol):
    for k in expected:
        np.testing.assert_allclose(np.asarray(tree[k], np.float64), expected[k], rtol=tol,
                                   atol=tol)


def flat_np(tree):
    """[rows, d] float64 view of a stacked pytree (leaf order fixed by the dict keys)."""
    return np.concatenate(
        [np.asarray(tree[k], np.float64).reshape(np.shape(tree[k])[0], -1) for k in sorted(tree)],
        axis=1)


def agg_mean(x):
    return jnp.mean(x, axis=0)


# The defences are the library's own, so these tests check attacks against what users run.
def agg_median(x):
    return aggregators.median(x)


def agg_trimmed_mean(x, f):
    return aggregators.trimmed_mean(x, f=f)


def agg_krum(x, f):
    return aggregators.krum(x, f=f)


# ------------------------------------------------------------------------------------------
# ALIE.

ALIE_TABLE = [
    (51, 12, 0.599, 0.361), (50, 12, 0.583, 0.336), (50, 10, 0.468, 0.253),
    (25, 5, 0.468, 0.253), (20, 4, 0.385, 0.157), (45, 5, 0.253, 0.126),
    (15, 3, 0.431, 0.210), (15, 6, 1.111, 0.765), (10, 2, 0.253, 0.0), (12, 2, 0.210, 0.0),
]


@pytest.mark.parametrize("n,m,z1,z2", ALIE_TABLE)
def test_alie_z_matches_table(n, m, z1, z2):
    assert attacks.alie_z(n, m) == pytest.approx(z1, abs=6e-4)  # v1, the paper's Algorithm 1
    assert attacks.alie_z(n, m, variant="v1") == pytest.approx(z1, abs=6e-4)
    assert attacks.alie_z(n, m, variant="v2") == pytest.approx(z2, abs=6e-4)


def test_alie_default_is_the_papers_v1():
    honest = make_tree(8, seed=3)
    out = attacks.alie(honest, f=2, n=10)
    expected = attacks.alie(honest, f=2, z=attacks.alie_z(10, 2, variant="v1"))
    chex.assert_trees_all_close(out, expected)
    assert attacks.spec("alie").hparams["variant"] == "v1"
    assert "v1" in attacks.spec("alie").note and "v2" in attacks.spec("alie").note


@pytest.mark.parametrize("n,f,variant,formula,advice", [
    (10, 2, "v2", "q_v2 = (n - f - s)/(n - f) = 4/8", "variant='v1', which gives z=0.253"),
    (12, 2, "v2", "q_v2 = (n - f - s)/(n - f) = 5/10", "variant='v1', which gives z=0.210"),
    (10, 1, "v1", "q_v1 = (n - s)/n = 5/10", "Pass z=..."),
])
def test_alie_refuses_z_not_positive(n, f, variant, formula, advice):
    honest = make_tree(n - f)
    with pytest.raises(ValueError) as err:
        attacks.alie(honest, f=f, n=n, variant=variant)
    message = str(err.value)
    for part in (f"n={n}, f={f}", formula, f"variant={variant!r}", advice, "z=..."):
        assert part in message, (part, message)
    # The same through the injection path that transforms.byzantine and the harness use.
    with pytest.raises(ValueError, match=f"n={n}, f={f}"):
        attacks.attack_rows("alie", honest, f=f, n=n, hparams={"variant": variant})
    if variant == "v1":
        assert "variant='v2'" not in message  # v2 gives no positive z here either


@pytest.mark.parametrize("z", [0.0, -1.5])
def test_alie_refuses_a_given_z_not_positive(z):
    with pytest.raises(ValueError, match=r"alie: needs z > 0"):
        attacks.alie(make_tree(4), f=1, z=z)


@pytest.mark.parametrize("h", [3, 7])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("ddof,sign", [(0, -1), (1, 1)])
@pytest.mark.parametrize("z", [None, 1.5])
def test_alie_matches_numpy(h, dtype, tol, ddof, sign, z):
    honest = make_tree(h, seed=h, dtype=dtype)
    f, n = 4, 20
    out = attacks.alie(honest, f=f, n=n, z=z, ddof=ddof, sign=sign)
    zz = attacks.alie_z(n, f) if z is None else z
    expected = {}
    for k, x in np_tree(honest).items():
        mu, sd = x.mean(0), x.std(0, ddof=ddof)
        expected[k] = np.stack([mu + sign * zz * sd] * f)
    assert_close(out, expected, tol)
    assert all(out[k].dtype == dtype for k in out)


# ------------------------------------------------------------------------------------------
# One-line attacks against NumPy.


def np_mean_rows(x, f, scale):
    return np.stack([scale * x.mean(0)] * f)


def np_cycle(x, f, scale):
    return np.stack([scale * x[i % x.shape[0]] for i in range(f)])


SIMPLE = [
    ("ipm", {"epsilon": 0.3}, lambda x, f: np_mean_rows(x, f, -0.3)),
    ("sign_flip", {}, lambda x, f: np_mean_rows(x, f, -1.0)),
    ("reverse", {}, lambda x, f: np_cycle(x, f, -100.0)),
    ("reverse", {"scale": 2.0}, lambda x, f: np_cycle(x, f, -2.0)),
    ("constant", {}, lambda x, f: np.full((f,) + x.shape[1:], -100.0)),
    ("sign_directional", {"direction": 1}, lambda x, f: np.ones((f,) + x.shape[1:])),
    ("sign_reverse", {}, lambda x, f: np_cycle(x, f, -1.0)),
    ("mimic", {"target": 2}, lambda x, f: np.stack([x[2]] * f)),
]


@pytest.mark.parametrize("name,kwargs,reference", SIMPLE)
@pytest.mark.parametrize("h,f", [(3, 2), (5, 7)])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_simple_attacks_match_numpy(name, kwargs, reference, h, f, dtype, tol):
    honest = make_tree(h, seed=f, dtype=dtype)
    out = attacks.get(name)(honest, f=f, **kwargs)
    expected = {k: reference(x, f) for k, x in np_tree(honest).items()}
    assert_close(out, expected, tol)
    assert all(out[k].dtype == dtype and out[k].shape[0] == f for k in out)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(value):
    out = attacks.non_finite(make_tree(3), f=2, value=value)
    for leaf in out.values():
        np.testing.assert_array_equal(np.asarray(leaf), np.full(leaf.shape, value))


def test_gaussian_and_sign_random_determinism_and_statistics():
    honest = {"a": jnp.zeros((3, 4000)), "b": jnp.zeros((3, 2), jnp.bfloat16)}
    first = attacks.gaussian(honest, f=2, key=7, mean=1.0, std=3.0)
    again = attacks.gaussian(honest, f=2, key=jax.random.key(7), mean=1.0, std=3.0)
    other = attacks.gaussian(honest, f=2, key=8, mean=1.0, std=3.0)
    np.testing.assert_array_equal(np.asarray(first["a"]), np.asarray(again["a"]))
    assert not np.array_equal(np.asarray(first["a"]), np.asarray(other["a"]))
    a = np.asarray(first["a"], np.float64)
    assert abs(a.mean() - 1.0) < 0.1 and abs(a.std() - 3.0) < 0.1
    assert first["b"].dtype == jnp.bfloat16 and first["b"].shape == (2, 2)
    signs = np.asarray(attacks.sign_random(honest, f=2, key=3)["a"])
    assert set(np.unique(signs)) == {-1.0, 1.0} and abs(signs.mean()) < 0.05


def test_label_flip():
    labels = jnp.arange(10, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(attacks.label_flip(labels)), 9 - np.arange(10))
    assert attacks.label_flip(jnp.array([0, 1], jnp.int8), num_classes=2).dtype == jnp.int8


# ------------------------------------------------------------------------------------------
# Min-Max and Min-Sum.


def np_direction(x, kind):
    mean = x.mean(0)
    if kind == "unit_vec":
        return mean / np.linalg.norm(mean)
    if kind == "sign":
        return np.sign(mean)
    return x.std(0)


def np_min_max_ok(x, m, objective):
    to_m = np.array([np.sum((m - xi) ** 2) for xi in x])
    pair = np.array([[np.sum((xi - xj) ** 2) for xj in x] for xi in x])
    if objective == "max":
        return to_m.max(), pair.max()
    return to_m.sum(), pair.sum(1).min()


@pytest.mark.parametrize("name,objective", [("min_max", "max"), ("min_sum", "sum")])
@pytest.mark.parametrize("direction", ["std", "unit_vec", "sign"])
@pytest.mark.parametrize("h", [4, 9])
def test_min_max_sum_is_the_largest_feasible(name, objective, direction, h):
    honest = make_tree(h, seed=h, offset=0.5)
    out = jax.jit(functools.partial(attacks.get(name), f=3, direction=direction))(honest)
    x = flat_np(honest)
    m = flat_np(out)
    assert np.allclose(m, m[:1])
    p = np_direction(x, direction)
    gamma = np.dot(x.mean(0) - m[0], p) / np.dot(p, p)
    assert gamma > 0
    np.testing.assert_allclose(m[0], x.mean(0) - gamma * p, rtol=1e-4, atol=1e-5)
    value, bound = np_min_max_ok(x, x.mean(0) - gamma * p, objective)
    assert value <= bound * (1 + 1e-5)
    larger = gamma * (1 + 1e-3) + 1e-6
    value, bound = np_min_max_ok(x, x.mean(0) - larger * p, objective)
    assert value > bound


@settings(max_examples=10)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_min_max_property(h, seed, spread):
    x = np.random.default_rng(seed).normal(1.0, spread, (h, 6)).astype(np.float32)
    m = np.asarray(_min_max_jit(jnp.asarray(x)), np.float64)[0]
    value, bound = np_min_max_ok(x.astype(np.float64), m, "max")
    assert value <= bound * (1 + 1e-4)


_min_max_jit = jax.jit(functools.partial(attacks.min_max, f=1))


# ------------------------------------------------------------------------------------------
# Bit flips.


def popcount_rows(before, after):
    """[f] number of differing bits per row over all leaves."""
    total = 0
    for k in before:
        width = np.dtype(before[k].dtype).itemsize * 8
        ints = np.dtype(f"uint{width}")
        xor = np.asarray(before[k]).view(ints) ^ np.asarray(after[k]).view(ints)
        bits = np.unpackbits(xor.reshape(xor.shape[0], -1).view(np.uint8), axis=1)
        total = total + bits.sum(1)
    return total


@pytest.mark.parametrize("bits", [1, 17])
@pytest.mark.parametrize("bit_range", ["any", "exponent", (0, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bit_flip_per_row_changes_exactly_bits(bits, bit_range, dtype):
    honest = make_tree(2, dtype=dtype)
    attack = jax.jit(functools.partial(attacks.bit_flip, f=3, bits=bits, bit_range=bit_range))
    out = attack(honest, key=jax.random.key(11))
    own = {k: np.asarray(v)[np.arange(3) % 2] for k, v in honest.items()}
    np.testing.assert_array_equal(popcount_rows(own, out), [bits] * 3)
    again = attack(honest, key=jax.random.key(11))
    assert popcount_rows({k: np.asarray(v) for k, v in out.items()}, again).sum() == 0


@pytest.mark.parametrize("bits,bit_range,allowed", [
    (2, "exponent", range(23, 31)), (1, "sign", [31]), (4, "any", range(32))])
def test_bit_flip_per_value(bits, bit_range, allowed):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 50)), jnp.float32)
    out = attacks.bit_flip(x, f=2, key=5, bits=bits, per="value", bit_range=bit_range)
    xor = np.asarray(x).view(np.uint32) ^ np.asarray(out).view(np.uint32)
    for value in xor.ravel():
        positions = [b for b in range(32) if value >> b & 1]
        assert len(positions) == bits and set(positions) <= set(allowed)


@settings(max_examples=10)
@given(st.sampled_from([1, 6, 40]), st.integers(0, 1000))
def test_bit_flip_property(bits, seed):
    honest = {"a": jnp.ones((1, 3, 2)), "b": jnp.zeros((1, 1))}
    out = _bit_flip_jit(honest, jax.random.key(seed), bits)
    assert popcount_rows({k: np.asarray(v) for k, v in honest.items()}, out)[0] == bits


@functools.partial(jax.jit, static_argnums=2)
def _bit_flip_jit(honest, key, bits):
    return attacks.bit_flip(honest, f=1, key=key, bits=bits)


# ------------------------------------------------------------------------------------------
# Adaptive attacks.


def distance_to_mean(aggregator, honest, rows):
    out = aggregator(jnp.concatenate([honest, rows]))
    return float(jnp.sum(jnp.square(out - jnp.mean(honest, axis=0))))


@pytest.mark.parametrize("name,fixed", [
    ("alie_adaptive", lambda g, f, s: attacks.alie(g, f=f, z=s)),
    ("ipm_adaptive", lambda g, f, s: attacks.ipm(g, f=f, epsilon=s)),
])
@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_adaptive_beats_every_grid_scale(name, fixed, aggregator):
    f = 3
    agg = {"median": agg_median, "trimmed_mean": functools.partial(agg_trimmed_mean, f=f)}
    agg = agg[aggregator]
    honest = make_tree(9, seed=1, offset=0.3)["b"]
    scales = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
    attack = jax.jit(functools.partial(attacks.get(name), f=f, aggregator=agg, scales=scales))
    best = distance_to_mean(agg, honest, attack(honest))
    for s in scales:
        assert best >= distance_to_mean(agg, honest, fixed(honest, f, s)) * (1 - 1e-5)


def test_adaptive_grid_only_returns_a_grid_scale():
    honest = make_tree(6, seed=2)["w"]
    out = attacks.ipm_adaptive(honest, f=2, aggregator=agg_mean, scales=(0.5, 3.0),
                               refine_steps=0, max_scale=3.0)
    np.testing.assert_allclose(np.asarray(out[0]), -3.0 * np.asarray(honest).mean(0),
                               rtol=1e-5)
    found = attacks.ipm_adaptive_search(honest, f=2, aggregator=agg_mean, scales=(0.5, 3.0),
                                        refine_steps=0, max_scale=3.0)
    assert float(found.scale) == 3.0 and bool(found.at_end)  # the grid's top was the best


ADAPTIVE = [
    ("alie_adaptive", attacks.alie_adaptive_search, lambda g, f, s: attacks.alie(g, f=f, z=s)),
    ("ipm_adaptive", attacks.ipm_adaptive_search, lambda g, f, s: attacks.ipm(g, f=f, epsilon=s)),
]


@pytest.mark.parametrize("name,search,fixed", ADAPTIVE)
def test_adaptive_against_the_mean_runs_to_the_cap(name, search, fixed):
    """The mean has no worst case: the search extends to max_scale and says it hit the end
    (ByzFL's optimal attacks reach 1e7 here; the old grid stopped at 100)."""
    f = 3
    honest = make_tree(9, seed=1, offset=0.3)
    found = jax.jit(functools.partial(search, f=f, aggregator=aggregators.mean))(honest)
    assert float(found.scale) >= 1e7
    assert float(found.scale) == pytest.approx(attacks.MAX_SCALE, rel=1e-6)
    assert bool(found.at_end)
    rows = attacks.get(name)(honest, f=f, aggregator=aggregators.mean)
    chex.assert_trees_all_close(rows, fixed(honest, f, found.scale), rtol=1e-5)
    small = distance_to_mean(agg_mean, honest["b"], fixed(honest, f, 100.0)["b"])
    assert distance_to_mean(agg_mean, honest["b"], rows["b"]) > 1e6 * small


@pytest.mark.parametrize("name,search,fixed", ADAPTIVE)
@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_adaptive_against_robust_rules_stops_inside_the_range(name, search, fixed, aggregator):
    f = 3
    agg = {"median": agg_median, "trimmed_mean": functools.partial(agg_trimmed_mean, f=f)}
    agg = agg[aggregator]
    honest = make_tree(9, seed=1, offset=0.3)["b"]
    found = jax.jit(functools.partial(search, f=f, aggregator=agg))(honest)
    assert not bool(found.at_end)
    assert float(found.scale) < 1e4  # the defence's output stopped moving long before the cap
    value = distance_to_mean(agg, honest, fixed(honest, f, found.scale))
    assert float(found.value) == pytest.approx(value, rel=1e-4)
    for s in np.geomspace(1e-2, 1e6, 49):  # no scale of the whole range does better
        assert value >= distance_to_mean(agg, honest, fixed(honest, f, float(s))) * (1 - 1e-5)


def test_search_scale_extends_refines_and_reports_the_end():
    found = attacks.search_scale(lambda s: -jnp.square(jnp.log(s) - jnp.log(3e5)))
    assert float(found.scale) == pytest.approx(3e5, rel=1e-3) and not bool(found.at_end)
    capped = attacks.search_scale(jnp.sqrt, (1.0, 2.0), max_scale=1e4)
    assert float(capped.scale) == pytest.approx(1e4) and bool(capped.at_end)
    # A plateau stops the extension: the smallest scale that reaches it is kept.
    flat = attacks.search_scale(lambda s: jnp.minimum(s, 500.0), refine_steps=0)
    assert 500.0 <= float(flat.scale) < 800.0 and not bool(flat.at_end)
    # The range ends where the objective stops being finite; growing up to there is the end.
    broken = attacks.search_scale(lambda s: jnp.where(s < 1e5, s, jnp.nan), refine_steps=0)
    assert 1e4 < float(broken.scale) < 1e5 and bool(broken.at_end)
    assert np.isfinite(float(broken.value))
    never = attacks.search_scale(lambda s: jnp.nan * s)
    assert float(never.value) == -np.inf and not bool(never.at_end)


def test_search_scale_traces_once_and_matches_eager():
    traces = []

    @jax.jit
    def run(c):
        traces.append(1)
        return attacks.search_scale(lambda s: -jnp.square(s - c))

    for c in (0.3, 30.0, 3e6):
        found = run(jnp.float32(c))
        assert float(found.scale) == pytest.approx(c, rel=1e-3)
    assert len(traces) == 1
    eager = attacks.search_scale(lambda s: -jnp.square(s - 30.0))
    chex.assert_trees_all_close(eager, run(jnp.float32(30.0)))


# ------------------------------------------------------------------------------------------
# inject.


@pytest.mark.parametrize("positions,expected", [
    ("first", [0, 1]), ("last", [4, 5]), ((1, 3), [1, 3]), (np.array([5, 0]), [0, 5])])
@pytest.mark.parametrize("omniscient", [True, False])
def test_inject_positions_and_knowledge(positions, expected, omniscient):
    honest = make_tree(6, seed=4)
    out, mask = attacks.inject(honest, "sign_flip", f=2, positions=positions,
                               omniscient=omniscient)
    assert np.flatnonzero(np.asarray(mask)).tolist() == expected
    known = expected if not omniscient else sorted(set(range(6)) - set(expected))
    for k, x in np_tree(honest).items():
        got = np.asarray(out[k], np.float64)
        np.testing.assert_allclose(got[expected], np.stack([-x[known].mean(0)] * 2), rtol=1e-5,
                                   atol=1e-6)
        keep = ~np.asarray(mask)
        np.testing.assert_array_equal(got[keep], x[keep])


def test_inject_random_positions_redrawn_per_key_without_recompiling():
    traces = []

    @jax.jit
    def step(honest, key):
        traces.append(1)
        return attacks.inject(honest, attacks.gaussian, f=3, key=key, positions="random")

    honest = make_tree(10, seed=5)
    masks = [np.asarray(step(honest, jax.random.key(s)).byzantine) for s in range(6)]
    assert len(traces) == 1
    assert all(m.sum() == 3 for m in masks)
    assert len({m.tobytes() for m in masks}) > 1
    same = step(honest, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(same.byzantine), masks[0])
    assert len(traces) == 1


@settings(max_examples=10)
@given(st.integers(0, 7), st.integers(0, 10_000))
def test_inject_property_honest_rows_untouched(f, seed):
    honest = jnp.asarray(np.random.default_rng(seed).normal(size=(8, 3)), jnp.float32)
    out, mask = _inject_jit(honest, jax.random.key(seed), f)
    mask = np.asarray(mask)
    assert mask.sum() == f
    np.testing.assert_array_equal(np.asarray(out)[~mask], np.asarray(honest)[~mask])
    assert np.all(np.asarray(out)[mask] == -100.0)


@functools.partial(jax.jit, static_argnums=2)
def _inject_jit(honest, key, f):
    return attacks.inject(honest, attacks.constant, f=f, key=key)


# ------------------------------------------------------------------------------------------
# Attacks against defences (n = 25, f = 5).

N, F = 25, 5
DEFENCES = {
    "median": agg_median,
    "trimmed_mean": functools.partial(agg_trimmed_mean, f=F),
    "krum": functools.partial(agg_krum, f=F),
}


def attacked(name, **kwargs):
    honest = jnp.asarray(np.random.default_rng(9).normal(1.0, 1.0, (N, 20)), jnp.float32)
    out, mask = attacks.inject(honest, name, f=F, key=3, positions="random", **kwargs)
    good = np.asarray(honest)[~np.asarray(mask)]
    return out, good, np.asarray(out)[np.asarray(mask)]


@pytest.mark.parametrize("name,kwargs", [
    ("sign_flip", {}), ("reverse", {"scale": 1000.0}), ("non_finite", {}),
    ("non_finite", {"value": -float("inf")}), ("constant", {}), ("gaussian", {}),
    ("min_max", {}), ("bit_flip", {"bits": 2, "bit_range": "exponent", "per": "value"}),
])
def test_robust_rules_stay_in_the_honest_range(name, kwargs):
    out, good, _ = attacked(name, **kwargs)
    moved = np.asarray(agg_mean(out), np.float64)
    assert not np.all(np.isfinite(moved)) or np.abs(moved - good.mean(0)).max() > 0.05
    for rule in DEFENCES.values():
        value = np.asarray(rule(out))
        assert np.all(value >= good.min(0)) and np.all(value <= good.max(0))


def test_alie_moves_median_and_krum():
    out, good, _ = attacked("alie")
    for rule in (DEFENCES["median"], DEFENCES["krum"]):
        shift = np.asarray(rule(out)) - good.mean(0)
        assert np.mean(shift) < -0.05  # the default shift is mu - z * sigma


def test_ipm_reverses_the_honest_mean():
    _, good, rows = attacked("ipm", epsilon=0.1)
    assert np.all(rows @ good.mean(0) < 0)
    out, good, _ = attacked("ipm", epsilon=100.0)
    assert np.dot(np.asarray(agg_mean(out)), good.mean(0)) < 0


# ------------------------------------------------------------------------------------------
# Registry and bad input.


def test_registry():
    expected = {"alie", "alie_adaptive", "bit_flip", "byzmean", "constant", "fang_krum",
                "fang_trimmed_mean", "fang_trimmed_mean_partial", "gaussian", "ipm",
                "ipm_adaptive", "mimic", "min_max", "min_sum", "non_finite", "reverse", "rop",
                "sign_directional", "sign_flip", "sign_random", "sign_reverse"}
    assert set(attacks.names()) == expected
    assert attacks.get("alie") is attacks.alie
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attacks.get("nope")


def test_issue_examples():
    g = make_tree(10, seed=6)
    out, mask = attacks.inject(g, "alie", f=2, key=0)  # n comes from the stack
    assert np.flatnonzero(np.asarray(mask)).tolist() == [8, 9]
    honest = {k: v[:8] for k, v in g.items()}
    chex.assert_trees_all_close({k: v[8:] for k, v in out.items()},
                                attacks.alie(honest, f=2, n=10), rtol=1e-6)
    with pytest.raises(ValueError, match=r"'zz'; it accepts f, z, variant, ddof, sign"):
        attacks.inject(g, "alie", f=2, zz=1.0)
    with pytest.raises(ValueError, match=r"inject: gaussian is a random attack and needs a key"):
        attacks.inject(g, "gaussian", f=2)
    with pytest.raises(ValueError, match=r"'n' is supplied by rbyz"):
        attacks.inject(g, "alie", f=2, n=10)


def test_label_flip_is_public_but_not_a_model_attack():
    assert "label_flip" not in attacks.names()
    with pytest.raises(ValueError, match="unknown attack 'label_flip'"):
        attacks.get("label_flip")


def test_attack_rows_takes_every_form_of_attack():
    known = make_tree(5, seed=7)
    expected = attacks.reverse(known, f=2, scale=3.0)
    forms = [("reverse", {"scale": 3.0}), (attacks.reverse, {"scale": 3.0}),
             (functools.partial(attacks.reverse, scale=3.0), {}),
             (functools.partial(attacks.reverse, scale=1.0), {"scale": 3.0}),
             (lambda x, *, f, scale: attacks.reverse(x, f=f, scale=scale), {"scale": 3.0})]
    for attack, hparams in forms:
        rows = attacks.attack_rows(attack, known, f=2, n=7, hparams=hparams)
        chex.assert_trees_all_equal(rows, expected)


def test_user_declared_attack():
    @attacks.declare(key=True, cost="O(f d)")
    def noise(honest, *, f, key=None, std: float = 1.0):
        return jax.tree.map(
            lambda x: std * jax.random.normal(key, (f,) + x.shape[1:], x.dtype), honest)

    assert "noise" not in attacks.names()
    known = make_tree(3)
    rows = attacks.attack_rows(noise, known, f=2, n=5, key=jax.random.key(1))
    again = attacks.inject({k: jnp.concatenate([v, v[:2]]) for k, v in known.items()}, noise,
                           f=2, key=4, std=2.0)
    assert rows["w"].shape == (2, 3, 4) and again.updates["b"].shape == (5, 5)
    with pytest.raises(ValueError, match="noise is a random attack and needs a key"):
        attacks.attack_rows(noise, known, f=2, n=5)
    with pytest.raises(ValueError, match=r"noise has no hyperparameter 'sd'; it accepts f, std"):
        attacks.attack_rows(noise, known, f=2, n=5, key=0, hparams={"sd": 1.0})


@pytest.mark.parametrize("positions,expected", [
    ("last", [3, 4]), ("first", [0, 1]), ((4, 1), [4, 1]), (np.array([0, 2]), [0, 2])])
def test_byzantine_positions(positions, expected):
    index = attacks.byzantine_positions(5, 2, positions)
    assert isinstance(index, np.ndarray) and index.dtype == np.int32
    assert index.tolist() == expected


def test_byzantine_positions_random():
    draws = [attacks.byzantine_positions(10, 3, "random", key=k).tolist() for k in range(8)]
    assert all(len(set(d)) == 3 and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert draws[0] == attacks.byzantine_positions(10, 3, "random", key=0).tolist()
    assert attacks.byzantine_positions(10, 0, "random", key=0).shape == (0,)


BAD = [
    (lambda: attacks.inject(make_tree(4), "constant", f=4, key=0), "inject: needs f < n"),
    (lambda: attacks.inject(make_tree(4), "constant", f=1, positions="random"),
     "positions='random' needs a key"),
    (lambda: attacks.inject(make_tree(4), "constant", f=2, positions=(1, 1)), "distinct"),
    (lambda: attacks.inject(make_tree(4), "constant", f=2, positions=(0,)), "2 integer"),
    (lambda: attacks.inject(make_tree(4), "constant", f=2, positions="middle"), "positions"),
    (lambda: attacks.inject(make_tree(4), "constant", f=2, positions=(0, 4)), r"\[0, 4\)"),
    (lambda: attacks.inject(make_tree(4), "constnt", f=1), "unknown attack 'constnt'"),
    (lambda: attacks.inject(make_tree(4), "alie_adaptive", f=1),
     "inject: alie_adaptive needs aggregator=..."),
    (lambda: attacks.inject(make_tree(4), functools.partial(attacks.ipm, f=2), f=1),
     "ipm was given f=2, but 1 workers are Byzantine"),
    (lambda: attacks.inject(make_tree(4), lambda x, *, f: jax.tree.map(lambda v: v[:1], x), f=2),
     r"must return \[f, ...\] rows"),
    (lambda: attacks.inject(make_tree(4), lambda x, *, f: x["w"][:f], f=2), "structure"),
    (lambda: attacks.attack_rows("ipm", make_tree(4), f=1, n=1), "inject: needs f < n"),
    (lambda: attacks.byzantine_positions(5, 1, "random"), "needs a key"),
    (lambda: attacks.alie(make_tree(4), f=2), "alie: needs n"),
    (lambda: attacks.alie(make_tree(4), f=5, n=5), "alie: needs f < n"),
    (lambda: attacks.alie(make_tree(1), f=1, z=1.0, ddof=1), "more known honest rows"),
    (lambda: attacks.alie(make_tree(4), f=1, z=1.0, sign=2), "sign must be"),
    (lambda: attacks.alie(make_tree(4), f=1, n=4, variant="v3"), "alie: variant"),
    (lambda: attacks.alie_z(10, 6), "alie_z: needs f < floor"),
    (lambda: attacks.alie_z(10, 2, variant="v3"), "variant"),
    (lambda: attacks.alie_adaptive(make_tree(4), f=1, aggregator=None),
     "alie_adaptive: needs the aggregator"),
    (lambda: attacks.ipm_adaptive(make_tree(4), f=1, aggregator=None),
     "ipm_adaptive: needs the aggregator"),
    (lambda: attacks.ipm_adaptive(make_tree(4), f=1, aggregator=agg_mean, scales=(2.0, 1.0)),
     "increasing"),
    (lambda: attacks.ipm_adaptive(make_tree(4), f=1, aggregator=agg_mean, max_scale=10.0),
     "max_scale >="),
    (lambda: attacks.ipm(make_tree(4), f=-1), "f must be >= 0"),
    (lambda: attacks.ipm(make_tree(4), f=1.5), "f must be a Python int"),
    (lambda: attacks.gaussian(make_tree(4), f=1), "gaussian: needs a random key"),
    (lambda: attacks.sign_random(make_tree(4), f=1), "sign_random: needs a random key"),
    (lambda: attacks.bit_flip(make_tree(4), f=1), "bit_flip: needs a random key"),
    (lambda: attacks.min_max(make_tree(4), f=1, direction="up"), "min_max: direction"),
    (lambda: attacks.bit_flip(make_tree(4), f=1, key=0, bit_range=(3, 40)), "bit_range"),
    (lambda: attacks.bit_flip(make_tree(4), f=1, key=0, bits=9, per="value",
                              bit_range="exponent"), "bits <="),
    (lambda: attacks.bit_flip({"i": jnp.zeros((2, 2), jnp.int32)}, f=1, key=0), "floating"),
    (lambda: attacks.non_finite(make_tree(4), f=1, value=1.0), "non_finite: value"),
    (lambda: attacks.sign_directional(make_tree(4), f=1, direction=0), "direction must"),
    (lambda: attacks.mimic(make_tree(4), f=1, target=4), "mimic: needs target < h"),
    (lambda: attacks.ipm({"a": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}, f=1), "disagree"),
    (lambda: attacks.label_flip(jnp.array([0.5])), "integer labels"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
