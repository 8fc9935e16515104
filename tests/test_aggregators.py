"""Rule-specific tests of rbyz.aggregators: float64 references per variant, promises, bad input."""

from __future__ import annotations

import functools
import itertools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rbyz import aggregators as agg
from rbyz.aggregators import subsets

from references import *  # noqa: F401,F403  (the shared float64 references)

# ------------------------------------------------------------------------------------------------
# Helpers.


@functools.cache
def jitted(name: str, **hparams):
    """One compiled function per rule and static setting, shared by the tests."""
    return jax.jit(functools.partial(agg.get(name), **hparams))


def run(name: str, updates, **hparams):
    return jitted(name, **hparams)(updates)


def make_updates(rng, n: int, layout: str, dtype, scale: float = 1.0):
    """Stacked updates: one leaf ``[n, d]`` ("d=<int>") or a two-leaf pytree ("tree")."""
    if layout == "tree":
        shapes = {"w": (n, 3, 4), "b": (n, 5)}
    else:
        shapes = {"x": (n, int(layout.split("=")[1]))}
    return {
        key: jnp.asarray(rng.normal(0.5, scale, shape), dtype) for key, shape in shapes.items()
    }


def ravel(tree) -> np.ndarray:
    """``[n, D]`` float64 matrix of a stacked pytree, leaves in ``jax.tree.leaves`` order."""
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0]
    return np.concatenate(
        [np.asarray(leaf.astype(jnp.float32), np.float64).reshape(n, -1) for leaf in leaves],
        axis=1,
    )


def ravel_row(tree) -> np.ndarray:
    return np.concatenate(
        [np.asarray(leaf.astype(jnp.float32), np.float64).reshape(-1) for leaf in
         jax.tree.leaves(tree)]
    )


def check_structure_and_dtype(out, updates):
    assert jax.tree.structure(out) == jax.tree.structure(updates)
    for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(updates)):
        assert got.shape == leaf.shape[1:]
        assert got.dtype == leaf.dtype


TOLERANCE = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}

# (rule, hparams, reference, settings of (n, f) it is checked on)
CASES = [
    ("mean", {}, lambda x, f: ref_mean(x), [(4, 0), (7, 2)]),
    ("median", {}, lambda x, f: ref_median(x), [(7, 3), (4, 1), (10, 2)]),
    ("median", {"even": "lower"}, lambda x, f: ref_median(x, "lower"), [(6, 2)]),
    ("median", {"even": "upper"}, lambda x, f: ref_median(x, "upper"), [(6, 2)]),
    ("trimmed_mean", {}, ref_trimmed_mean, [(10, 3), (5, 0), (7, 2)]),
    ("meamed", {}, ref_meamed, [(8, 3), (5, 1), (11, 2)]),
    ("krum", {}, ref_krum, [(9, 3), (5, 1), (12, 2)]),
    ("krum", {"neighbours": 4, "squared": False},
     lambda x, f: ref_krum(x, f, 4, False), [(8, 2)]),
    ("multi_krum", {}, ref_multi_krum, [(9, 3), (5, 1)]),
    ("multi_krum", {"m": 2, "neighbours": 6}, lambda x, f: ref_multi_krum(x, f, 2, 6), [(9, 2)]),
    ("bulyan", {}, ref_bulyan, [(11, 2), (3, 0), (7, 1)]),
    ("bulyan", {"beta": 2}, lambda x, f: ref_bulyan(x, f, 2), [(11, 2)]),
    ("mda", {}, ref_mda, [(7, 2), (5, 1), (10, 3), (4, 0)]),
    ("dnc", {"key": 0}, ref_dnc, [(9, 3), (5, 2), (12, 1)]),
    ("dnc", {"key": 0, "filter_frac": 1.5, "iterations": 2},
     lambda x, f: ref_dnc(x, f, 2, 1.5), [(11, 2)]),
    ("geometric_median", {}, lambda x, f: ref_geometric_median(x), [(9, 4), (5, 1)]),
    ("geometric_median", {"iterations": 8, "nu": 0.1, "init": "zero"},
     lambda x, f: ref_geometric_median(x, 8, 0.1, "zero"), [(6, 2)]),
    ("geometric_median", {"init": "mean"},
     lambda x, f: ref_geometric_median(x, init="mean"), [(6, 2)]),
    ("centered_clipping", {"tau": 1.5}, lambda x, f: ref_centered_clipping(x, tau=1.5),
     [(9, 4), (5, 1)]),
    ("centered_clipping", {"tau": 2.0, "iterations": 3},
     lambda x, f: ref_centered_clipping(x, tau=2.0, iterations=3), [(6, 2)]),
    ("sign_majority", {}, lambda x, f: ref_sign_majority(x), [(5, 2), (6, 0)]),
    ("sign_majority", {"zero_sign": 1}, lambda x, f: ref_sign_majority(x, 1), [(4, 1)]),
]

