"""Properties every registered model attack keeps, driven by the declarations.

Each test is parametrized over ``rbyz.attacks.names()``: the hyperparameters come from the spec
(its defaults, plus a value for the few that have none, below), a key is passed iff the spec
says the attack is random and ``n`` iff it takes the worker count. A new attack is tested by
registering it.
"""

from __future__ import annotations

import inspect
from statistics import NormalDist

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rbyz import aggregators
from rbyz import attacks
from rbyz._src import spec as spec_lib

NAMES = attacks.names()
RANDOM = tuple(name for name in NAMES if attacks.spec(name).key)

# Values for hyperparameters that have no default (a new required one must be added here).
REQUIRED = {"aggregator": aggregators.mean}

N, F = 10, 3  # ALIE's z (v1) is 0.524 here


def hparams(name: str) -> dict:
    declared = attacks.spec(name)
    missing = [k for k, v in declared.hparams.items()
               if v is spec_lib.REQUIRED and k != "f" and k not in REQUIRED]
    assert not missing, f"{name}: give a test value for {missing} in REQUIRED"
    return {k: REQUIRED[k] for k, v in declared.hparams.items()
            if v is spec_lib.REQUIRED and k != "f"}


def call(name: str, known, *, f: int = F, key=0, **extra):
    """The attack called directly, as its declaration says (key iff random, n iff takes_n)."""
    declared = attacks.spec(name)
    kwargs = {**hparams(name), **extra}
    if declared.key:
        kwargs["key"] = key
    if declared.takes_n:
        kwargs["n"] = N
    return declared.fn(known, f=f, **kwargs)


def make_known(h: int, seed: int = 0, offset: float = 0.5, small=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(offset, 1.0, (h, 3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(offset, 1.0, (h, 4)), small),
        "nested": (jnp.asarray(rng.normal(offset, 1.0, (h, 1)), jnp.float32),),
    }


def expected_rows(known, f: int):
    return jax.tree.map(lambda x: jnp.zeros((f,) + x.shape[1:], x.dtype), known)


# ------------------------------------------------------------------------------------------------
# The declarations themselves.


@pytest.mark.parametrize("name", NAMES)
def test_declaration(name):
    declared = attacks.spec(name)
    assert declared.kind == "attack" and declared.declared and declared.name == name
    assert attacks.get(name) is declared.fn and declared.fn.spec is declared
    assert declared.cost != "unknown"
    parameters = inspect.signature(declared.fn).parameters
    assert ("key" in parameters) == declared.key  # no unused key on deterministic attacks
    if declared.key:
        assert parameters["key"].default is None  # no default seed
    assert ("n" in parameters) == declared.takes_n
    assert "Example:" in declared.fn.__doc__
    if name != "non_finite":  # the only attack with no publication of its own
        assert declared.reference


def test_takes_n_and_keys_are_declared():
    assert [name for name in NAMES if attacks.spec(name).takes_n] == ["alie", "byzmean",
                                                                     "fang_krum"]
    assert set(RANDOM) == {"bit_flip", "fang_trimmed_mean", "fang_trimmed_mean_partial",
                           "gaussian", "sign_random"}


# ------------------------------------------------------------------------------------------------
# Rows: shape, structure, dtype; f = 0; determinism; jit.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("h", [F, N - F])  # own rows, and all honest rows
def test_rows_keep_structure_shapes_and_dtypes(name, h):
    known = make_known(h)
    rows = call(name, known)
    chex.assert_trees_all_equal_shapes_and_dtypes(rows, expected_rows(known, F))
    through = attacks.attack_rows(name, known, f=F, n=N, key=0, hparams=hparams(name))
    chex.assert_trees_all_equal(through, rows)


@pytest.mark.parametrize("name", NAMES)
def test_f_zero_gives_an_empty_stack(name):
    known = make_known(4)
    chex.assert_trees_all_equal_shapes_and_dtypes(call(name, known, f=0), expected_rows(known, 0))
    through = attacks.attack_rows(name, known, f=0, n=N, hparams=hparams(name))  # no key needed
    chex.assert_trees_all_equal_shapes_and_dtypes(through, expected_rows(known, 0))
    out, mask = attacks.inject(make_known(N), name, f=0, **hparams(name))
    chex.assert_trees_all_equal(out, make_known(N))
    assert not np.asarray(mask).any()


@pytest.mark.parametrize("name", NAMES)
def test_same_key_same_rows(name):
    known = make_known(N - F, seed=1)
    first = call(name, known, key=jax.random.key(5))
    chex.assert_trees_all_equal(first, call(name, known, key=jax.random.key(5)))
    if name in RANDOM:
        other = call(name, known, key=jax.random.key(6))
        assert not np.array_equal(np.asarray(first["w"]), np.asarray(other["w"]))


def counted_jit(fn):
    """``(jax.jit(fn), traces)``: ``traces`` grows by one each time ``fn`` is traced."""
    traces = []

    def traced(*args):
        traces.append(1)
        return fn(*args)

    return jax.jit(traced), traces


@pytest.mark.parametrize("name", NAMES)
def test_jit_traces_once_per_shape_and_matches_eager(name):
    rows, traces = counted_jit(lambda known, key: attacks.attack_rows(
        name, known, f=F, n=N, key=key, hparams=hparams(name)))

    for seed in (0, 1):
        # float32 only: a search on a bfloat16-rounded objective meets ties that jit and eager
        # rounding may break differently.
        known = make_known(N - F, seed=seed, small=jnp.float32)
        jitted = rows(known, jax.random.key(seed))
        eager = attacks.attack_rows(name, known, f=F, n=N, key=jax.random.key(seed),
                                    hparams=hparams(name))
        chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    rows(make_known(N - F + 1, small=jnp.float32), jax.random.key(0))
    assert len(traces) == 2


# ------------------------------------------------------------------------------------------------
# Through inject, with every positions mode.

POSITIONS = ["last", "first", "random", (7, 0, 4)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("positions", POSITIONS, ids=str)
@pytest.mark.parametrize("omniscient", [True, False])
def test_inject_writes_the_attack_rows_at_the_positions(name, positions, omniscient):
    honest = make_known(N, seed=2)
    key = jax.random.key(9)
    out, mask = attacks.inject(honest, name, f=F, key=key, positions=positions,
                               omniscient=omniscient, **hparams(name))
    position_key, attack_key = jax.random.split(key)
    index = np.asarray(attacks.byzantine_positions(N, F, positions, key=position_key))
    assert sorted(np.flatnonzero(np.asarray(mask)).tolist()) == sorted(index.tolist())
    good = np.setdiff1d(np.arange(N), index)
    known = jax.tree.map(lambda x: x[good if omniscient else index], honest)
    rows = attacks.attack_rows(name, known, f=F, n=N, key=attack_key, hparams=hparams(name))
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[index], out), rows)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[good], out),
                                jax.tree.map(lambda x: x[good], honest))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, honest)


