"""Properties every registered aggregator has, read from its declaration alone.

Nothing here names a rule. Each test runs over ``rbyz.aggregators.names()`` and takes what it
needs from the rule's spec: ``f`` is the largest the declared constraint admits at the chosen
``n`` (at most ``(n - 1) // 2``, so that ``f`` hostile rows leave an honest majority), the other
hyperparameters are the declared defaults, a key is passed iff the spec says so, and state only
flows through ``spec.init`` / ``spec.apply``; a state with one row per worker (``state.rows``)
has that hyperparameter set to the number of rows. A newly registered rule is tested by registering
it, and fails here until it has a float64 reference in ``tests/references.py`` (``REFERENCES``).
"""

from __future__ import annotations

import collections
import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from rbyz import aggregators as agg

from references import REFERENCES, float64

NAMES = agg.names()
N = 11  # Bulyan's smallest n for f = 2; every constraint admits some f >= 1 here
HOSTILE = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "1e30": 1e30, "-1e30": -1e30}


# ------------------------------------------------------------------------------------------------
# Reading the declarations.


def largest_f(declared, n: int = N) -> int:
    """The largest ``f <= (n - 1) // 2`` that the declared constraint admits at ``n``."""
    for f in range((n - 1) // 2, -1, -1):
        if declared.constraint.holds(n, f):
            return f
    pytest.fail(f"{declared.name}: its constraint {declared.constraint.text!r} admits no f at "
                f"n={n}.")


def needs_honest_majority(declared) -> bool:
    """Whether the rule promises robustness: its constraint refuses ``f = n / 2`` (n > 2f)."""
    return not declared.constraint.holds(2, 1)


def sized(declared, n: int = N) -> dict:
    """``{state.rows: n}`` for a state with one row per worker (sized by that hyperparameter,
    for ``check_hparams`` and ``init``), else ``{}``."""
    rows = declared.state.rows if declared.state is not None else None
    return {rows: n} if rows else {}


def hparams_for(declared, f: int, n: int = N) -> dict:
    """The declared defaults with ``f`` and, for a state with one row per worker, ``n``."""
    return declared.check_hparams({"f": f, **sized(declared, n)}, "tests")


def init_for(declared, params, n: int = N):
    """``spec.init`` from one worker's ``params`` (sized for ``n`` rows where it keeps rows)."""
    return declared.init(params, sized(declared, n))


def ravel_state(declared, state) -> np.ndarray | None:
    """The state as the float64 references take it: ``[n, D]`` for one row per worker (its
    leaves are ``[n, ...]``), ``[D]`` for a model-shaped one."""
    if state is None:
        return None
    return ravel(state) if sized(declared) else ravel_row(state)


TRACES = collections.Counter()


def signature(tree):
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


@functools.cache
def compiled(name: str, f: int, n: int = N):
    """``jit(spec.apply)`` at the declared defaults and ``f`` (for ``n`` rows); counts its
    traces."""
    declared = agg.spec(name)
    hparams = hparams_for(declared, f, n)

    def apply(updates, state, key):
        TRACES[(name, f, signature(updates))] += 1
        return declared.apply(updates, state, key, hparams)

    return jax.jit(apply)


def key_for(declared, seed: int = 0):
    return jax.random.key(seed) if declared.key else None


def one_row(updates):
    return jax.tree.map(lambda leaf: leaf[0], updates)


def run(name: str, updates, *, f: int | None = None, seed: int = 0, state=None):
    """One step of the rule on ``updates`` from its initial state (or ``state``)."""
    declared = agg.spec(name)
    f = largest_f(declared) if f is None else f
    n = jax.tree.leaves(updates)[0].shape[0]
    state = init_for(declared, one_row(updates), n) if state is None else state
    return compiled(name, f, n)(updates, state, key_for(declared, seed))


# ------------------------------------------------------------------------------------------------
# Data.


def make_tree(rng, n: int = N, dtype=jnp.float32, scale: float = 1.0):
    """Two leaves, ``{"b": [n, 5], "w": [n, 3, 4]}``: 17 coordinates per worker."""
    shapes = {"b": (n, 5), "w": (n, 3, 4)}
    return {key: jnp.asarray(rng.normal(0.5, 1.0, shape) * scale, dtype)
            for key, shape in shapes.items()}


def ravel(tree) -> np.ndarray:
    """``[n, D]`` float64 matrix of a stacked pytree, leaves in ``jax.tree.leaves`` order."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate(
        [np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16 else leaf,
                    np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def ravel_row(tree) -> np.ndarray:
    return ravel(jax.tree.map(lambda leaf: leaf[None], tree))[0]


def unravel(x: np.ndarray, like, dtype):
    leaves, treedef = jax.tree.flatten(like)
    sizes = np.cumsum([0] + [int(np.prod(leaf.shape[1:])) for leaf in leaves])
    parts = [jnp.asarray(x[:, a:b].astype(np.float32)).astype(dtype).reshape(leaf.shape)
             for a, b, leaf in zip(sizes[:-1], sizes[1:], leaves)]
    return jax.tree.unflatten(treedef, parts)


def check_structure_and_dtype(out, updates):
    chex.assert_trees_all_equal_structs(out, one_row(updates))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, one_row(updates))


# ------------------------------------------------------------------------------------------------
# The declaration itself.


@pytest.mark.parametrize("name", NAMES)
def test_declaration_is_complete(name):
    declared = agg.spec(name)
    assert declared.declared and declared.kind == "aggregator" and declared.name == name
    assert agg.get(name) is declared.fn is getattr(agg, name)
    assert declared.reference, f"{name} declares no reference"
    assert declared.cost.startswith("O("), f"{name} declares no cost"
    assert "f" in declared.hparams
    assert agg.supports_coordinate_layout(declared.fn) is declared.coordinate_slices
    doc = declared.fn.__doc__
    assert "Example:" in doc and "References:" in doc and "Args:" in doc


# ------------------------------------------------------------------------------------------------
# Float64 end to end.


@pytest.mark.parametrize("scale", [1.0, 1e25], ids=["unit", "norm-1e26"])
@pytest.mark.parametrize("name", NAMES)
def test_float64_matches_float64_reference(name, scale):
    """Under x64, float64 input is computed in float64: relative 1e-12 against NumPy. Rows of
    norm ~1e26 (whose squared norm overflows float32) are ordinary rows, not hostile ones."""
    assert name in REFERENCES, (
        f"aggregator {name!r} is registered but has no float64 reference: add it to REFERENCES "
        "in tests/references.py.")
    declared = agg.spec(name)
    f = largest_f(declared)
    rng = np.random.default_rng(7)
    with float64():
        updates = make_tree(rng, dtype=jnp.float64, scale=scale)
        state = init_for(declared, one_row(updates))
        for step in range(2):  # a stateful rule's second step starts from its first state
            x = ravel(updates)
            want = REFERENCES[name](x, f, ravel_state(declared, state))
            out, state = run(name, updates, f=f, seed=step, state=state)
            check_structure_and_dtype(out, updates)
            np.testing.assert_allclose(ravel_row(out), want, rtol=1e-12,
                                       atol=1e-12 * np.abs(want).max())
            updates = make_tree(rng, dtype=jnp.float64, scale=scale)
    assert not jax.config.jax_enable_x64  # switched on for this test only


# ------------------------------------------------------------------------------------------------
# Properties in float32 (and bfloat16).


@pytest.mark.parametrize("name", NAMES)
@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_permutation_invariance(name, seed):
    rng = np.random.default_rng(seed)
    updates = make_tree(rng)
    order = rng.permutation(N)
    if name == "monna":  # the trusted pivot (row 0) stays in place; the others may move
        order = np.concatenate([[0], 1 + rng.permutation(N - 1)])
    out, _ = run(name, updates)
    shuffled, _ = run(name, jax.tree.map(lambda leaf: leaf[order], updates))
    check_structure_and_dtype(out, updates)
    # Sums in another order may round differently; random data has no score ties. CAF iterates
    # its filter on covariance sums, which compounds that rounding over its iterations.
    atol = 1e-5 if name == "caf" else 1e-6
    chex.assert_trees_all_close(out, shuffled, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", NAMES)
@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_unanimity(name, seed):
    """When every worker sends the same update, that is the aggregate. The values are signs
    (-1, 0, 1), so that a sign vote and a rule on the values have the same answer."""
    rng = np.random.default_rng(seed)
    row = jax.tree.map(lambda leaf: jnp.sign(jnp.round(leaf[:1] - 0.5)), make_tree(rng, n=1))
    updates = jax.tree.map(lambda leaf: jnp.repeat(leaf, N, axis=0), row)
    out, _ = run(name, updates)
    chex.assert_trees_all_close(out, one_row(updates), rtol=1e-6, atol=1e-6)


def hostile_rows(seed: int, f: int, kind: str, dtype):
    """Updates whose ``f`` randomly placed rows are hostile, and the honest rows' matrix."""
    rng = np.random.default_rng(seed)
    updates = make_tree(rng)
    x = ravel(updates)
    bad = rng.choice(N, f, replace=False)
    values = list(HOSTILE.values())
    for count, row in enumerate(bad):
        x[row] = values[count % len(values)] if kind == "mixed" else HOSTILE[kind]
        if kind == "mixed" and count % 3 == 2:  # a row with a single bad coordinate
            x[row] = x[(row + 1) % N]
            x[row, count % x.shape[1]] = np.nan
    return unravel(x, updates, dtype), np.delete(x, bad, axis=0)


HOSTILE_CASES = [(kind, jnp.float32) for kind in [*HOSTILE, "mixed"]] + [("mixed", jnp.bfloat16)]


@pytest.mark.parametrize("kind, dtype", HOSTILE_CASES,
                         ids=[f"{kind}-{jnp.dtype(dtype).name}" for kind, dtype in HOSTILE_CASES])
@pytest.mark.parametrize("name", NAMES)
@hypothesis.settings(max_examples=3, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_hostile_rows_stay_out(name, kind, dtype, seed):
    """``f`` rows of NaN, ±Inf or ±1e30 (or one NaN coordinate) never reach the output of a
    rule that needs an honest majority: it stays finite and near the honest values (each rule's
    tighter promise is tested in test_aggregators.py)."""
    declared = agg.spec(name)
    if not needs_honest_majority(declared):
        pytest.skip(f"{name} declares {declared.constraint.text}: no robustness promise")
    updates, honest = hostile_rows(seed, largest_f(declared), kind, dtype)
    out, _ = run(name, updates)
    check_structure_and_dtype(out, updates)
    out = ravel_row(out)
    assert np.all(np.isfinite(out))
    assert np.abs(out).max() <= 1e4 * (1.0 + np.abs(honest).max())


@pytest.mark.parametrize("name", NAMES)
def test_jit_traces_once_per_shape(name):
    rng = np.random.default_rng(4)
    updates = make_tree(rng)
    for seed in range(3):
        jax.block_until_ready(run(name, make_tree(rng), seed=seed))
    assert TRACES[(name, largest_f(agg.spec(name)), signature(updates))] == 1


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_a_batch_of_problems(name):
    declared = agg.spec(name)
    hparams = hparams_for(declared, largest_f(declared))
    batch = make_tree(np.random.default_rng(5))
    batch = jax.tree.map(lambda leaf: jnp.stack([leaf, 2.0 * leaf[::-1] + 1.0]), batch)
    state = init_for(declared, jax.tree.map(lambda leaf: leaf[0, 0], batch))

    def one(updates):
        return declared.apply(updates, state, key_for(declared), hparams)[0]

    batched = jax.jit(jax.vmap(one))(batch)
    for i in range(2):
        problem = jax.tree.map(lambda leaf: leaf[i], batch)
        chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[i], batched), one(problem),
                                    rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bad_pytrees_raise_naming_the_rule(name):
    declared = agg.spec(name)
    hparams = hparams_for(declared, largest_f(declared))
    key = key_for(declared)
    mismatched = {"a": jnp.zeros((N, 3)), "b": jnp.zeros((N + 1, 3))}
    with pytest.raises(ValueError, match=f"{name}: leaves disagree on the worker count"):
        declared.apply(mismatched, init_for(declared, {"a": jnp.zeros(3), "b": jnp.zeros(3)}),
                       key, hparams)
    with pytest.raises(ValueError, match=f"{name}: got an empty pytree"):
        declared.apply({}, init_for(declared, {}), key, hparams)


class EmptyLeavesTest(chex.TestCase):
    """A leaf with no coordinates (``[n, 0]``, e.g. a bias-free layer) changes nothing."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in NAMES))
    def test_empty_leaves(self, name):
        declared = agg.spec(name)
        hparams = hparams_for(declared, largest_f(declared))

        @self.variant
        def aggregate(updates, key):
            return declared.apply(updates, init_for(declared, one_row(updates)), key,
                                  hparams)[0]

        key = key_for(declared)
        w = make_tree(np.random.default_rng(6))["w"]
        for empty in (jnp.zeros((N, 0)), jnp.zeros((N, 2, 0))):
            alone = aggregate({"e": empty}, key)
            chex.assert_shape(alone["e"], empty.shape[1:])
            beside = aggregate({"e": empty, "w": w}, key)
            chex.assert_shape(beside["e"], empty.shape[1:])
            chex.assert_trees_all_close(beside["w"], aggregate({"w": w}, key)["w"], rtol=1e-6,
                                        atol=1e-6)
