"""rbyz.privacy: per-example clipping, worker noise, the plan's sampler, central noise."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbyz import aggregators, privacy, transforms
from rbyz.privacy import clipping

pytest.importorskip("dp_accounting")


def squared_loss(params, x, y):
    """A batch's mean squared error of the linear model ``x @ w + b``."""
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def numpy_clipped_mean(params, x, y, mask, clip, normalize_by, norm="l2"):
    """The float64 reference: each example's gradient by hand, clipped, masked, summed, / B."""
    w, b = np.asarray(params["w"], np.float64), float(params["b"])
    total_w, total_b = np.zeros_like(w), 0.0
    for xj, yj, keep in zip(np.asarray(x, np.float64), np.asarray(y, np.float64), mask):
        residual = xj @ w + b - yj
        gw, gb = 2.0 * residual * xj, 2.0 * residual
        size = (np.sum(np.abs(gw)) + abs(gb) if norm == "l1"
                else np.sqrt(np.sum(gw ** 2) + gb ** 2))
        scale = min(1.0, clip / size) if size > 0 else 1.0
        if keep:
            total_w += scale * gw
            total_b += scale * gb
    return total_w / normalize_by, total_b / normalize_by


def tree_norm(tree, norm="l2"):
    leaves = [np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)]
    flat = np.concatenate(leaves)
    return np.sum(np.abs(flat)) if norm == "l1" else np.sqrt(np.sum(flat ** 2))


# ------------------------------------------------------------------------------------------------
# Clipping.

@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 12),
                  elements=st.floats(-2.0 ** 100, 2.0 ** 100, width=32)
                  | st.sampled_from([np.nan, np.inf])),
       hnp.arrays(np.float32, (3,), elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)),
       st.floats(1e-3, 1e3), st.sampled_from(["l2", "l1"]))
