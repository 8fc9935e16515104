"""Tests for rbyz.coding: DETOX, DRACO's repetition code, Election Coding and their analysis."""

from __future__ import annotations

import functools
import itertools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import rbyz.aggregators
import rbyz.attacks
from rbyz import coding

SHAPES = {"w": (3, 4), "b": (5,)}
HOSTILE = (np.nan, np.inf, -np.inf, 1e30)


# ---------------------------------------------------------------------------------------------
# NumPy references, float64, written plainly.


def ref_median(values):
    values = np.where(np.isnan(values), np.inf, values)
    s = np.sort(values, axis=0)
    n = len(s)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def ref_group_vote(leaves, r, fallback):
    """leaves: list of float64 arrays [n, ...] -> list of [n/r, ...]."""
    n = leaves[0].shape[0]
    out = [[] for _ in leaves]
    for g in range(n // r):
        idx = list(range(g * r, g * r + r))

        def same(a, b):
            return all(np.array_equal(x[a], x[b]) for x in leaves)

        if fallback == "boyer_moore":
            cand, count = idx[0], 1
            for a in idx[1:]:
                if count == 0:
                    cand, count = a, 1
                elif same(cand, a):
                    count += 1
                else:
                    count -= 1
            picks = [x[cand] for x in leaves]
        else:
            votes = [sum(same(a, b) for b in idx) for a in idx]
            winners = [a for a, v in zip(idx, votes) if v >= r // 2 + 1]
            if winners:
                picks = [x[winners[0]] for x in leaves]
            else:
                picks = [ref_median(x[idx]) for x in leaves]
        for o, p in zip(out, picks):
            o.append(p)
    return [np.stack(o) for o in out]


def ref_mom(leaves, buckets):
    results = []
    for x in leaves:
        means = [np.mean(b, axis=0) for b in np.array_split(x, buckets)]
        results.append(ref_median(np.stack(means)))
    return results


def ref_election_vote(S, G, byzantine, attack):
    """S: [k, d] partition gradients; reference loops of the paper's code."""
    n, k = G.shape
    messages = np.zeros((n, S.shape[1]))
    for j in range(n):
        total = np.zeros(S.shape[1])
        for i in range(k):
            if G[j, i]:
                total += np.sign(S[i])
        messages[j] = np.sign(total)
    for j in byzantine:
        messages[j] = -messages[j] if attack == "reverse" else -1.0
    return np.sign(messages.sum(axis=0))


def ref_vote_failures(G, b):
    n, k = G.shape
    failures = trials = 0
    for pattern in itertools.product((-1.0, 1.0), repeat=k):
        s = np.array(pattern)
        mu = np.sign(s.sum())
        if mu == 0:
            continue
        honest = np.sign(G @ s)
        for bad in itertools.combinations(range(n), b):
            m = honest.copy()
            m[list(bad)] = -mu
            trials += 1
            failures += np.sign(m.sum()) != mu
    return failures, trials


def ref_bad_groups(n, r, f):
    groups = np.arange(n) // r
    bad_counts = []
    for placement in itertools.combinations(range(n), f):
        per_group = np.bincount(groups[list(placement)], minlength=n // r)
        bad_counts.append(int(np.sum(per_group >= math.ceil(r / 2))))
    return np.mean(bad_counts), np.mean(np.array(bad_counts) > 0)


# ---------------------------------------------------------------------------------------------
# Inputs.


def grouped_updates(seed, n, r, byzantine, dtype=jnp.float32, hostile=None, collude=False):
    """Honest members of a group share one update; ``byzantine`` workers send random (or
    ``hostile``) values, identical to each other when ``collude``."""
    rng = np.random.default_rng(seed)
    tree = {}
    for name, shape in SHAPES.items():
        per_group = rng.normal(size=(n // r,) + shape)
        x = np.repeat(per_group, r, axis=0)
        attack = rng.normal(size=shape) * 50
        for j in byzantine:
            x[j] = hostile if hostile is not None else (
                attack if collude else rng.normal(size=shape) * 50)
        tree[name] = jnp.asarray(x, dtype)
    return tree


def as_f64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_tree_close(actual, expected, dtype):
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for a, e in zip(jax.tree.leaves(actual), expected):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, **tol)


@functools.cache
def jitted(fn, **static):
    return jax.jit(functools.partial(fn, **static))


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
    expected = ref_group_vote(as_f64(x), r, fallback)
    for a, e in zip(jax.tree.leaves(got), expected):
        assert a.dtype == dtype
        # The vote copies a member exactly; a median fallback averages in f32.
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=1e-2 if dtype ==
                                   jnp.bfloat16 else 1e-6)


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("r", [3, 5])
def test_vote_removes_every_byzantine_vector_below_half(r, hostile):
    n = 5 * r
    minority = (r - 1) // 2
    byzantine = [g * r + a for g in range(5) for a in range(minority)]
    x = grouped_updates(r, n, r, byzantine, hostile=hostile)
    honest = grouped_updates(r, n, r, ())
    got = jitted(coding.group_vote, r=r)(x)
    expected = jax.tree.map(lambda h: h[::r], honest)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, e)


@settings(max_examples=10)
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
    expected = [np.mean(h[::size], axis=0) for h in as_f64(honest)]
    assert_tree_close(got, expected, dtype)


# ---------------------------------------------------------------------------------------------
# DETOX.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, r, f, buckets, byzantine", [
    (45, 3, 5, None, (0, 1, 3, 4, 9)),   # paper setting: groups 0 and 1 lost, k = 5
    (18, 3, 2, 3, (6, 7)),
    (20, 5, 3, 4, (0, 1, 2)),
    (12, 3, 0, None, ()),
])
def test_detox_median_of_means_matches_reference(n, r, f, buckets, byzantine, dtype):
    x = grouped_updates(n * f + r, n, r, byzantine, dtype, collude=True)
    got = jitted(coding.detox, f=f, r=r, buckets=buckets)(x)
    f_eff = f // math.ceil(r / 2)
    groups = n // r
    k = buckets or min(d for d in range(1, groups + 1) if groups % d == 0 and d >= 2 * f_eff + 1)
    expected = ref_mom(ref_group_vote(as_f64(x), r, "median"), k)
    assert_tree_close(got, expected, dtype)


