"""Tests of rbyz.attacks against float64 NumPy references, and the defences they break or not."""

from __future__ import annotations

import functools

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
    assert attacks.alie_z(n, m, variant="v1") == pytest.approx(z1, abs=6e-4)
    assert attacks.alie_z(n, m, variant="v2") == pytest.approx(z2, abs=6e-4)


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
                               refine_steps=0)
    np.testing.assert_allclose(np.asarray(out[0]), -3.0 * np.asarray(honest).mean(0),
                               rtol=1e-5)


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
        return attacks.inject(honest, attacks.gaussian, f=3, key=key)

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
    out, mask = attacks.inject(honest, name, f=F, key=3, **kwargs)
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
    out, good, _ = attacked("alie", n=N)
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
    expected = {"alie", "alie_adaptive", "bit_flip", "constant", "gaussian", "ipm",
                "ipm_adaptive", "mimic", "min_max", "min_sum", "non_finite", "reverse",
                "sign_directional", "sign_flip", "sign_random", "sign_reverse"}
    assert set(attacks.names()) == expected
    assert attacks.get("alie") is attacks.alie
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attacks.get("nope")


@pytest.mark.parametrize("name", sorted(
    {"alie", "bit_flip", "constant", "gaussian", "ipm", "mimic", "min_max", "min_sum",
     "non_finite", "reverse", "sign_directional", "sign_flip", "sign_random", "sign_reverse"}))
def test_f_zero_gives_an_empty_stack(name):
    out = attacks.get(name)(make_tree(4), f=0, key=0, **({"n": 10} if name == "alie" else {}))
    assert all(v.shape[0] == 0 for v in out.values())
    out, mask = attacks.inject(make_tree(4), name, f=0, key=1)
    assert not np.asarray(mask).any()


BAD = [
    (lambda: attacks.inject(make_tree(4), "constant", f=4, key=0), "inject: needs f < n"),
    (lambda: attacks.inject(make_tree(4), "constant", f=1), "needs a key"),
    (lambda: attacks.inject(make_tree(4), "constant", f=2, positions=(1, 1)), "distinct"),
    (lambda: attacks.inject(make_tree(4), "constant", f=2, positions=(0,)), "2 integer"),
    (lambda: attacks.inject(make_tree(4), "constant", f=2, positions="middle"), "positions"),
    (lambda: attacks.alie(make_tree(4), f=2), "alie: needs n"),
    (lambda: attacks.alie(make_tree(4), f=5, n=5), "alie: needs f < n"),
    (lambda: attacks.alie(make_tree(1), f=1, z=1.0, ddof=1), "more known honest rows"),
    (lambda: attacks.alie(make_tree(4), f=1, z=1.0, sign=2), "sign must be"),
    (lambda: attacks.alie_z(10, 6), "alie_z: needs f < floor"),
    (lambda: attacks.alie_z(10, 2, variant="v3"), "variant"),
    (lambda: attacks.alie_adaptive(make_tree(4), f=1), "alie_adaptive: needs the aggregator"),
    (lambda: attacks.ipm_adaptive(make_tree(4), f=1), "ipm_adaptive: needs the aggregator"),
    (lambda: attacks.ipm(make_tree(4), f=-1), "f must be >= 0"),
    (lambda: attacks.ipm(make_tree(4), f=1.5), "f must be a Python int"),
    (lambda: attacks.gaussian(make_tree(4), f=1), "gaussian: needs a random key"),
    (lambda: attacks.sign_random(make_tree(4), f=1), "sign_random: needs a random key"),
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