LAYOUTS = {"f32-d1": (jnp.float32, "d=1"), "f32-tree": (jnp.float32, "tree")}
BF16_LAYOUT = {"bf16-d37": (jnp.bfloat16, "d=37")}  # first setting of each case only: compiles

REFERENCE_PARAMS = [
    pytest.param(
        name, hparams, reference, n, f, dtype, layout,
        id=f"{name}-{'-'.join(map(str, hparams.values()))}-n{n}-f{f}-{layout_id}",
    )
    for name, hparams, reference, settings in CASES
    for index, (n, f) in enumerate(settings)
    for layout_id, (dtype, layout) in {**LAYOUTS, **(BF16_LAYOUT if index == 0 else {})}.items()
]


# ------------------------------------------------------------------------------------------------
# Against the references.


@pytest.mark.parametrize("name, hparams, reference, n, f, dtype, layout", REFERENCE_PARAMS)
def test_matches_numpy_reference(name, hparams, reference, n, f, dtype, layout):
    rng = np.random.default_rng(n * 100 + f)
    updates = make_updates(rng, n, layout, dtype)
    if name == "sign_majority":  # exact zeros exercise the sign(0) convention
        updates = jax.tree.map(lambda x: jnp.where(jnp.abs(x) < 0.3, 0, x).astype(dtype), updates)
    out = run(name, updates, f=f, **hparams)
    check_structure_and_dtype(out, updates)
    expected = reference(ravel(updates), f)
    if dtype == jnp.bfloat16:  # the reference in float64, rounded once to the output dtype
        expected = np.asarray(jnp.asarray(expected, jnp.float32).astype(dtype), np.float64)
    np.testing.assert_allclose(ravel_row(out), expected, **TOLERANCE[dtype])


def test_geometric_median_weights_match_reference():
    rng = np.random.default_rng(0)
    updates = make_updates(rng, 6, "tree", jnp.float32)
    weights = jnp.asarray([1.0, 2.0, 0.5, 3.0, 1.0, 0.0], jnp.float32)
    rule = functools.partial(agg.geometric_median, f=2, init="mean", iterations=6)
    out = jax.jit(rule)(updates, weights=weights)
    expected = ref_geometric_median(ravel(updates), 6, init="mean", weights=np.asarray(weights))
    np.testing.assert_allclose(ravel_row(out), expected, rtol=1e-5, atol=1e-5)


def test_centered_clipping_center_matches_reference():
    rng = np.random.default_rng(1)
    updates = make_updates(rng, 7, "tree", jnp.float32)
    center = jax.tree.map(lambda x: x[0] + 0.25, updates)
    rule = functools.partial(agg.centered_clipping, f=3, tau=0.8, iterations=2)
    out = jax.jit(rule)(updates, center=center)
    expected = ref_centered_clipping(ravel(updates), ravel_row(center), tau=0.8, iterations=2)
    np.testing.assert_allclose(ravel_row(out), expected, rtol=1e-5, atol=1e-5)