def test_detox_key_permutes_winners_before_bucketing():
    n, r, f = 18, 3, 2
    x = grouped_updates(0, n, r, (0, 1), collude=True)
    key = jax.random.key(3)
    got = jitted(coding.detox, f=f, r=r)(x, key=key)
    perm = np.asarray(jax.random.permutation(key, n // r))
    winners = [w[perm] for w in ref_group_vote(as_f64(x), r, "median")]
    assert_tree_close(got, ref_mom(winners, 3), jnp.float32)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_detox_stage2_handles_the_groups_the_adversary_wins(hostile):
    # f = 5, r = 3: the adversary wins f_eff = 2 groups; the output stays in the honest range.
    n, r = 45, 3
    x = grouped_updates(1, n, r, (0, 1, 3, 4, 6), hostile=hostile)
    honest = grouped_updates(1, n, r, ())
    got = jitted(coding.detox, f=5, r=r)(x)
    for a, h in zip(jax.tree.leaves(got), jax.tree.leaves(honest)):
        assert bool(jnp.all(jnp.isfinite(a)))
        assert bool(jnp.all((a >= h.min(axis=0)) & (a <= h.max(axis=0))))


def test_detox_multi_krum_matches_reference():
    n, r, f = 45, 3, 5
    x = grouped_updates(5, n, r, (0, 1, 3, 4, 9), collude=True)
    got = jitted(coding.detox, f=f, r=r, stage2="multi_krum")(x)
    winners = ref_group_vote(as_f64(x), r, "median")
    f_eff = 2
    halves = [np.array_split(np.arange(15), 2)[i] for i in range(2)]
    for leaf_index, a in enumerate(jax.tree.leaves(got)):
        # Multi-Krum selects on the whole update (all leaves), so select per bucket first.
        flat = np.concatenate([w.reshape(15, -1) for w in winners], axis=1)
        outs = []
        for idx in halves:
            m = len(idx) - f_eff - 2
            picked = ref_multi_krum_rows(flat[idx], f_eff, m)
            outs.append(np.mean(winners[leaf_index][idx][picked], axis=0))
        np.testing.assert_allclose(np.asarray(a), np.mean(outs, axis=0), rtol=1e-5, atol=1e-5)


def ref_multi_krum_rows(flat, f, m):
    n = len(flat)
    dist = np.array([[np.sum((flat[i] - flat[j]) ** 2) for j in range(n)] for i in range(n)])
    scores = [np.sum(np.sort(np.delete(dist[i], i))[:n - f - 2]) for i in range(n)]
    return np.argsort(scores, kind="stable")[:m]


def test_detox_bulyan_runs_library_bulyan_on_winners():
    n, r, f = 21, 3, 3  # 7 groups, f_eff = 1: Bulyan's n >= 4f + 3 holds exactly
    x = grouped_updates(6, n, r, (0, 1, 3), collude=True)
    got = jitted(coding.detox, f=f, r=r, stage2="bulyan")(x)
    winners = jitted(coding.group_vote, r=r)(x)
    expected = jitted(rbyz.aggregators.bulyan, f=1)(winners)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-6)


def test_detox_custom_hierarchical_stage2():
    x = grouped_updates(2, 18, 3, (0, 1), collude=True)
    stage2 = coding.hierarchical(rbyz.aggregators.median, coding.plain(rbyz.aggregators.mean),
                                 buckets=2)
    got = jax.jit(lambda u: coding.detox(u, f=2, r=3, stage2=stage2))(x)
    winners = ref_group_vote(as_f64(x), 3, "median")
    expected = [np.mean([ref_median(b) for b in np.array_split(w, 2)], axis=0) for w in winners]
    assert_tree_close(got, expected, jnp.float32)


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
    vote = jax.jit(lambda g: coding.election_vote(g, G, byzantine=byzantine, attack=attack))
    got = vote(grads)
    for a, x in zip(jax.tree.leaves(got), as_f64(grads)):
        assert a.dtype == dtype
        expected = ref_election_vote(x.reshape(k, -1), G, byzantine,
                                     "reverse" if attack == "sign_reverse" else "directional")
        np.testing.assert_array_equal(np.asarray(a, np.float64).reshape(-1), expected)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16))