def test_every_clipped_tree_has_norm_at_most_c(a, b, clip, norm):
    out = clipping.clip_tree({"a": jnp.asarray(a), "b": jnp.asarray(b)}, clip, norm)
    size = tree_norm(out, norm)
    assert np.isfinite(size) and size <= clip * (1 + 1e-5)
    if np.all(np.isfinite(a)) and tree_norm({"a": a, "b": b}, norm) <= clip * 0.999:
        np.testing.assert_allclose(out["a"], a, rtol=1e-6)  # a small gradient is left as it is


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("microbatch", [0, 3])
def test_clipped_mean_matches_a_float64_reference(norm, microbatch):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=4), jnp.float32), "b": jnp.float32(0.3)}
    x = jnp.asarray(rng.normal(size=(7, 4)) * rng.choice([0.1, 10.0], size=(7, 1)), jnp.float32)
    y = jnp.asarray(rng.normal(size=7), jnp.float32)
    mask = np.array([True, True, False, True, True, False, True])
    grad_fn = privacy.clipped_grad(squared_loss, clip=1.5, normalize_by=5, norm=norm,
                                   microbatch=microbatch)
    loss, g = jax.jit(grad_fn)(params, x, y, jnp.asarray(mask))
    want_w, want_b = numpy_clipped_mean(params, x, y, mask, 1.5, 5, norm)
    np.testing.assert_allclose(g["w"], want_w, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(g["b"], want_b, rtol=2e-5, atol=1e-6)
    residual = np.asarray(x) @ np.asarray(params["w"]) + 0.3 - np.asarray(y)
    np.testing.assert_allclose(loss, np.mean(residual[mask] ** 2), rtol=1e-5)


def test_a_non_finite_example_gradient_is_dropped():
    params = {"w": jnp.ones(2), "b": jnp.float32(0.0)}
    x = jnp.array([[1.0, 0.0], [jnp.nan, 1.0]])
    _, g = privacy.clipped_grad(squared_loss, clip=10.0, normalize_by=2)(params, x, jnp.zeros(2))
    np.testing.assert_allclose(g["w"], [1.0, 0.0])  # (2 * 1 * [1, 0]) / 2; the NaN row counts 0


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_the_reported_sensitivity_is_reached_by_worst_case_neighbours(norm):
    """Adding one example with a huge gradient moves g by C / B exactly; replacing one huge
    example by its opposite moves it by 2 C / B: the bound is tight, and it holds for random
    neighbours."""
    clip, batch = 2.0, 4
    grad_fn = privacy.clipped_grad(squared_loss, clip=clip, normalize_by=batch, norm=norm)
    params = {"w": jnp.zeros(3), "b": jnp.float32(0.0)}
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=4), jnp.float32)
    far = jnp.array([[1.0, 0.0, 0.0]])

    def g(xs, ys, mask):
        return grad_fn(params, xs, ys, jnp.asarray(mask))[1]

    def distance(a, b):
        return tree_norm(jax.tree.map(lambda u, v: np.asarray(u, np.float64) - v, a, b), norm)

    # Add or remove: the same slots, the extra example masked out in one of the two.
    xs, ys = jnp.concatenate([x, far]), jnp.concatenate([y, jnp.array([1e4])])
    removed, added = g(xs, ys, [1, 1, 1, 1, 0]), g(xs, ys, [1, 1, 1, 1, 1])
    added_distance = distance(added, removed)
    np.testing.assert_allclose(added_distance, grad_fn.sensitivity("add_or_remove_one"),
                               rtol=1e-5)
    # Replace: one example's huge gradient replaced by the opposite one.
    ys_minus = ys.at[4].set(-1e4)
    replaced = distance(g(xs, ys, [1] * 5), g(xs, ys_minus, [1] * 5))
    np.testing.assert_allclose(replaced, grad_fn.sensitivity("replace_one"), rtol=1e-5)
    # Any replacement stays within the bound.
    for seed in range(20):
        other = np.random.default_rng(seed)
        x2 = x.at[seed % 4].set(jnp.asarray(other.normal(size=3) * 100, jnp.float32))
        y2 = y.at[seed % 4].set(float(other.normal() * 100))
        assert distance(g(x, y, [1] * 4), g(x2, y2, [1] * 4)) <= \
            grad_fn.sensitivity("replace_one") * (1 + 1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"clip": 0.0, "normalize_by": 4}, "clip must be a finite number > 0"),
    ({"clip": -1.0, "normalize_by": 4}, "clip must be a finite number > 0"),
    ({"clip": float("inf"), "normalize_by": 4}, "clip must be a finite number > 0"),
    ({"clip": 1.0, "normalize_by": 0}, "normalize_by must be a number > 0"),
    ({"clip": 1.0, "normalize_by": 4, "norm": "linf"}, "norm must be one of l2, l1"),
    ({"clip": 1.0, "normalize_by": 4, "microbatch": -1}, "microbatch must be an integer"),
])
def test_clipping_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        privacy.clipped_grad(squared_loss, **kwargs)
    with pytest.raises(ValueError, match="relation must be one of"):
        privacy.clipped_grad(squared_loss, clip=1.0, normalize_by=2).sensitivity("replace")


# ------------------------------------------------------------------------------------------------
# The plan: noise scale, sampling, bad input.

def plan(**kwargs) -> privacy.PrivacyPlan:
    base = dict(clip=1.0, batch_size=8, dataset_sizes=(40, 40, 30, 50), steps=100)
    return privacy.PrivacyPlan(**{**base, **kwargs})


def test_noise_multiplier_sets_b_as_z_c_over_b():
    p = plan(clip=2.0, batch_size=8).with_noise_multiplier(1.5)
    assert p.stddev == pytest.approx(1.5 * 2.0 / 8)
    np.testing.assert_allclose(p.noise_multipliers(), 1.5)
    replace = plan(clip=2.0, sampling="without_replacement", accountant="rdp")
    assert replace.sensitivities()[0] == pytest.approx(2 * 2.0 / 8)  # replace one: 2 C / B
    full = plan(sampling="full", batch_size=0).with_noise_multiplier(1.0)
    # The smallest worker (30 records) has the largest sensitivity; every z_i >= 1.
    assert full.stddev == pytest.approx(1.0 / 30)
    assert full.noise_multipliers().min() == pytest.approx(1.0)
    central = plan(at="server")
    assert central.sensitivities()[0] == pytest.approx(1.0 / 8 / 4)