def test_krum_scores_beyond_the_honest_neighbours_still_pick_an_honest_row():
    """ALIE's n - f neighbours put one infinite distance in every score: ties must not win."""
    x = np.random.default_rng(2).normal(size=(7, 4)).astype(np.float32)
    x[0] = np.nan
    out = run("krum", {"x": jnp.asarray(x)}, f=1, neighbours=6, squared=False)["x"]
    assert any(np.array_equal(np.asarray(out), row) for row in x[1:])


# ------------------------------------------------------------------------------------------------
# Each rule's own robustness promise (the generic properties, driven by the declarations, are in
# test_aggregator_properties.py).

# rule -> (hparams, n, f), settings also in CASES so that the compiled functions are shared
ROBUST = {
    "median": ({}, 7, 3),
    "trimmed_mean": ({}, 10, 3),
    "meamed": ({}, 8, 3),
    "krum": ({}, 9, 3),
    "multi_krum": ({}, 9, 3),
    "bulyan": ({}, 11, 2),
    "mda": ({}, 9, 3),
    "dnc": ({"key": 0}, 9, 3),
    "geometric_median": ({}, 9, 4),
    "centered_clipping": ({"tau": 1.5}, 9, 4),
}
HOSTILE = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "1e30": 1e30, "-1e30": -1e30}


def honest_and_hostile(seed: int, n: int, f: int, kind: str, dtype, layout: str = "tree"):
    """A pytree whose ``f`` randomly placed rows are hostile, and the honest rows' matrix."""
    rng = np.random.default_rng(seed)
    updates = make_updates(rng, n, layout, jnp.float32)
    x = ravel(updates)
    bad = rng.choice(n, f, replace=False)
    values = list(HOSTILE.values())
    for count, row in enumerate(bad):
        value = values[count % len(values)] if kind == "mixed" else HOSTILE[kind]
        x[row] = value if count % 2 == 0 or kind == "mixed" else -value
        if kind == "mixed" and count % 3 == 2:  # a row with a single bad coordinate
            x[row] = x[(row + 1) % n]
            x[row, count % x.shape[1]] = np.nan
    honest = np.delete(x, bad, axis=0)
    return unravel(x, updates, dtype), honest


def unravel(x, like, dtype):
    leaves, treedef = jax.tree.flatten(like)
    sizes = np.cumsum([0] + [int(np.prod(leaf.shape[1:])) for leaf in leaves])
    parts = [
        jnp.asarray(x[:, a:b].astype(np.float32)).astype(dtype).reshape(leaf.shape)
        for a, b, leaf in zip(sizes[:-1], sizes[1:], leaves)
    ]
    return jax.tree.unflatten(treedef, parts)


@pytest.mark.parametrize("kind", list(HOSTILE) + ["mixed"])
@pytest.mark.parametrize("name", list(ROBUST))
@hypothesis.settings(max_examples=4)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_hostile_rows_stay_inside_the_rules_own_bound(name, kind, seed):
    """Krum returns an honest row; a mean of honest values stays in the honest per-coordinate
    range; MDA, the geometric median and centered clipping stay within the honest diameter."""
    hparams, n, f = ROBUST[name]
    updates, honest = honest_and_hostile(seed, n, f, kind, jnp.float32)
    out = ravel_row(run(name, updates, f=f, **hparams))
    assert np.all(np.isfinite(out))
    low, high = honest.min(axis=0), honest.max(axis=0)
    if name == "krum":
        assert any(np.array_equal(out, row) for row in honest)
    elif name in ("geometric_median", "centered_clipping", "mda"):
        # MDA: the chosen rows are no farther apart than the honest ones, and include one.
        diameter = max(np.linalg.norm(a - b) for a in honest for b in honest)
        assert np.all(out >= low - diameter) and np.all(out <= high + diameter)
    else:  # a mean of honest values per coordinate (or of honest rows: multi-Krum, DnC)
        slack = 1e-6 * (1 + np.abs(honest).max())
        assert np.all(out >= low - slack) and np.all(out <= high + slack)


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("seed", range(3))
def test_bulyan_last_round_without_neighbours_keeps_hostile_rows_out(kind, seed):
    """With f = 1 the last Krum round scores with 0 neighbours: only centrality decides."""
    updates, honest = honest_and_hostile(seed, 7, 1, kind, jnp.float32)
    out = ravel_row(run("bulyan", updates, f=1))
    assert np.all(out >= honest.min(axis=0) - 1e-6) and np.all(out <= honest.max(axis=0) + 1e-6)