def test_election_vote_property_deterministic_code_never_flips(seed):
    rng = np.random.default_rng(seed)
    grads = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    bad = int(rng.integers(5))
    true_majority = jnp.sign(jnp.sign(grads).sum(axis=0))
    got = _deterministic_vote(grads, bad)
    np.testing.assert_array_equal(got, true_majority)


@functools.partial(jax.jit, static_argnums=1)
def _deterministic_vote(grads, bad):
    return coding.election_vote(grads, coding.deterministic_code(5, 1), byzantine=(bad,))


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
    update = jax.jit(tx.update)
    outs = []
    for _ in range(steps):
        out, state = update(updates, state, params)
        outs.append(out)
    return outs, update, state, params


@pytest.mark.parametrize("key", [None, 11])
def test_detox_transform_agrees_with_function(key):
    x = grouped_updates(3, 18, 3, (0, 1), collude=True)
    outs, update, state, params = _steps(coding.detox_aggregate(f=2, r=3, key=key), x)
    keys = [None] * 3
    if key is not None:
        k = jax.random.key(key)
        keys = []
        for _ in range(3):
            k, step = jax.random.split(k)
            keys.append(step)
    function = jitted(coding.detox, f=2, r=3)
    for out, step_key in zip(outs, keys):
        expected = function(x, key=step_key)
        for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, e)
    with jax.log_compiles():
        import logging
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger("jax")
        logger.addHandler(handler)
        try:
            update(x, state, params)
        finally:
            logger.removeHandler(handler)
    assert not [r for r in records if "Compiling" in r.getMessage()]