@pytest.mark.parametrize("name", NAMES)
def test_inject_under_jit_redraws_random_positions_without_recompiling(name):
    step, traces = counted_jit(lambda honest, key: attacks.inject(
        honest, name, f=F, key=key, positions="random", **hparams(name)))

    honest = make_known(N, seed=3)
    masks = {np.asarray(step(honest, jax.random.key(s)).byzantine).tobytes() for s in range(4)}
    assert len(traces) == 1 and len(masks) > 1


# ------------------------------------------------------------------------------------------------
# Validation, from the declarations.


@pytest.mark.parametrize("name", NAMES)
def test_misspelt_hyperparameter_names_it_and_the_accepted_ones(name):
    accepted = ", ".join(attacks.spec(name).hparams)
    with pytest.raises(ValueError, match=rf"{name} has no hyperparameter 'sclae'; it accepts "
                                         rf"{accepted}\."):
        attacks.inject(make_known(N), name, f=F, key=0, sclae=1.0, **hparams(name))


@pytest.mark.parametrize("name", RANDOM)
def test_random_attacks_need_a_key(name):
    with pytest.raises(ValueError, match=rf"inject: {name} is a random attack and needs a key"):
        attacks.inject(make_known(N), name, f=F, **hparams(name))
    with pytest.raises(ValueError, match=rf"{name}: needs a random key"):
        call(name, make_known(N - F), key=None)


@pytest.mark.parametrize("name", [n for n in NAMES if attacks.spec(n).constraint
                                  is spec_lib.MINORITY])
def test_constraint_is_checked_on_the_injection_path(name):
    with pytest.raises(ValueError, match=r"needs f < n; got n=3, f=3"):
        attacks.attack_rows(name, make_known(2), f=3, n=3, key=0, hparams=hparams(name))


# ------------------------------------------------------------------------------------------------
# float64 stays float64.

FLOAT64 = {
    # v1 at n = 10, f = 3: s = 3 supporters, q = 7/10.
    "alie": lambda x, f: np.stack([x.mean(0) - NormalDist().inv_cdf(0.7) * x.std(0)] * f),
    "ipm": lambda x, f: np.stack([-0.1 * x.mean(0)] * f),
    "sign_flip": lambda x, f: np.stack([-x.mean(0)] * f),
    "reverse": lambda x, f: np.stack([-100.0 * x[i % len(x)] for i in range(f)]),
    "mimic": lambda x, f: np.stack([x[0]] * f),
    "constant": lambda x, f: np.full((f,) + x.shape[1:], -100.0),
}


@pytest.mark.parametrize("name", sorted(FLOAT64))
def test_float64_rows_agree_with_numpy_to_float64_precision(name):
    with jax.enable_x64(True):
        x = np.random.default_rng(4).normal(1.0, 1e-3, (N - F, 6))
        rows = call(name, {"a": jnp.asarray(x)})["a"]
        assert rows.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(rows), FLOAT64[name](x, F), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_float64_input_gives_float64_rows(name):
    with jax.enable_x64(True):
        known = {"a": jnp.asarray(np.random.default_rng(5).normal(size=(N - F, 5)))}
        rows = call(name, known)
        assert rows["a"].dtype == jnp.float64 and rows["a"].shape == (F, 5)