def test_mean_propagates_hostile_values():
    updates = {"x": jnp.asarray([[1.0, 2.0], [np.nan, 3.0]], jnp.float32)}
    assert np.isnan(np.asarray(agg.mean(updates, f=1)["x"][0]))


def test_sign_majority_nan_abstains():
    x = jnp.asarray([[np.nan, 1.0], [1.0, -1.0], [np.nan, np.nan]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(agg.sign_majority(x, f=1)), [1.0, 0.0])


def test_registry_round_trip():
    expected = {
        "bulyan", "caf", "centered_clipping", "cge", "clipped_clustering", "dnc", "flame",
        "foolsgold", "gas", "geometric_median", "krum", "lasa", "mda", "meamed", "mean",
        "median", "monna", "multi_krum", "phocas", "sign_majority", "signguard", "smea",
        "trimmed_mean",
    }
    assert set(agg.names()) == expected
    assert list(agg.names()) == sorted(expected)
    for name in agg.names():
        assert agg.get(name).__name__ == name


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="unknown aggregator 'krun'.*krum"):
        agg.get("krun")


# ------------------------------------------------------------------------------------------------
# Bad input.


def _rows(n: int, d: int = 3):
    return np.zeros((n, d), np.float32)


BAD_INPUT = [
    ("mean", _rows(4), {"f": 4}, r"mean: needs 0 <= f < n; got n=4, f=4"),
    ("mean", _rows(4), {"f": -1}, r"mean: f must be >= 0"),
    ("mean", _rows(4), {"f": 1.5}, r"mean: f must be a Python int"),
    ("median", _rows(4), {"f": 2}, r"median: needs n > 2f; got n=4, f=2"),
    ("median", _rows(4), {"f": 1, "even": "mid"}, r"median: unknown even='mid'"),
    ("trimmed_mean", _rows(6), {"f": 3}, r"trimmed_mean: needs n > 2f; got n=6, f=3"),
    ("meamed", _rows(5), {"f": 3}, r"meamed: needs n > 2f; got n=5, f=3"),
    ("krum", _rows(6), {"f": 2}, r"krum: needs n >= 2f \+ 3; got n=6, f=2"),
    ("krum", _rows(7), {"f": 2, "neighbours": 0}, r"krum: needs 1 <= neighbours <= 6"),
    ("krum", _rows(7), {"f": 2, "neighbours": 7}, r"krum: needs 1 <= neighbours <= 6"),
    ("multi_krum", _rows(7), {"f": 2, "m": 0}, r"multi_krum: needs 1 <= m <= 5.*got m=0"),
    ("multi_krum", _rows(7), {"f": 2, "m": 6}, r"multi_krum: needs 1 <= m <= 5.*got m=6"),
    ("bulyan", _rows(10), {"f": 2}, r"bulyan: needs n >= 4f \+ 3; got n=10, f=2"),
    ("bulyan", _rows(11), {"f": 2, "beta": 0}, r"bulyan: needs 1 <= beta <= 3"),
    ("bulyan", _rows(11), {"f": 2, "beta": 4}, r"bulyan: needs 1 <= beta <= 3"),
    ("geometric_median", _rows(4), {"f": 2}, r"geometric_median: needs n > 2f"),
    ("geometric_median", _rows(4), {"iterations": 0}, r"geometric_median: iterations must be >= 1"),
    ("geometric_median", _rows(4), {"nu": 0.0}, r"geometric_median: needs nu > 0"),
    ("geometric_median", _rows(4), {"init": "ones"}, r"geometric_median: unknown init='ones'"),
    ("geometric_median", _rows(4), {"weights": np.ones((3,), np.float32)},
     r"geometric_median: weights must have shape \(n,\) = \(4,\)"),
    ("centered_clipping", _rows(4), {"tau": 0.0}, r"centered_clipping: needs tau > 0"),
    ("centered_clipping", _rows(4), {"tau": -1.0}, r"centered_clipping: needs tau > 0"),
    ("centered_clipping", _rows(4), {"iterations": 0}, r"centered_clipping: iterations must be"),
    ("centered_clipping", _rows(4), {"center": np.zeros((4,), np.float32)},
     r"centered_clipping: center must be shaped like one worker's update"),
    ("centered_clipping", _rows(4), {"f": 2}, r"centered_clipping: needs n > 2f"),
    ("mda", _rows(6), {"f": 3}, r"mda: needs n > 2f; got n=6, f=3"),
    ("mda", _rows(40), {"f": 8}, r"mda: searches all C\(n, f\) subsets; got n=40, f=8: "
                                 r"C\(n, f\) = 76904685 > 250000.*use multi_krum"),
    ("dnc", _rows(6), {"f": 3, "key": 0}, r"dnc: needs n > 2f; got n=6, f=3"),
    ("dnc", _rows(6), {"f": 2, "key": 0, "filter_frac": -1.0}, r"dnc: needs 0 <= floor"),
    ("dnc", _rows(6), {"f": 2, "key": 0, "sub_dim": 0}, r"dnc: sub_dim must be >= 1"),
    ("dnc", _rows(6), {"f": 2, "key": 0, "iterations": 0}, r"dnc: iterations must be >= 1"),
    ("dnc", _rows(6), {"f": 2, "sub_dim": 2}, r"dnc: needs a random key; got key=None"),
    ("dnc", _rows(6), {"f": 2}, r"dnc: needs a random key; got key=None"),  # even if d <= sub_dim
    ("sign_majority", _rows(4), {"zero_sign": -1}, r"sign_majority: unknown zero_sign=-1"),
    ("sign_majority", _rows(4), {"f": 2}, r"sign_majority: needs n > 2f"),
]