def test_repetition_transform_agrees_with_function():
    x = grouped_updates(4, 9, 3, (0,), hostile=np.inf)
    outs, *_ = _steps(coding.repetition_aggregate(f=1), x, steps=1)
    expected = jitted(coding.repetition_code, f=1)(x)
    for a, e in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, e)


def test_election_transform_agrees_with_function_and_chains():
    G = coding.bernoulli_code(9, 3.0, key=3)
    rng = np.random.default_rng(0)
    grads = {name: jnp.asarray(rng.normal(size=(9,) + s), jnp.float32)
             for name, s in SHAPES.items()}
    tx = coding.election_vote_aggregate(G, byzantine=(1, 5), attack="sign_random", key=2)
    outs, *_ = _steps(tx, grads, steps=2)
    k = jax.random.key(2)
    vote = jax.jit(lambda g, key: coding.election_vote(g, G, byzantine=(1, 5),
                                                       attack="sign_random", key=key))
    for out in outs:
        k, step = jax.random.split(k)
        expected = vote(grads, step)
        for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, e)
    chain = optax.chain(coding.election_vote_aggregate(G, byzantine=(0,)),
                        optax.sgd(0.1, momentum=0.9))
    params = jax.tree.map(lambda x: x[0], grads)
    updates, _ = jax.jit(chain.update)(grads, chain.init(params), params)
    vote = jax.jit(lambda g: coding.election_vote(g, G, byzantine=(0,)))(grads)
    for u, v in zip(jax.tree.leaves(updates), jax.tree.leaves(vote)):
        np.testing.assert_allclose(u, -0.1 * v)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("call, match", [
    (lambda x: coding.detox(x, f=1, r=4), r"detox: .*r to divide .* n=18, r=4"),
    (lambda x: coding.detox(x, f=1.5, r=3), r"detox: f must be a Python int"),
    (lambda x: coding.detox(x, f=18, r=3), r"detox: needs 0 <= f < n; got n=18, f=18"),
    (lambda x: coding.detox(x, f=6, r=3), r"detox: median_of_means needs .* f_eff=3"),
    (lambda x: coding.detox(x, f=2, r=3, buckets=2), r"median_of_means needs .* k=2"),
    (lambda x: coding.detox(x, f=4, r=3, stage2="bulyan"), r"detox: bulyan needs n/r >= 4 f_eff"),
    (lambda x: coding.detox(x, f=2, r=3, stage2="multi_krum"), r"detox: multi_krum needs every"),
    (lambda x: coding.detox(x, f=2, r=3, stage2="krum"), r"detox: unknown stage2 'krum'"),
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
    (lambda: coding.election_vote(jnp.ones((4, 3)), coding.identity_code(5)),
     r"election_vote: G has 5 columns but the updates hold 4 partitions"),
    (lambda: coding.election_vote(jnp.ones((5, 3)), coding.identity_code(5), byzantine=(5,)),
     r"election_vote: byzantine must list distinct worker indices in \[0, 5\)"),
    (lambda: coding.election_vote(jnp.ones((5, 3)), coding.identity_code(5), byzantine=(1,),
                                  attack="flip"), r"unknown attack 'flip'"),
    (lambda: coding.bernoulli_code(5, 0.0, key=0), r"bernoulli_code: needs 0 < r <= n"),
    (lambda: coding.detox_vote_failures(10, 3, 2), r"detox_vote_failures: .*r to divide"),
    (lambda: coding.redundancy(coding.identity_code(3), batch_ratio=0.0), r"needs batch_ratio"),
])
def test_election_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_election_vote_traced_code_is_rejected():
    with pytest.raises(ValueError, match="G must be concrete"):
        jax.jit(lambda G: coding.election_vote(jnp.ones((2, 3)), G))(jnp.eye(2))