@pytest.mark.parametrize("distribution, variance", [("gaussian", 1.0), ("laplace", 2.0)])
def test_worker_noise_is_independent_per_worker_has_the_planned_variance_and_is_seeded(
        distribution, variance):
    norm = "l1" if distribution == "laplace" else "l2"
    p = plan(noise=distribution, norm=norm, clip=0.5, batch_size=4).with_noise_multiplier(2.0)
    b = 2.0 * 0.5 / 4
    assert p.stddev == pytest.approx(b)
    d, n = 20_000, 4
    zeros = jnp.zeros((n, d))
    tx = p.worker_noise(key=3)
    state = tx.init(jnp.zeros(d))
    first, state = tx.update(zeros, state)
    second, _ = tx.update(zeros, state)
    noise = np.asarray(first, np.float64)
    # The sample variance of d draws has relative sd sqrt((kurtosis - 1) / d): 1% (Gaussian),
    # 1.6% (Laplace, kurtosis 6); 8% is five of them.
    np.testing.assert_allclose(noise.var(axis=1), variance * b ** 2, rtol=0.08)
    np.testing.assert_allclose(noise.mean(axis=1), 0.0, atol=5 * b / np.sqrt(d))
    corr = np.corrcoef(np.concatenate([noise, np.asarray(second)]))
    off_diagonal = corr[~np.eye(2 * n, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < 5 / np.sqrt(d)  # no two workers, or steps, share noise
    again, _ = p.worker_noise(key=3).update(zeros, p.worker_noise(key=3).init(jnp.zeros(d)))
    np.testing.assert_array_equal(first, again)  # the same seed gives the same numbers
    other, _ = p.worker_noise(key=4).update(zeros, p.worker_noise(key=4).init(jnp.zeros(d)))
    assert not np.allclose(first, other)


def test_laplace_noise_in_collective_mode_equals_stacked_mode():
    p = plan(noise="laplace", norm="l1", stddev=0.3)
    g = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
    stacked = p.worker_noise(key=1)
    want, _ = stacked.update(g, stacked.init(jnp.zeros(6)))
    per_shard = p.worker_noise(key=1, axis_name="workers")
    got, _ = jax.vmap(lambda row: per_shard.update(row, per_shard.init(jnp.zeros(6))),
                      axis_name="workers")(g)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def partition(sizes):
    width = max(sizes)
    start = np.cumsum([0, *sizes[:-1]])
    indices = np.stack([np.resize(np.arange(s) + o, width) for s, o in zip(sizes, start)])
    return jnp.asarray(indices, jnp.int32), jnp.asarray(sizes, jnp.int32)


def test_poisson_batches_have_the_expected_size_hold_own_distinct_records_and_truncate():
    sizes = (40, 40, 30, 50)
    indices, counts = partition(sizes)
    p = plan(dataset_sizes=sizes)
    assert p.capacity == int(np.ceil(8 + 5 * np.sqrt(8)))
    draws = [p.sample(jax.random.key(s), indices, counts) for s in range(400)]
    realised = np.array([np.asarray(mask).sum(1) for _, mask in draws])  # [draws, workers]
    np.testing.assert_allclose(realised.mean(0), 8.0, atol=0.5)
    # Binomial(N_i, B / N_i) variance, truncated at the capacity: below B (1 - B / N_i).
    assert np.all(realised.var(0) < 8 * (1 - 8 / np.array(sizes)) * 1.3)
    for idx, mask in draws[:50]:
        idx, mask = np.asarray(idx), np.asarray(mask)
        for i, (row, keep) in enumerate(zip(idx, mask)):
            chosen = row[keep]
            assert len(set(chosen)) == len(chosen)  # a record at most once per step
            assert set(chosen) <= set(np.asarray(indices[i, :sizes[i]]))
    small = plan(dataset_sizes=sizes, max_batch=5)
    realised = np.array([np.asarray(small.sample(jax.random.key(s), indices, counts)[1]).sum(1)
                         for s in range(50)])
    assert realised.max() == 5 and small.mechanism(0).max_batch == 5


def test_fixed_and_full_batches():
    sizes = (40, 40, 30, 50)
    indices, counts = partition(sizes)
    fixed = plan(dataset_sizes=sizes, sampling="without_replacement", accountant="rdp")
    idx, mask = fixed.sample(jax.random.key(0), indices, counts)
    assert idx.shape == (4, 8) and bool(mask.all())
    assert all(len(set(np.asarray(row))) == 8 for row in idx)
    full = plan(dataset_sizes=sizes, sampling="full", batch_size=0)
    idx, mask = full.sample(jax.random.key(0), indices, counts)
    assert np.asarray(mask).sum(1).tolist() == list(sizes)
    np.testing.assert_allclose(full.normalizers(), sizes)


def test_the_epsilon_follows_the_sampling_that_ran():
    """The plan's ε is the accountant's for the event it samples: truncated Poisson at its
    capacity, the whole shard with RDP (no truncated event there), Poisson otherwise."""
    p = plan(stddev=0.2)
    m = p.mechanism(0)
    assert (m.sampling, m.dataset_size, m.batch_size, m.max_batch) == ("poisson", 40, 8,
                                                                       p.capacity)
    assert m.noise_multiplier == pytest.approx(0.2 * 8)
    assert plan(stddev=0.2, accountant="rdp").capacity == 50
    assert plan(stddev=0.2, accountant="rdp").mechanism(0).max_batch == 0
    eps = p.epsilons()
    assert eps[2] == max(eps)  # the smallest worker samples at the highest rate
    assert p.epsilon() == pytest.approx(privacy.accounting.epsilon(p.mechanism(2), 1e-5))
    assert p.epsilon(steps=10) < p.epsilon()
    assert plan().epsilon() == np.inf  # no noise: no privacy
    target = plan().with_epsilon(2.0)
    assert target.epsilon() <= 2.0 + 1e-6 and target.epsilon() > 1.9


@pytest.mark.parametrize("kwargs, match", [
    ({"clip": 0.0}, "clip: must be a finite number > 0"),
    ({"delta": 0.0}, r"delta: must be in \(0, 1\)"),
    ({"delta": 1.0}, r"delta: must be in \(0, 1\)"),
    ({"batch_size": 41, "dataset_sizes": (40, 60)}, "larger than worker 0's data"),
    ({"noise": "laplace"}, "clip in L1"),
    ({"noise": "laplace", "norm": "l1", "accountant": "rdp"}, "accountant='pld'"),
    ({"sampling": "without_replacement"}, "rdp"),
    ({"sampling": "uniform"}, "sampling: must be one of"),
    ({"at": "client"}, "at: must be 'worker' or 'server'"),
    ({"max_batch": 4, "sampling": "full", "batch_size": 0}, "capacity of Poisson batches"),
])
def test_plan_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(**kwargs)


# ------------------------------------------------------------------------------------------------
# Central noise: the mean only.

@pytest.mark.parametrize("rule", ["median", "krum", aggregators.trimmed_mean, "geometric_median"])
def test_central_noise_refuses_rules_without_a_mean_sensitivity(rule):
    with pytest.raises(ValueError, match="cannot be sized like a mean's"):
        privacy.central_noise(rule, stddev=0.1, key=0)


def test_central_noise_adds_seeded_gaussian_noise_after_the_mean():
    tx = transforms.aggregate("mean")
    noise = privacy.central_noise(aggregators.mean, stddev=0.5, key=2)
    g = jnp.zeros((4, 10_000))
    mean, _ = tx.update(g, tx.init(jnp.zeros(10_000)))
    out, state = noise.update(mean, noise.init(mean))
    out2, _ = noise.update(mean, state)
    assert np.std(np.asarray(out)) == pytest.approx(0.5, rel=0.05)
    assert not np.allclose(out, out2)
    again, _ = noise.update(mean, privacy.central_noise("mean", stddev=0.5, key=2).init(mean))
    np.testing.assert_array_equal(out, again)


def test_accounting_is_per_distinct_worker():
    sizes = tuple(itertools.chain([30] * 3, [60] * 5))
    p = plan(dataset_sizes=sizes, stddev=0.2)
    eps = p.epsilons()
    assert len(set(eps[:3])) == 1 and len(set(eps[3:])) == 1 and eps[0] > eps[3]