@pytest.mark.parametrize(
    "name, updates, hparams, message", BAD_INPUT, ids=[f"{c[0]}-{c[3][:30]}" for c in BAD_INPUT]
)
def test_bad_settings_raise_at_trace_time(name, updates, hparams, message):
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda x: agg.get(name)(x, **hparams)).lower(updates)


# ------------------------------------------------------------------------------------------------
# DnC on random coordinate subsamples (d > sub_dim).


def test_dnc_subsample_takes_the_same_coordinates_of_every_leaf():
    rng = np.random.default_rng(11)
    updates = make_updates(rng, 6, "tree", jnp.float32)  # 12 + 5 coordinates per worker
    key = jax.random.key(3)
    got = np.asarray(subsets._sampled_columns(updates, key, 9))
    picks = np.asarray(jax.random.randint(key, (9,), 0, 17))
    np.testing.assert_array_equal(got, ravel(updates)[:, picks].astype(np.float32))


@pytest.mark.parametrize("seed", range(3))
def test_dnc_with_subsamples_filters_far_rows(seed):
    rng = np.random.default_rng(seed)
    honest = rng.normal(0.0, 1.0, (10, 3000))
    byzantine = -5.0 * honest.mean(axis=0) + rng.normal(0.0, 1.0, (2, 3000)) + 4.0
    x = jnp.asarray(np.concatenate([honest, byzantine]), jnp.float32)
    run_once = jax.jit(lambda x, key: agg.dnc(x, f=2, key=key, sub_dim=200))
    out = np.asarray(run_once(x, jax.random.key(seed)))
    again = np.asarray(run_once(x, jax.random.key(seed)))
    np.testing.assert_array_equal(out, again)  # same key, same subsamples
    # A mean of honest rows only: every coordinate inside the honest range.
    assert np.all(out >= honest.min(axis=0) - 1e-5) and np.all(out <= honest.max(axis=0) + 1e-5)


