"""Weighted robust aggregation (per-worker ``weights=``) and Phocas.

Every weighted rule against a plain float64 NumPy reference written here (loops, ``np.sort``,
cumulative sums), on random weights; equal weights against the unweighted rule; integer weights
against the unweighted rule on rows repeated that many times (where that identity holds);
hostile rows under trusted weights; the behaviour of traced invalid weights; bad-input errors;
and how the declaration exposes the capability.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rbyz import aggregators as agg
from rbyz._src import spec as _spec

from references import float64, ref_krum_scores, ref_phocas, ref_trimmed_mean

WEIGHTED = ("centered_clipping", "geometric_median", "krum", "mean", "median", "multi_krum",
            "trimmed_mean")
HOSTILE = (np.nan, np.inf, -np.inf, 1e30, -1e30)


# ------------------------------------------------------------------------------------------------
# Helpers.


@functools.cache
def jitted(name: str, **hparams):
    return jax.jit(functools.partial(agg.get(name), **hparams))


def run(name, updates, weights=None, **hparams):
    return jitted(name, **hparams)(updates, weights=weights)


def make_updates(rng, n: int, layout: str, dtype=jnp.float32):
    shapes = ({"w": (n, 3, 2), "b": (n, 4)} if layout == "tree"
              else {"x": (n, int(layout.split("=")[1]))})
    return {k: jnp.asarray(rng.normal(0.5, 1.0, s), dtype) for k, s in shapes.items()}


def ravel(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16
                                      else leaf, np.float64).reshape(leaf.shape[0], -1)
                           for leaf in leaves], axis=1)


def ravel_row(tree) -> np.ndarray:
    return ravel(jax.tree.map(lambda leaf: leaf[None], tree))[0]


def unravel(x, like):
    leaves, treedef = jax.tree.flatten(like)
    sizes = np.cumsum([0] + [int(np.prod(leaf.shape[1:])) for leaf in leaves])
    parts = [jnp.asarray(x[:, a:b], leaf.dtype).reshape((x.shape[0],) + leaf.shape[1:])
             for a, b, leaf in zip(sizes[:-1], sizes[1:], leaves)]
    return jax.tree.unflatten(treedef, parts)


def random_weights(rng, n):
    w = rng.uniform(0.1, 3.0, n)
    w[rng.integers(n)] = 0.0  # a client with no data this round
    return w.astype(np.float32)


def check_dtypes(out, updates):
    for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(updates)):
        assert got.shape == leaf.shape[1:] and got.dtype == leaf.dtype


# ------------------------------------------------------------------------------------------------
# Plain float64 references of the weighted rules.


def sortable(col):
    return np.where(np.isnan(col), np.inf, col)


def ref_wmean(x, w):
    return (w[:, None] * x).sum(axis=0) / w.sum()


def ref_wmedian(x, w, even="midpoint"):
    """Lower: the first sorted value whose cumulative weight reaches half the total; upper: the
    last one whose weight from it upwards does."""
    out = np.empty(x.shape[1])
    total = w.sum()
    for k in range(x.shape[1]):
        col = sortable(x[:, k])
        order = np.argsort(col, kind="stable")
        s, ws = col[order], w[order]
        cum = np.cumsum(ws)
        lower = s[np.flatnonzero(cum >= total / 2)[0]]
        from_top = np.cumsum(ws[::-1])[::-1]
        upper = s[np.flatnonzero(from_top >= total / 2)[-1]]
        out[k] = {"lower": lower, "upper": upper}.get(even, (lower + upper) / 2)
        if lower == upper:
            out[k] = lower
    return out


def ref_wtrimmed_mean(x, w, f):
    """Each sorted value occupies the weight interval [C_{r-1}, C_r]; it keeps the length of the
    intersection of that interval with [T, W - T], T = f/n W."""
    n = len(x)
    total = w.sum()
    trim = total * f / n
    out = np.empty(x.shape[1])
    for k in range(x.shape[1]):
        col = sortable(x[:, k])
        order = np.argsort(col, kind="stable")
        start = 0.0
        num = den = 0.0
        for i in order:
            end = start + w[i]
            kept = max(0.0, min(end, total - trim) - max(start, trim))
            if kept > 1e-9 * total:
                num += kept * col[i]
                den += kept
            start = end
        out[k] = num / den
    return out


def ref_wgeometric_median(x, w, iterations=4, nu=1e-5, init="median"):
    finite = np.all(np.isfinite(x), axis=1)
    alpha = np.where(finite, w, 0.0)
    if init == "median":
        v = ref_wmedian(x, w)
    elif init == "mean":
        v = ref_wmean(x[finite], alpha[finite])
    else:
        v = np.zeros(x.shape[1])
    for _ in range(iterations):
        beta = np.zeros(len(x))
        for i in range(len(x)):
            if alpha[i] > 0:
                beta[i] = alpha[i] / max(nu, np.linalg.norm(v - x[i]))
        v = ref_wmean(x[beta > 0], beta[beta > 0])
    return v


def ref_wcentered_clipping(x, w, tau=100.0, iterations=1, center=None):
    v = np.zeros(x.shape[1]) if center is None else center
    for _ in range(iterations):
        step = np.zeros_like(v)
        for i in range(len(x)):
            if not np.all(np.isfinite(x[i])):
                continue
            diff = x[i] - v
            norm = np.linalg.norm(diff)
            step += w[i] * diff * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / w.sum()
    return v


def ref_wmulti_krum(x, w, f):
    n = len(x)
    keys = ref_krum_scores(x, n - f - 2)
    chosen = sorted(keys, key=keys.get)[: n - f]
    return ref_wmean(x[chosen], w[chosen])


def ref_krum_row(x, f):
    keys = ref_krum_scores(x, len(x) - f - 2)
    return x[min(keys, key=keys.get)]


# (rule, hparams, reference(x, w, f), (n, f) settings)
CASES = [
    ("mean", {}, lambda x, w, f: ref_wmean(x, w), [(4, 0), (7, 2)]),
    ("median", {}, lambda x, w, f: ref_wmedian(x, w), [(7, 3), (6, 2)]),
    ("median", {"even": "lower"}, lambda x, w, f: ref_wmedian(x, w, "lower"), [(6, 2)]),
    ("median", {"even": "upper"}, lambda x, w, f: ref_wmedian(x, w, "upper"), [(6, 2)]),
    ("trimmed_mean", {}, ref_wtrimmed_mean, [(10, 3), (5, 0), (7, 2)]),
    ("geometric_median", {"iterations": 6}, lambda x, w, f: ref_wgeometric_median(x, w, 6),
     [(7, 3)]),
    ("geometric_median", {"init": "mean", "iterations": 5},
     lambda x, w, f: ref_wgeometric_median(x, w, 5, init="mean"), [(6, 2)]),
    ("centered_clipping", {"tau": 1.5, "iterations": 3},
     lambda x, w, f: ref_wcentered_clipping(x, w, 1.5, 3), [(7, 3)]),
    ("multi_krum", {}, ref_wmulti_krum, [(9, 3), (7, 1)]),
    ("krum", {}, lambda x, w, f: ref_krum_row(x, f), [(7, 2)]),
]
PARAMS = [(name, hp, ref, n, f, layout) for name, hp, ref, nfs in CASES for n, f in nfs
          for layout in (("tree", "d=5") if name in ("median", "trimmed_mean") else ("tree",))]


@pytest.mark.parametrize("name, hparams, reference, n, f, layout", PARAMS,
                         ids=[f"{p[0]}-{p[1]}-n{p[3]}f{p[4]}-{p[5]}" for p in PARAMS])
def test_weighted_rule_matches_reference(name, hparams, reference, n, f, layout):
    rng = np.random.default_rng(n * 31 + f)
    updates = make_updates(rng, n, layout)
    w = random_weights(rng, n)
    out = run(name, updates, jnp.asarray(w), f=f, **hparams)
    check_dtypes(out, updates)
    np.testing.assert_allclose(ravel_row(out), reference(ravel(updates), w.astype(np.float64), f),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name, hparams, reference", [
    ("median", {}, lambda x, w, f: ref_wmedian(x, w)),
    ("trimmed_mean", {}, ref_wtrimmed_mean),
    ("geometric_median", {}, lambda x, w, f: ref_wgeometric_median(x, w)),
    ("multi_krum", {}, ref_wmulti_krum),
])
def test_float64_weights_stay_float64(name, hparams, reference):
    rng = np.random.default_rng(3)
    with float64():
        updates = make_updates(rng, 9, "tree", jnp.float64)
        w = rng.uniform(0.1, 3.0, 9)
        out = jax.jit(functools.partial(agg.get(name), f=2, **hparams))(updates,
                                                                       weights=jnp.asarray(w))
        check_dtypes(out, updates)
        np.testing.assert_allclose(ravel_row(out), reference(ravel(updates), w, 2), rtol=1e-12,
                                   atol=1e-12)


def test_large_worker_count_uses_the_sort_path():
    """n > 64: the weighted order statistics sort with lax.sort instead of a network."""
    rng = np.random.default_rng(5)
    updates = make_updates(rng, 70, "d=3")
    w = random_weights(rng, 70)
    x, w64 = ravel(updates), w.astype(np.float64)
    np.testing.assert_allclose(ravel_row(run("median", updates, w, f=10)), ref_wmedian(x, w64),
                               rtol=1e-6)
    np.testing.assert_allclose(ravel_row(run("trimmed_mean", updates, w, f=10)),
                               ref_wtrimmed_mean(x, w64, 10), rtol=1e-5, atol=1e-6)


def test_bfloat16_is_accumulated_in_float32():
    rng = np.random.default_rng(6)
    updates = make_updates(rng, 7, "tree", jnp.bfloat16)
    w = random_weights(rng, 7)
    for name, reference in (("median", lambda x: ref_wmedian(x, w)),
                            ("trimmed_mean", lambda x: ref_wtrimmed_mean(x, w, 2)),
                            ("mean", lambda x: ref_wmean(x, w))):
        out = run(name, updates, w, f=2)
        check_dtypes(out, updates)
        np.testing.assert_allclose(ravel_row(out), reference(ravel(updates)), rtol=2e-2,
                                   atol=2e-2)


# ------------------------------------------------------------------------------------------------
# Identities: equal weights, integer weights as repeated rows.

UNWEIGHTED_SETTINGS = [
    ("mean", {}), ("median", {}), ("median", {"even": "lower"}), ("median", {"even": "upper"}),
    ("trimmed_mean", {}), ("geometric_median", {}), ("geometric_median", {"init": "zero"}),
    ("centered_clipping", {"tau": 1.0, "iterations": 2}), ("krum", {}), ("multi_krum", {}),
]


@pytest.mark.parametrize("name, hparams", UNWEIGHTED_SETTINGS,
                         ids=[f"{n}-{h}" for n, h in UNWEIGHTED_SETTINGS])
def test_equal_weights_give_the_unweighted_rule(name, hparams):
    rng = np.random.default_rng(11)
    n, f = (8, 2) if name == "median" else (7, 2)  # an even count: the exact-half convention
    updates = make_updates(rng, n, "tree")
    # Two rows at 1e30: equal weights must trim them exactly, with no sliver of weight left.
    x = ravel(updates)
    x[[1, 4]] = 1e30
    updates = unravel(x, updates)
    want = ravel_row(run(name, updates, f=f, **hparams))
    for scale in (1.0, 0.1, 7.3):
        got = ravel_row(run(name, updates, jnp.full((n,), scale, jnp.float32), f=f, **hparams))
        if name in ("median", "krum"):  # selections: the same value, to the bit
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_none_is_the_unweighted_rule():
    rng = np.random.default_rng(12)
    updates = make_updates(rng, 7, "tree")
    for name in WEIGHTED:
        direct = jax.jit(functools.partial(agg.get(name), f=2))(updates)
        np.testing.assert_array_equal(ravel_row(run(name, updates, None, f=2)), ravel_row(direct))


REPEATED = [("mean", {}, 1), ("median", {}, 1), ("median", {"even": "lower"}, 1),
            ("median", {"even": "upper"}, 1), ("trimmed_mean", {}, 1),
            ("geometric_median", {"iterations": 5}, 1),
            ("centered_clipping", {"tau": 0.8, "iterations": 2}, 1)]


@pytest.mark.parametrize("name, hparams, f", REPEATED, ids=[f"{n}-{h}" for n, h, _ in REPEATED])
def test_integer_weights_are_repeated_rows(name, hparams, f):
    """Integer weights c_i = the unweighted rule on row i repeated c_i times. For the trimmed
    mean the trim must match: f/n of the weight is f * sum(c) / n rows (here 1/5 of 10 = 2).
    (Krum and Multi-Krum have no such identity: duplicated rows are each other's nearest
    neighbours, so repetition changes the scores and the selection.)"""
    rng = np.random.default_rng(13)
    counts = np.array([1, 3, 2, 0, 4])
    updates = make_updates(rng, 5, "tree")
    repeated = jax.tree.map(lambda leaf: jnp.repeat(leaf, counts, axis=0), updates)
    got = run(name, updates, jnp.asarray(counts, jnp.float32), f=f, **hparams)
    f_repeated = f * int(counts.sum()) // 5 if name == "trimmed_mean" else 0
    want = run(name, repeated, f=f_repeated, **hparams)
    np.testing.assert_allclose(ravel_row(got), ravel_row(want), rtol=1e-5, atol=1e-6)


def test_weighted_trimmed_mean_partial_boundary_weight():
    """n = 4, f = 1, weights 1, 1, 1, 3: T = 1.5 per side; the lowest value and half of the
    second go, the top value keeps 1.5 of its 3."""
    x = jnp.array([[0.0], [1.0], [2.0], [3.0]])
    out = agg.trimmed_mean(x, f=1, weights=jnp.array([1.0, 1.0, 1.0, 3.0]))
    np.testing.assert_allclose(out, [(0.5 * 1 + 2 + 1.5 * 3) / 3.0], rtol=1e-6)
    np.testing.assert_allclose(
        ref_trimmed_mean(np.array([[0.0], [1.0], [2.0], [3.0]]), 1),
        ref_wtrimmed_mean(np.array([[0.0], [1.0], [2.0], [3.0]]), np.ones(4), 1))


# ------------------------------------------------------------------------------------------------
# Hostile rows with trusted weights.


@pytest.mark.parametrize("value", HOSTILE, ids=str)
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "geometric_median", "krum",
                                  "multi_krum", "centered_clipping"])
def test_hostile_rows_with_trusted_weights_stay_out(name, value):
    """f hostile rows whose weights are no larger than any honest one (so they hold at most
    f/n of the weight) never reach the output."""
    n, f = 9, 3
    rng = np.random.default_rng(17)
    updates = make_updates(rng, n, "tree")
    x = ravel(updates)
    bad = np.array([0, 4, 7])
    w = rng.uniform(1.0, 3.0, n).astype(np.float32)
    w[bad] = 1.0
    x[bad] = value
    x[7, 1:] = x[8, 1:]  # one hostile row with a single bad coordinate
    honest = np.delete(x, bad, axis=0)
    out = ravel_row(run(name, unravel(x, updates), w, f=f))
    assert np.all(np.isfinite(out))
    if name in ("median", "trimmed_mean"):  # coordinate-wise: inside the honest range
        assert np.all(out >= honest.min(axis=0) - 1e-6)
        assert np.all(out <= honest.max(axis=0) + 1e-6)
    else:
        assert np.abs(out).max() <= 10 * np.abs(honest).max()


def test_weight_of_a_non_finite_row_is_ignored():
    """Mean, median and trimmed mean leave a row of weight 0 out exactly, even NaN."""
    x = jnp.array([[1.0], [2.0], [jnp.nan], [4.0], [5.0]])
    w = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0])
    assert float(agg.mean(x, weights=w)[0]) == 3.0
    assert float(agg.median(x, f=1, weights=w)[0]) == 3.0
    # trims 0.8 of the weight per side: (0.2 * 1 + 2 + 4 + 0.2 * 5) / 2.4, rounded in float32
    assert float(agg.trimmed_mean(x, f=1, weights=w)[0]) == pytest.approx(3.0, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Invalid weights: concrete ones raise, traced ones are made safe.

BAD_WEIGHTS = [
    (np.array([1.0, -1.0, 1.0, 1.0, 1.0]), r"weights must be finite and >= 0; got \[-1.0\]"),
    (np.array([1.0, np.nan, 1.0, 1.0, 1.0]), r"weights must be finite and >= 0"),
    (np.array([1.0, np.inf, 1.0, 1.0, 1.0]), r"weights must be finite and >= 0"),
    (np.zeros(5), r"weights are all zero"),
    (np.ones(4), r"weights must have shape \(n,\) = \(5,\), one per worker; got shape \(4,\)"),
    (np.ones((5, 1)), r"weights must have shape \(n,\) = \(5,\)"),
    (np.ones(5, np.complex64), r"weights must be real numbers"),
]


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("weights, message", BAD_WEIGHTS, ids=[m[:30] for _, m in BAD_WEIGHTS])
def test_bad_concrete_weights_raise_naming_the_rule(name, weights, message):
    updates = {"w": jnp.zeros((5, 3))}
    with pytest.raises(ValueError, match=f"{name}: {message}"):
        agg.get(name)(updates, f=1, weights=weights)


def test_bad_traced_shape_raises_at_trace_time():
    with pytest.raises(ValueError, match=r"median: weights must have shape \(n,\) = \(5,\)"):
        jax.jit(lambda x, w: agg.median(x, f=1, weights=w)).lower(jnp.zeros((5, 3)),
                                                                   jnp.ones(6))


@pytest.mark.parametrize("name", WEIGHTED)
def test_traced_invalid_weights_count_as_zero(name):
    """Under jit the values cannot be checked: negative, NaN and Inf weights count as 0."""
    rng = np.random.default_rng(19)
    updates = make_updates(rng, 7, "d=4")
    good = np.array([1.0, 2.0, 0.0, 1.5, 0.0, 0.0, 1.0], np.float32)
    bad = good.copy()
    bad[[2, 4, 5]] = [-3.0, np.nan, np.inf]
    np.testing.assert_array_equal(ravel_row(run(name, updates, bad, f=2)),
                                  ravel_row(run(name, updates, good, f=2)))


@pytest.mark.parametrize("name", sorted(set(WEIGHTED) - {"krum"}))
def test_traced_all_zero_weights_give_nan(name):
    updates = make_updates(np.random.default_rng(20), 7, "d=4")
    out = ravel_row(run(name, updates, jnp.array([0.0, -1.0, 0, 0, 0, 0, 0]), f=2))
    assert np.all(np.isnan(out))


def test_krum_output_does_not_depend_on_weights():
    updates = make_updates(np.random.default_rng(21), 7, "tree")
    base = ravel_row(run("krum", updates, f=2))
    for w in (np.arange(7.0), np.zeros(7), np.full(7, 1e6)):
        np.testing.assert_array_equal(ravel_row(run("krum", updates, w, f=2)), base)


# ------------------------------------------------------------------------------------------------
# The declaration.


def test_declaration_lists_the_weighted_rules():
    assert tuple(s.name for s in agg.specs() if s.weights) == WEIGHTED
    for name in WEIGHTED:
        declared = agg.spec(name)
        assert "weights" not in declared.hparams  # a per-step input, not a hyperparameter
        assert declared.summary()["weights"] == "yes"
    assert agg.spec("meamed").summary()["weights"] == "no"


def test_apply_passes_weights():
    rng = np.random.default_rng(23)
    updates = make_updates(rng, 7, "tree")
    w = jnp.asarray(random_weights(rng, 7))
    for name in ("median", "centered_clipping"):
        declared = agg.spec(name)
        hparams = declared.check_hparams({"f": 2}, "tests")
        state = declared.init(jax.tree.map(lambda leaf: leaf[0], updates))
        out, _ = jax.jit(lambda u, s, w: declared.apply(u, s, None, hparams, weights=w))(
            updates, state, w)
        direct = agg.get(name)(updates, f=2, weights=w,
                               **({"center": state} if declared.state else {}))
        np.testing.assert_allclose(ravel_row(out), ravel_row(direct), rtol=1e-6)


def test_weights_to_a_rule_without_them_raise():
    declared = agg.spec("meamed")
    hparams = declared.check_hparams({"f": 1}, "tests")
    with pytest.raises(ValueError, match=r"apply: meamed takes no per-worker weights; the rules "
                                         r"that accept weights= are centered_clipping, "
                                         r"geometric_median, krum"):
        declared.apply(jnp.zeros((5, 2)), None, None, hparams, weights=jnp.ones(5))
    with pytest.raises(ValueError, match=r"tests: meamed takes no per-worker weights"):
        declared.check_hparams({"f": 1, "weights": np.ones(5)}, "tests")
    with pytest.raises(ValueError, match=r"tests: median's weights are a per-step input"):
        agg.spec("median").check_hparams({"f": 1, "weights": np.ones(5)}, "tests")


def test_declare_weights_needs_the_parameter():
    with pytest.raises(TypeError, match="declares weights=True but has no 'weights'"):
        @_spec.declare("aggregator", register=False, weights=True)
        def no_weights(updates, *, f: int = 0):
            return updates


# ------------------------------------------------------------------------------------------------
# Phocas.

PHOCAS = [(n, f, layout) for n, f in ((5, 1), (7, 3), (10, 2), (11, 4), (6, 0))
          for layout in ("tree", "d=7")]


@pytest.mark.parametrize("n, f, layout", PHOCAS, ids=[f"n{n}f{f}-{l}" for n, f, l in PHOCAS])
def test_phocas_matches_reference(n, f, layout):
    rng = np.random.default_rng(n * 7 + f)
    updates = make_updates(rng, n, layout)
    out = jitted("phocas", f=f)(updates)
    check_dtypes(out, updates)
    np.testing.assert_allclose(ravel_row(out), ref_phocas(ravel(updates), f), rtol=2e-5,
                               atol=2e-5)


def test_phocas_plain_cases():
    # Centre: trimmed mean of 0, 1, 2 = 1; the 4 nearest: 0, 1, 2 and 6.
    x = jnp.array([[0.0], [1.0], [2.0], [6.0], [-1e30]])
    assert float(agg.phocas(x, f=1)[0]) == 2.25
    # f = 0: the centre is the mean and all values are kept.
    y = jnp.array([[1.0, 5.0], [2.0, -1.0], [4.0, 2.0]])
    np.testing.assert_allclose(agg.phocas(y, f=0), agg.mean(y), rtol=1e-6)
    # Differs from MeaMed when the trimmed mean and the median differ.
    # Centre 10/3 (trimmed mean of 2, 3, 5) keeps 2, 3, 5, 6, 0; the median 3 keeps 0, 0, 2, 3, 5.
    z = np.array([[0.0], [0.0], [2.0], [3.0], [5.0], [6.0], [8.0]])
    assert float(agg.phocas(jnp.asarray(z, jnp.float32), f=2)[0]) == pytest.approx(
        ref_phocas(z, 2)[0], rel=1e-6)
    assert ref_phocas(z, 2)[0] == pytest.approx(3.2)
    assert float(agg.meamed(jnp.asarray(z, jnp.float32), f=2)[0]) == pytest.approx(2.0)


@pytest.mark.parametrize("value", HOSTILE, ids=str)
def test_phocas_keeps_hostile_values_out(value):
    rng = np.random.default_rng(29)
    x = rng.normal(size=(9, 6))
    x[[2, 5, 6]] = value
    out = np.asarray(agg.phocas(jnp.asarray(x, jnp.float32), f=3), np.float64)
    honest = np.delete(x, [2, 5, 6], axis=0)
    assert np.all(out >= honest.min(axis=0) - 1e-6) and np.all(out <= honest.max(axis=0) + 1e-6)


def test_phocas_bad_settings():
    with pytest.raises(ValueError, match=r"phocas: needs n > 2f; got n=6, f=3"):
        agg.phocas(jnp.zeros((6, 2)), f=3)
    with pytest.raises(ValueError, match=r"phocas: f must be a Python int"):
        agg.phocas(jnp.zeros((6, 2)), f=1.5)
    with pytest.raises(ValueError, match=r"phocas takes no per-worker weights"):
        agg.spec("phocas").apply(jnp.zeros((5, 2)), None, None, {"f": 1}, weights=jnp.ones(5))
