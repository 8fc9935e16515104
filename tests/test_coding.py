"""Tests for rbyz.coding (DETOX, DRACO, Election Coding, their analysis), the hierarchical
combinators (rbyz.aggregators.hierarchical) and the coding transforms (rbyz.transforms.coding)."""

from __future__ import annotations

import functools
import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from references import (ref_bad_groups, ref_election_vote, ref_group_vote, ref_hierarchical,
                        ref_mean, ref_median, ref_median_of_means, ref_multi_krum,
                        ref_vote_failures)

import rbyz.aggregators
import rbyz.attacks
from rbyz import coding
from rbyz import transforms as coding_transforms
from rbyz import aggregators as hierarchical_lib  # hierarchical and plain live there
from rbyz._src import spec

SHAPES = {"w": (3, 4), "b": (5,)}
HOSTILE = (np.nan, np.inf, -np.inf, 1e30)
MOM = functools.partial(coding.hierarchical, coding.plain(rbyz.aggregators.mean),
                        rbyz.aggregators.median)


# ---------------------------------------------------------------------------------------------
# Inputs and comparisons.


def grouped_updates(seed, n, r, byzantine, dtype=jnp.float32, hostile=None, collude=False):
    """Honest members of a group share one update; ``byzantine`` workers send random (or
    ``hostile``) values, identical to each other when ``collude``."""
    rng = np.random.default_rng(seed)
    tree = {}
    for name, shape in SHAPES.items():
        x = np.repeat(rng.normal(size=(n // r,) + shape), r, axis=0)
        attack = rng.normal(size=shape) * 50
        for j in byzantine:
            x[j] = hostile if hostile is not None else (
                attack if collude else rng.normal(size=shape) * 50)
        tree[name] = jnp.asarray(x, dtype)
    return tree


def matrix(tree):
    """``[n, D]`` float64 of a stacked pytree (leaves in ``jax.tree.leaves`` order)."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate(
        [np.asarray(leaf).astype(np.float64).reshape(leaves[0].shape[0], -1) for leaf in leaves],
        axis=1)


def vector(tree):
    """``[D]`` float64 of an aggregated pytree."""
    return np.concatenate([np.asarray(leaf).astype(np.float64).reshape(-1)
                           for leaf in jax.tree.leaves(tree)])


def tolerance(dtype):
    return {jnp.bfloat16: dict(rtol=2e-2, atol=2e-2), jnp.float32: dict(rtol=1e-5, atol=1e-5),
            jnp.float64: dict(rtol=1e-12, atol=1e-12)}[dtype]


def assert_dtypes(tree, dtype):
    chex.assert_trees_all_equal_dtypes(tree, jax.tree.map(lambda x: jnp.zeros((), dtype), tree))


@functools.cache
def jitted(fn, **static):
    return jax.jit(functools.partial(fn, **static))


def permuted(winners, key):
    """The winners in the order ``hierarchical`` shuffles them with ``key`` (its docstring)."""
    perm_key = jax.random.split(typed_key(key), 3)[0]
    return winners[np.asarray(jax.random.permutation(perm_key, len(winners)))]


def typed_key(key):
    return jax.random.key(key) if isinstance(key, int) else key


# ---------------------------------------------------------------------------------------------
# Group codes.


def test_group_assignment():
    np.testing.assert_array_equal(coding.group_assignment(6, 2), [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"group_assignment: .*r to divide .* n=7, r=3"):
        coding.group_assignment(7, 3)


@pytest.mark.parametrize("fallback", ["median", "boyer_moore"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, r, byzantine", [
    (6, 3, (0, 4)),            # one Byzantine in two groups: honest majorities
    (9, 3, (0, 1, 5)),         # group 0 lost (2 random, distinct), no majority there
    (8, 4, (0, 1, 6)),         # r even: group 0 tied 2-2
    (10, 5, (2, 3, 4)),        # group 0: 3 random Byzantines, no majority
    (4, 1, (2,)),              # r = 1: identity
])
def test_group_vote_matches_reference(n, r, byzantine, dtype, fallback):
    x = grouped_updates(n + r, n, r, byzantine, dtype)
    got = jitted(coding.group_vote, r=r, fallback=fallback)(x)
    assert_dtypes(got, dtype)
    # The vote copies a member exactly; a median fallback averages two values in the dtype.
    np.testing.assert_allclose(matrix(got), ref_group_vote(matrix(x), r, fallback),
                               rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_group_vote_declares_a_row_reducing_preaggregator():
    declared = coding.group_vote.spec
    assert (declared.kind, declared.key, declared.state) == ("preaggregator", False, None)
    assert declared.output_rows(12, {"r": 3}) == 4
    assert declared.hparams == {"r": spec.REQUIRED, "fallback": "median"}


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("r", [3, 5])
def test_vote_removes_every_byzantine_vector_below_half(r, hostile):
    n = 5 * r
    minority = (r - 1) // 2
    byzantine = [g * r + a for g in range(5) for a in range(minority)]
    x = grouped_updates(r, n, r, byzantine, hostile=hostile)
    honest = grouped_updates(r, n, r, ())
    got = jitted(coding.group_vote, r=r)(x)
    chex.assert_trees_all_equal(got, jax.tree.map(lambda h: h[::r], honest))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), values=st.lists(st.sampled_from(HOSTILE + (3.0, -7.5)),
                                                    min_size=2, max_size=2))
def test_vote_property_honest_majority_wins(seed, values):
    # Group of 5, two Byzantine members at random positions sending anything.
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=4).astype(np.float32)
    x = np.tile(honest, (5, 1))
    for j, v in zip(rng.choice(5, 2, replace=False), values):
        x[j] = v
    got = jitted(coding.group_vote, r=5, fallback="median")(jnp.asarray(x))
    np.testing.assert_array_equal(got[0], honest)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, f, r", [(9, 1, 3), (10, 2, 5), (15, 2, None), (12, 1, 3)])
def test_repetition_code_is_the_honest_mean(n, f, r, dtype):
    size = 2 * f + 1 if r is None else r
    byzantine = [g * size for g in range(f)]  # at most one per group... and f in total
    x = grouped_updates(n, n, size, byzantine, dtype, hostile=np.nan)
    honest = grouped_updates(n, n, size, (), dtype)
    got = jitted(coding.repetition_code, f=f, r=r)(x)
    assert_dtypes(got, dtype)
    np.testing.assert_allclose(vector(got), ref_mean(matrix(honest)[::size]), **tolerance(dtype))


# ---------------------------------------------------------------------------------------------
# Hierarchical aggregation.


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("buckets", [1, 2, 4])
def test_hierarchical_without_shuffle_matches_reference(buckets, use_jit):
    x = grouped_updates(1, 10, 1, (3,), hostile=1e30)
    rule = coding.hierarchical(rbyz.aggregators.median, coding.plain(rbyz.aggregators.mean),
                               buckets=buckets, shuffle=False)
    assert not rule.spec.key and rule.spec.kind == "aggregator"
    run = jax.jit(rule, static_argnames="f") if use_jit else rule
    expected = ref_hierarchical(matrix(x), ref_median, ref_mean, buckets)
    np.testing.assert_allclose(vector(run(x, f=0)), expected, **tolerance(jnp.float32))


def test_hierarchical_shuffle_permutes_rows_with_the_documented_key():
    x = grouped_updates(2, 12, 1, ())
    rule = MOM(buckets=3)  # shuffle=True is the default, as the DETOX reference does
    assert rule.spec.key
    key = jax.random.key(5)
    got = jax.jit(rule, static_argnames="f")(x, f=1, key=key)
    expected = ref_median_of_means(permuted(matrix(x), key), 3)
    np.testing.assert_allclose(vector(got), expected, **tolerance(jnp.float32))
    # Another key, another permutation: with unequal rows the bucket means differ.
    other = rule(x, f=1, key=jax.random.key(6))
    assert not np.allclose(vector(other), vector(got))
    # An int seed is a key too.
    chex.assert_trees_all_close(rule(x, f=1, key=5), got, rtol=1e-6)


def test_hierarchical_passes_keys_to_keyed_stages():
    @spec.declare("aggregator", register=False, key=True)
    def first_plus_noise(updates, *, f: int, key):
        del f
        return jax.tree.map(lambda u: u[0] + jax.random.normal(key, u.shape[1:], u.dtype),
                            updates)

    x = jnp.arange(8.0).reshape(4, 2)
    rule = coding.hierarchical(first_plus_noise, rbyz.aggregators.median, buckets=2,
                               shuffle=False)
    assert rule.spec.key
    key = jax.random.key(1)
    _, inner_key, _ = jax.random.split(key, 3)
    bucket_keys = jax.random.split(inner_key, 2)
    expected = np.median([np.asarray(x[2 * j] + jax.random.normal(bucket_keys[j], (2,)))
                          for j in range(2)], axis=0)
    np.testing.assert_allclose(rule(x, f=0, key=key), expected, rtol=1e-6)


def test_hierarchical_declaration_reads_its_stages():
    mom = MOM(buckets=3, shuffle=False)
    assert mom.spec.hparams == {"f": spec.REQUIRED}
    assert mom.spec.constraint.explain(9, 1) is None
    assert "needs buckets <= rows" in mom.spec.constraint.explain(2, 0)
    plain_mean = coding.plain(rbyz.aggregators.mean)
    assert plain_mean.spec.name == "plain(mean)" and not plain_mean.spec.key

    @spec.declare("aggregator", register=False, constraint=spec.MAJORITY)
    def majority_mean(updates, *, f: int):
        return rbyz.aggregators.mean(updates)

    rule = coding.hierarchical(majority_mean, rbyz.aggregators.median, buckets=3, shuffle=False)
    with pytest.raises(ValueError, match=r"hierarchical: the inner rule majority_mean on buckets "
                                         r"of 2 rows needs n > 2f; got n=2, f=1"):
        rule(jnp.ones((6, 2)), f=1)


def test_hierarchical_keeps_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = {"a": jnp.asarray(rng.normal(size=(12, 3, 2))), "b": jnp.asarray(rng.normal(size=(12,
                                                                                             4)))}
        got = MOM(buckets=4, shuffle=False)(x, f=1)
        assert_dtypes(got, jnp.float64)
        np.testing.assert_allclose(vector(got), ref_median_of_means(matrix(x), 4),
                                   **tolerance(jnp.float64))


def _stateful(updates, *, f: int = 0, center):
    return center


_stateful = spec.declare("aggregator", register=False, state=spec.State("center"))(_stateful)


@pytest.mark.parametrize("call, error, match", [
    (lambda: MOM(buckets=4, shuffle=False)(jnp.ones((3, 2)), f=0), ValueError,
     r"hierarchical: needs buckets <= rows; got buckets=4, rows=3"),
    (lambda: MOM(buckets=0), ValueError, r"hierarchical: buckets must be >= 1"),
    (lambda: MOM(buckets=2, shuffle="yes"), ValueError, r"hierarchical: shuffle must be True"),
    (lambda: MOM(buckets=2)(jnp.ones((4, 2)), f=0), TypeError, r"key"),
    (lambda: MOM(buckets=2)(jnp.ones((4, 2)), f=0, key=None), ValueError,
     r"hierarchical: needs a random key; got key=None"),
    (lambda: MOM(buckets=2, shuffle=False)(jnp.ones((4, 2)), f=0, key=0), TypeError, r"key"),
    (lambda: coding.hierarchical(functools.partial(rbyz.aggregators.median, f=1),
                                 rbyz.aggregators.median, buckets=2), ValueError,
     r"hierarchical: the inner rule .* binds f=1, but hierarchical passes f itself"),
    (lambda: coding.hierarchical(_stateful, rbyz.aggregators.median, buckets=2), ValueError,
     r"hierarchical: the inner rule _stateful keeps state"),
    (lambda: coding.plain(functools.partial(rbyz.aggregators.median, f=2)), ValueError,
     r"plain: the wrapped rule .* binds f=2"),
    (lambda: coding.hierarchical(lambda updates: updates, rbyz.aggregators.median, buckets=2),
     ValueError, r"hierarchical: <lambda> does not accept \['f'\]"),
])
def test_hierarchical_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_hierarchical_lives_with_the_aggregators():
    assert coding.hierarchical is hierarchical_lib.hierarchical
    assert coding.plain is hierarchical_lib.plain


# ---------------------------------------------------------------------------------------------
# DETOX.


def detox_buckets(n, r, f, buckets):
    f_eff = f // math.ceil(r / 2)
    groups = n // r
    return buckets or min(d for d in range(1, groups + 1) if groups % d == 0 and d >= 2 * f_eff + 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, r, f, buckets, byzantine", [
    (45, 3, 5, None, (0, 1, 3, 4, 9)),   # paper setting: groups 0 and 1 lost, k = 5
    (18, 3, 2, 3, (6, 7)),
    (20, 5, 3, 4, (0, 1, 2)),
    (12, 3, 0, None, ()),
])
def test_detox_median_of_means_matches_reference(n, r, f, buckets, byzantine, dtype):
    x = grouped_updates(n * f + r, n, r, byzantine, dtype, collude=True)
    got = jitted(coding.detox, f=f, r=r, buckets=buckets, shuffle=False)(x)
    assert_dtypes(got, dtype)
    winners = ref_group_vote(matrix(x), r)
    expected = ref_median_of_means(winners, detox_buckets(n, r, f, buckets))
    np.testing.assert_allclose(vector(got), expected, **tolerance(dtype))


def test_detox_float64_matches_reference_to_float64_precision():
    with jax.enable_x64(True):
        x = grouped_updates(7, 45, 3, (0, 1, 3, 4, 9), jnp.float64, collude=True)
        got = coding.detox(x, f=5, r=3, shuffle=False)
        assert_dtypes(got, jnp.float64)
        expected = ref_median_of_means(ref_group_vote(matrix(x), 3), 5)
        np.testing.assert_allclose(vector(got), expected, **tolerance(jnp.float64))
        drc = coding.repetition_code(grouped_updates(7, 9, 3, (0,), jnp.float64, np.nan), f=1)
        honest = matrix(grouped_updates(7, 9, 3, (), jnp.float64))
        np.testing.assert_allclose(vector(drc), ref_mean(honest[::3]), **tolerance(jnp.float64))


@pytest.mark.parametrize("stage2, shuffles", [("median_of_means", True), ("multi_krum", True),
                                              ("bulyan", False)])
def test_detox_needs_a_key_exactly_when_the_reference_shuffles(stage2, shuffles):
    assert coding.detox_needs_key(stage2) is shuffles
    assert coding.detox_needs_key(stage2, shuffle=True)
    assert not coding.detox_needs_key(stage2, shuffle=False)
    assert coding.detox_needs_key(MOM(buckets=2))
    assert not coding.detox_needs_key(MOM(buckets=2, shuffle=False))


def test_detox_key_permutes_winners_before_bucketing():
    n, r, f = 18, 3, 2
    x = grouped_updates(0, n, r, (0, 1), collude=True)
    key = jax.random.key(3)
    got = jitted(coding.detox, f=f, r=r)(x, key=key)
    winners = permuted(ref_group_vote(matrix(x), r), key)
    np.testing.assert_allclose(vector(got), ref_median_of_means(winners, 3),
                               **tolerance(jnp.float32))


@pytest.mark.parametrize("hostile", HOSTILE)
def test_detox_stage2_handles_the_groups_the_adversary_wins(hostile):
    # f = 5, r = 3: the adversary wins f_eff = 2 groups; the output stays in the honest range.
    n, r = 45, 3
    x = grouped_updates(1, n, r, (0, 1, 3, 4, 6), hostile=hostile)
    honest = matrix(grouped_updates(1, n, r, ()))
    got = vector(jitted(coding.detox, f=5, r=r)(x, key=jax.random.key(0)))
    assert np.all(np.isfinite(got))
    assert np.all((got >= honest.min(axis=0)) & (got <= honest.max(axis=0)))


@pytest.mark.parametrize("key", [None, 4])
def test_detox_multi_krum_matches_reference(key):
    n, r, f = 45, 3, 5
    x = grouped_updates(5, n, r, (0, 1, 3, 4, 9), collude=True)
    winners = ref_group_vote(matrix(x), r)
    if key is None:
        got = jitted(coding.detox, f=f, r=r, stage2="multi_krum", shuffle=False)(x)
    else:
        got = jitted(coding.detox, f=f, r=r, stage2="multi_krum")(x, key=key)
        winners = permuted(winners, key)
    f_eff = 2
    # Multi-Krum in each of the two buckets, selecting m = bucket size - f_eff - 2; then the mean.
    expected = ref_hierarchical(
        winners, lambda bucket: ref_multi_krum(bucket, f_eff, m=len(bucket) - f_eff - 2),
        ref_mean, 2)
    np.testing.assert_allclose(vector(got), expected, **tolerance(jnp.float32))


def test_detox_bulyan_runs_library_bulyan_on_winners():
    n, r, f = 21, 3, 3  # 7 groups, f_eff = 1: Bulyan's n >= 4f + 3 holds exactly
    x = grouped_updates(6, n, r, (0, 1, 3), collude=True)
    got = jitted(coding.detox, f=f, r=r, stage2="bulyan")(x)  # no shuffle, no key
    winners = jitted(coding.group_vote, r=r)(x)
    chex.assert_trees_all_close(got, jitted(rbyz.aggregators.bulyan, f=1)(winners), rtol=1e-6)


@pytest.mark.parametrize("shuffle", [False, True])
def test_detox_custom_hierarchical_stage2(shuffle):
    x = grouped_updates(2, 18, 3, (0, 1), collude=True)
    stage2 = coding.hierarchical(rbyz.aggregators.median, coding.plain(rbyz.aggregators.mean),
                                 buckets=2, shuffle=shuffle)
    key = jax.random.key(8) if shuffle else None
    got = jax.jit(lambda u, k: coding.detox(u, f=2, r=3, stage2=stage2, key=k))(x, key)
    winners = ref_group_vote(matrix(x), 3)
    winners = permuted(winners, key) if shuffle else winners
    np.testing.assert_allclose(vector(got), ref_hierarchical(winners, ref_median, ref_mean, 2),
                               **tolerance(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Election Coding.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("attack", ["sign_reverse", rbyz.attacks.sign_directional])
@pytest.mark.parametrize("code, byzantine", [
    ("identity5", (1,)), ("deterministic", (0,)), ("deterministic", (4,)),
    ("bernoulli9", (2, 7)), ("bernoulli9_k6", (3,)),
])
def test_election_vote_matches_reference(code, byzantine, attack, dtype):
    G = {
        "identity5": coding.identity_code(5),
        "deterministic": coding.deterministic_code(5, 1),
        "bernoulli9": coding.bernoulli_code(9, 3.0, key=1),
        "bernoulli9_k6": coding.bernoulli_code(9, 2.0, key=2, partitions=6),
    }[code]
    k = G.shape[1]
    rng = np.random.default_rng(k)
    grads = {name: jnp.asarray(rng.normal(size=(k,) + s), dtype) for name, s in SHAPES.items()}
    got = jax.jit(lambda g: coding.election_vote(g, G, byzantine=byzantine, attack=attack))(grads)
    assert_dtypes(got, dtype)
    expected = ref_election_vote(matrix(grads), G, byzantine,
                                 "reverse" if attack == "sign_reverse" else "directional")
    np.testing.assert_array_equal(vector(got), expected)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_election_vote_property_deterministic_code_never_flips(seed):
    rng = np.random.default_rng(seed)
    grads = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    bad = int(rng.integers(5))
    true_majority = jnp.sign(jnp.sign(grads).sum(axis=0))
    np.testing.assert_array_equal(_deterministic_vote(grads, bad), true_majority)


@functools.partial(jax.jit, static_argnums=1)
def _deterministic_vote(grads, bad):
    return coding.election_vote(grads, coding.deterministic_code(5, 1), byzantine=(bad,))


def test_election_vote_writes_attack_rows_through_inject():
    # The attack sees only the Byzantine workers' own messages and its rows land at `byzantine`.
    seen = []

    def spy(own, *, f, key=None):
        seen.append((f, own.shape))
        return jnp.full_like(own, -1.0)

    G = coding.identity_code(5)
    g = jnp.array([[1.0], [1.0], [1.0], [-1.0], [-1.0]])
    vote = coding.election_vote(g, G, byzantine=(0, 1), attack=spy)
    assert seen == [(2, (2, 1))]
    np.testing.assert_array_equal(vote, [-1.0])  # -1 -1 +1 -1 -1


def test_deterministic_code_never_fails_and_uncoded_does():
    det = coding.vote_failures(coding.deterministic_code(5, 1), 1)
    assert det.exact and det.failures == 0 and det.trials == 32 * 5
    uncoded = coding.vote_failures(coding.identity_code(5), 1)
    assert uncoded.exact and uncoded.failures > 0


@pytest.mark.parametrize("G, b", [
    (coding.identity_code(5), 1), (coding.identity_code(5), 2),
    (coding.deterministic_code(5, 1), 2),
    (coding.bernoulli_code(7, 2.0, key=0), 2), (coding.bernoulli_code(6, 3.0, key=4), 1),
])
def test_vote_failures_exact_matches_brute_force(G, b):
    got = coding.vote_failures(G, b, method="exact")
    assert (got.failures, got.trials) == ref_vote_failures(G, b)


def test_vote_failures_monte_carlo_estimates_the_exact_rate():
    G = coding.bernoulli_code(9, 3.0, key=5)
    exact = coding.vote_failures(G, 3, method="exact")
    sampled = coding.vote_failures(G, 3, method="monte_carlo", samples=1 << 14, key=1)
    assert not sampled.exact
    assert abs(sampled.rate - exact.rate) < 0.02
    auto = coding.vote_failures(G, 3, max_exact=1 << 10, samples=1 << 14, key=1)
    assert auto == sampled


def test_bernoulli_codes_fail_less_as_redundancy_grows():
    n, b = 9, 2
    rates = [
        np.mean([coding.vote_failures(coding.bernoulli_code(n, r, key=s), b).rate
                 for s in range(6)])
        for r in (1.0, 3.0, 5.0)
    ]
    uncoded = coding.vote_failures(coding.identity_code(n), b).rate
    assert rates[0] > rates[1] > rates[2]
    assert uncoded > rates[1]


def test_redundancy_and_bernoulli_draws():
    G = coding.bernoulli_code(15, 3.0, key=7)
    assert G.min(initial=1) >= 0 and (G.sum(axis=1) > 0).all()
    assert coding.redundancy(G).r == G.sum() / 15
    assert coding.redundancy(coding.identity_code(4), batch_ratio=0.5) == (1.0, 0.5)
    np.testing.assert_array_equal(coding.bernoulli_code(15, 3.0, key=7), G)


@pytest.mark.parametrize("n, r, f", [(9, 3, 3), (12, 3, 4), (10, 5, 4), (8, 2, 3)])
def test_detox_vote_failures_exact_matches_enumeration(n, r, f):
    got = coding.detox_vote_failures(n, r, f)
    expected_bad, expected_any = ref_bad_groups(n, r, f)
    assert got.exact and got.worst_case == min(f // math.ceil(r / 2), n // r)
    np.testing.assert_allclose([got.expected, got.prob_any], [expected_bad, expected_any],
                               rtol=1e-12)


def test_detox_vote_failures_monte_carlo_estimates_the_exact_values():
    exact = coding.detox_vote_failures(45, 3, 5)
    sampled = coding.detox_vote_failures(45, 3, 5, method="monte_carlo", samples=1 << 14, key=2)
    assert not sampled.exact and sampled.worst_case == exact.worst_case == 2
    np.testing.assert_allclose([sampled.expected, sampled.prob_any],
                               [exact.expected, exact.prob_any], atol=0.03)


# ---------------------------------------------------------------------------------------------
# Transforms: agree with the functions, compile once.


def _steps(tx, updates, steps=3):
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), updates)
    state = tx.init(params)
    chex.clear_trace_counter()  # counters are per function source, shared by every transform
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    outs = []
    for _ in range(steps):
        out, state = update(updates, state, params)
        outs.append(out)
    return outs, update, state, params


def _step_keys(seed, steps):
    """The per-step keys ``aggregate`` splits from its key."""
    carry, keys = jax.random.key(seed), []
    for _ in range(steps):
        carry, step = jax.random.split(carry)
        keys.append(step)
    return keys


@pytest.mark.parametrize("key", [None, 11])
def test_detox_transform_agrees_with_function(key):
    x = grouped_updates(3, 18, 3, (0, 1), collude=True)
    shuffle = key is not None
    tx = coding_transforms.detox_aggregate(f=2, r=3, shuffle=shuffle, key=key)
    outs, update, state, params = _steps(tx, x)
    keys = _step_keys(key, 3) if shuffle else [None] * 3
    function = jitted(coding.detox, f=2, r=3, shuffle=shuffle)
    for out, step_key in zip(outs, keys):
        chex.assert_trees_all_equal(out, function(x, key=step_key))
    update(x, state, params)  # no new trace (assert_max_traces)


def test_detox_transform_declares_its_rule_and_checks_the_key():
    with pytest.raises(ValueError, match=r"detox_aggregate: stage 2 \(stage2='median_of_means', "
                                         r"shuffle=None\) draws at random and needs key="):
        coding_transforms.detox_aggregate(f=2, r=3)
    with pytest.raises(ValueError, match=r"detox_aggregate: .*shuffle=False\) draws nothing at "
                                         r"random; drop key=0"):
        coding_transforms.detox_aggregate(f=2, r=3, shuffle=False, key=0)
    with pytest.raises(ValueError, match=r"detox_aggregate: unknown fallback 'first'"):
        coding_transforms.detox_aggregate(f=2, r=3, fallback="first", key=0)
    with pytest.raises(ValueError, match=r"detox: unknown stage2 'krum'"):
        coding_transforms.detox_aggregate(f=2, r=3, stage2="krum", key=0)


def test_repetition_transform_agrees_with_function():
    x = grouped_updates(4, 9, 3, (0,), hostile=np.inf)
    outs, *_ = _steps(coding_transforms.repetition_aggregate(f=1), x, steps=1)
    chex.assert_trees_all_equal(outs[0], jitted(coding.repetition_code, f=1)(x))
    assert coding.repetition_code.spec.hparams == {"f": spec.REQUIRED, "r": None,
                                                    "fallback": "median"}
    with pytest.raises(ValueError, match=r"repetition_aggregate: unknown fallback"):
        coding_transforms.repetition_aggregate(f=1, fallback="first")


def test_election_transform_agrees_with_function_and_chains():
    G = coding.bernoulli_code(9, 3.0, key=3)
    rng = np.random.default_rng(0)
    grads = {name: jnp.asarray(rng.normal(size=(9,) + s), jnp.float32)
             for name, s in SHAPES.items()}
    tx = coding_transforms.election_vote_aggregate(G, byzantine=(1, 5), attack="sign_random",
                                                   key=2)
    outs, *_ = _steps(tx, grads, steps=2)
    vote = jax.jit(lambda g, key: coding.election_vote(g, G, byzantine=(1, 5),
                                                       attack="sign_random", key=key))
    for out, step in zip(outs, _step_keys(2, 2)):
        chex.assert_trees_all_equal(out, vote(grads, step))
    chain = optax.chain(coding_transforms.election_vote_aggregate(G, byzantine=(0,)),
                        optax.sgd(0.1, momentum=0.9))
    params = jax.tree.map(lambda x: x[0], grads)
    updates, _ = jax.jit(chain.update)(grads, chain.init(params), params)
    voted = jax.jit(lambda g: coding.election_vote(g, G, byzantine=(0,)))(grads)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda v: -0.1 * v, voted))


def test_election_transform_key_follows_the_attack_declaration():
    @spec.declare("attack", register=False)
    def negate(own, *, f: int):
        return jax.tree.map(jnp.negative, own)

    @spec.declare("attack", register=False, key=True)
    def coin(own, *, f: int, key):
        return jax.tree.map(lambda x: jnp.where(jax.random.bernoulli(key, 0.5, x.shape), 1.0,
                                                -1.0).astype(x.dtype), own)

    G = coding.identity_code(5)
    with pytest.raises(ValueError, match=r"election_vote_aggregate: the attack 'negate' draws "
                                         r"nothing at random; drop key=0"):
        coding_transforms.election_vote_aggregate(G, byzantine=(1,), attack=negate, key=0)
    with pytest.raises(ValueError, match=r"election_vote_aggregate: the attack 'coin' draws at "
                                         r"random and needs key="):
        coding_transforms.election_vote_aggregate(G, byzantine=(1,), attack=coin)
    with pytest.raises(ValueError, match=r"the vote with no attack draws nothing at random"):
        coding_transforms.election_vote_aggregate(G, key=0)
    tx = coding_transforms.election_vote_aggregate(G, byzantine=(1,), attack=coin, key=3)
    g = jnp.ones((5, 4))
    out, _ = tx.update(g, tx.init(None))
    np.testing.assert_array_equal(out, jnp.ones(4))  # 4 honest +1 against one coin


# ---------------------------------------------------------------------------------------------
# Bad input.


def _stateful_stage2(updates, *, f: int, center):
    return center


_stateful_stage2 = spec.declare("aggregator", register=False,
                                state=spec.State("center"))(_stateful_stage2)


@pytest.mark.parametrize("call, match", [
    (lambda x: coding.detox(x, f=1, r=4), r"detox: .*r to divide .* n=18, r=4"),
    (lambda x: coding.detox(x, f=1.5, r=3), r"detox: f must be a Python int"),
    (lambda x: coding.detox(x, f=18, r=3), r"detox: needs 0 <= f < n; got n=18, f=18"),
    (lambda x: coding.detox(x, f=6, r=3, key=0), r"detox: median_of_means needs .* f_eff=3"),
    (lambda x: coding.detox(x, f=2, r=3, buckets=2, key=0), r"median_of_means needs .* k=2"),
    (lambda x: coding.detox(x, f=4, r=3, stage2="bulyan"), r"detox: bulyan needs n/r >= 4 f_eff"),
    (lambda x: coding.detox(x, f=1, r=3, stage2="bulyan", buckets=2),
     r"detox: the bulyan stage 2 runs on all winners"),
    (lambda x: coding.detox(x, f=2, r=3, stage2="multi_krum", key=0),
     r"detox: multi_krum needs every"),
    (lambda x: coding.detox(x, f=2, r=3, stage2="krum"), r"detox: unknown stage2 'krum'"),
    (lambda x: coding.detox(x, f=2, r=3, stage2=42), r"detox: unknown stage2 42"),
    (lambda x: coding.detox(x, f=2, r=3), r"detox: stage 2 \(hierarchical\) draws at random .* "
                                          r"needs a key.*or pass shuffle=False"),
    (lambda x: coding.detox(x, f=2, r=3, shuffle=False, key=0),
     r"detox: stage 2 \(hierarchical\) draws nothing at random \(no shuffle\); drop key=0"),
    (lambda x: coding.detox(x, f=2, r=3, stage2=MOM(buckets=2)),
     r"needs a key.*or build it with hierarchical\(..., shuffle=False\)"),
    (lambda x: coding.detox(x, f=2, r=3, stage2=MOM(buckets=2), shuffle=False),
     r"detox: shuffle=False applies to the preset stage 2s"),
    (lambda x: coding.detox(x, f=2, r=3, stage2=MOM(buckets=2, shuffle=False), buckets=3),
     r"detox: buckets=3 sets the presets' bucket count"),
    (lambda x: coding.detox(x, f=2, r=3, stage2=_stateful_stage2),
     r"detox: the stage2 rule _stateful_stage2 keeps state"),
    (lambda x: coding.detox(x, f=2, r=3, shuffle=1), r"detox: shuffle must be None, True or"),
    (lambda x: coding.group_vote(x, r=3, fallback="first"), r"group_vote: unknown fallback"),
    (lambda x: coding.repetition_code(x, f=2, r=3), r"repetition_code: needs group size r >= 2f"),
    (lambda x: coding.repetition_code(x, f=1, r=4), r"repetition_code: .*r to divide"),
])
def test_group_codes_bad_input(call, match):
    x = grouped_updates(0, 18, 3, ())
    with pytest.raises(ValueError, match=match):
        call(x)


def test_group_vote_mismatched_workers():
    with pytest.raises(ValueError, match="group_vote: leaves disagree on the worker count"):
        coding.group_vote({"a": jnp.zeros((6, 2)), "b": jnp.zeros((3,))}, r=3)


@pytest.mark.parametrize("call, match", [
    (lambda: coding.deterministic_code(7, 2), r"deterministic_code: only \(n, b\) in \[\(5, 1\)\]"),
    (lambda: coding.vote_failures(coding.identity_code(5), 6), r"vote_failures: needs 0 <= b <= n"),
    (lambda: coding.vote_failures(coding.identity_code(5), -1), r"vote_failures: b must be >= 0"),
    (lambda: coding.vote_failures(np.array([[1, 0], [0, 0]]), 1), r"rows \[1\] of G are empty"),
    (lambda: coding.vote_failures(np.ones(5), 1), r"vote_failures: G must be a non-empty"),
    (lambda: coding.vote_failures(np.full((2, 2), 2), 1), r"G must hold only 0 and 1"),
    (lambda: coding.vote_failures(coding.identity_code(5), 1, method="monte_carlo"),
     r"vote_failures: the Monte Carlo estimate \(method='monte_carlo'\) .* needs key="),
    (lambda: coding.vote_failures(coding.identity_code(5), 1, max_exact=4),
     r"vote_failures: the Monte Carlo estimate \(method='auto', 2\^k C\(n, b\) = 160 > "
     r"max_exact = 4\)"),
    (lambda: coding.vote_failures(coding.identity_code(5), 1, method="exact", key=0),
     r"vote_failures: method='exact' enumerates and draws nothing; drop key=0"),
    (lambda: coding.detox_vote_failures(9, 3, 2, method="monte_carlo"),
     r"detox_vote_failures: the Monte Carlo estimate .* needs key="),
    (lambda: coding.detox_vote_failures(9, 3, 2, key=1), r"detox_vote_failures: method='exact'"),
    (lambda: coding.election_vote(jnp.ones((4, 3)), coding.identity_code(5)),
     r"election_vote: G has 5 columns but the updates hold 4 partitions"),
    (lambda: coding.election_vote(jnp.ones((5, 3)), coding.identity_code(5), byzantine=(5,)),
     r"election_vote: byzantine must list distinct worker indices in \[0, 5\)"),
    (lambda: coding.election_vote(jnp.ones((5, 3)), coding.identity_code(5), byzantine=(1,),
                                  attack="flip"), r"unknown attack 'flip'"),
    (lambda: coding.bernoulli_code(5, 0.0, key=0), r"bernoulli_code: needs 0 < r <= n"),
    (lambda: coding.bernoulli_code(5, 2.0, key=None), r"bernoulli_code: needs a random key"),
    (lambda: coding.detox_vote_failures(10, 3, 2), r"detox_vote_failures: .*r to divide"),
    (lambda: coding.redundancy(coding.identity_code(3), batch_ratio=0.0), r"needs batch_ratio"),
])
def test_election_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_election_vote_traced_code_is_rejected():
    with pytest.raises(ValueError, match="G must be concrete"):
        jax.jit(lambda G: coding.election_vote(jnp.ones((2, 3)), G))(jnp.eye(2))


def test_public_names_of_rbyz_coding_keep_working():
    for name in ("group_assignment", "group_vote", "repetition_code", "plain", "hierarchical",
                 "effective_byzantine_groups", "detox", "identity_code", "bernoulli_code",
                 "deterministic_code", "Redundancy", "redundancy", "local_majorities",
                 "election_vote", "VoteFailures", "vote_failures", "GroupVoteFailures",
                 "detox_vote_failures", "Stage2", "FALLBACKS", "STAGE2_PRESETS"):
        assert name in coding.__all__ and hasattr(coding, name), name


def test_coding_transforms_keep_their_old_names():
    assert coding.detox_aggregate is coding_transforms.detox_aggregate
    assert coding.repetition_aggregate is coding_transforms.repetition_aggregate
    assert coding.election_vote_aggregate is coding_transforms.election_vote_aggregate