def test_dnc_when_no_row_survives_every_subsample_keeps_the_first_ones():
    # One coordinate per subsample: each iteration removes the rows farthest on another
    # coordinate, and with n = 5, f = 2 over 5 iterations the intersection is empty.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 400)), jnp.float32)
    out = np.asarray(agg.dnc(x, f=2, key=0, sub_dim=1, iterations=5))
    assert np.all(np.isfinite(out))
    means = [np.asarray(x)[list(rows)].mean(axis=0) for rows in itertools.combinations(range(5), 3)]
    assert any(np.allclose(out, m, rtol=1e-5, atol=1e-6) for m in means)


FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("placement", ["first", "spread"])
@pytest.mark.parametrize("f", [5, 12])
def test_dnc_filters_rows_at_float32s_largest_value(f, placement):
    # The mean of f such rows overflows to inf, which made every score NaN and kept them.
    x = np.random.default_rng(f).normal(size=(25, 300)).astype(np.float32)
    bad = np.arange(f) if placement == "first" else np.linspace(0, 24, f).astype(int)
    x[bad] = FLOAT32_MAX
    out = np.asarray(agg.dnc(jnp.asarray(x), f=f, key=jax.random.key(0)))
    honest = np.delete(x, bad, axis=0)
    assert np.all(np.isfinite(out))
    assert np.all(out >= honest.min(axis=0) - 1e-5) and np.all(out <= honest.max(axis=0) + 1e-5)


# ------------------------------------------------------------------------------------------------
# Declarations that the generic tests cannot read: state, keys, user rules, documented defaults.


def test_centered_clipping_state_is_the_previous_aggregate():
    declared = agg.spec("centered_clipping")
    rng = np.random.default_rng(8)
    steps = [make_updates(rng, 7, "tree", jnp.float32) for _ in range(3)]
    state = declared.init(jax.tree.map(lambda leaf: leaf[0], steps[0]))
    center = jax.tree.map(jnp.zeros_like, state)
    for updates in steps:
        out, state = declared.apply(updates, state, None, {"f": 3, "tau": 0.5})
        by_hand = agg.centered_clipping(updates, f=3, tau=0.5, center=center)
        chex.assert_trees_all_equal(out, by_hand, state)
        center = by_hand


def test_randomised_rules_need_a_key_and_only_two_rules_keep_state():
    assert [s.name for s in agg.specs() if s.key] == ["dnc", "flame", "gas", "signguard"]
    assert [s.name for s in agg.specs() if s.state] == ["centered_clipping", "foolsgold"]
    assert agg.spec("centered_clipping").state.arg == "center"
    # FoolsGold's history has one row per worker: sized by num_clients, not model-shaped.
    history = agg.spec("foolsgold").state
    assert (history.arg, history.rows, history.model_shaped) == ("history", "num_clients",
                                                                 False)


def test_a_users_declared_rule_runs_on_coordinate_slices_and_a_plain_one_does_not():
    @agg.declare(coordinate_slices=True)
    def upper_half_mean(updates, *, f: int = 0):
        return jax.tree.map(lambda u: u.sort(0)[u.shape[0] // 2:].mean(0), updates)

    def plain(updates, *, f: int = 0):
        return updates

    assert agg.supports_coordinate_layout(upper_half_mean)
    assert agg.supports_coordinate_layout(functools.partial(upper_half_mean, f=1))
    assert not agg.supports_coordinate_layout(plain)
    assert not agg.supports_coordinate_layout(functools.partial(agg.dnc, f=1))
    assert "upper_half_mean" not in agg.names()  # declare() does not register


def test_median_documents_byzfl_as_the_midpoint_convention():
    # ByzFL averages the two middle values (rbyz's default); torch.median takes the lower one.
    doc = " ".join(agg.median.__doc__.split())
    assert agg.spec("median").hparams["even"] == "midpoint"
    assert '"lower"`` (as ``torch.median``)' in doc
    assert "ByzFL" in doc.split('"lower"')[0]
