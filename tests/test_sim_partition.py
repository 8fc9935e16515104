"""rbyz.sim.partition: partitioners (NumPy checks of counts and class histograms), samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbyz.sim import partition as P


def rows(part):
    return [row[:size] for row, size in zip(part.indices, part.sizes)]


def check_partition(part, labels, expected_cover=None):
    """int32, sizes >= 1, padding from the row's own entries, disjoint, covers what it should."""
    assert part.indices.dtype == np.int32 and part.sizes.dtype == np.int32
    assert part.indices.shape == (len(part.sizes), part.sizes.max())
    assert (part.sizes >= 1).all()
    for row, size in zip(part.indices, part.sizes):
        assert set(row.tolist()) == set(row[:size].tolist())
        assert len(set(row[:size].tolist())) == size
    everything = np.concatenate(rows(part))
    assert len(np.unique(everything)) == len(everything), "workers overlap"
    cover = np.arange(len(labels)) if expected_cover is None else expected_cover
    np.testing.assert_array_equal(np.sort(everything), np.sort(cover))


def histograms(part, labels, classes):
    return np.array([np.bincount(labels[r], minlength=classes) for r in rows(part)])


LABELS = np.repeat(np.arange(10), 30)[np.random.default_rng(5).permutation(300)]


def test_iid():
    part = P.partition(LABELS, 7, "iid", seed=3)
    check_partition(part, LABELS)
    assert part.sizes.tolist() == [43] * 6 + [42]
    again = P.partition(LABELS, 7, "iid", seed=3)
    np.testing.assert_array_equal(part.indices, again.indices)
    assert not np.array_equal(part.indices, P.partition(LABELS, 7, "iid", seed=4).indices)


def test_sorted_matches_numpy_reference():
    part = P.partition(LABELS, 6, "sorted", seed=123)
    check_partition(part, LABELS)
    reference = np.array_split(np.argsort(LABELS, kind="stable"), 6)
    for got, ref in zip(rows(part), reference):
        np.testing.assert_array_equal(got, ref)
    hist = histograms(part, LABELS, 10)
    assert ((hist > 0).sum(1) <= 3).all()
    # Shards are contiguous in label order: a worker's labels never exceed the next worker's.
    assert all(LABELS[a].max() <= LABELS[b].min() for a, b in zip(rows(part), rows(part)[1:]))


def gamma_reference(labels, n, seed, gamma):
    """The ByzFL gamma-similarity construction, written plainly (sizes as documented)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    m = int(len(labels) * gamma)
    iid = np.array_split(order[:m], n)
    rest = sorted(order[m:].tolist(), key=lambda i: (labels[i], i))
    out, start = [], 0
    for i in range(n):
        target = len(labels) // n + (i < len(labels) % n)
        take = target - len(iid[i])
        out.append(np.concatenate([iid[i], np.array(rest[start:start + take], dtype=int)]))
        start += take
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 0.97, 1.0])
def test_gamma(gamma):
    part = P.partition(LABELS, 8, "gamma", seed=2, gamma=gamma)
    check_partition(part, LABELS)
    assert part.sizes.max() - part.sizes.min() <= 1
    for got, ref in zip(rows(part), gamma_reference(LABELS, 8, 2, gamma)):
        np.testing.assert_array_equal(got, ref)


def test_gamma_endpoints_and_monotone_heterogeneity():
    iid = P.partition(LABELS, 8, "iid", seed=2)
    np.testing.assert_array_equal(P.partition(LABELS, 8, "gamma", seed=2, gamma=1.0).indices,
                                  iid.indices)
    np.testing.assert_array_equal(P.partition(LABELS, 8, "gamma", seed=2, gamma=0.0).indices,
                                  P.partition(LABELS, 8, "sorted").indices)

    def dominance(g):
        hist = histograms(P.partition(LABELS, 8, "gamma", seed=2, gamma=g), LABELS, 10)
        return np.mean(hist.max(1) / hist.sum(1))

    assert dominance(0.0) > dominance(0.4) > dominance(0.8) > dominance(1.0) - 1e-12


def test_gamma_small_data_never_leaves_a_worker_empty():
    labels = np.array([0, 0, 1, 1, 2])
    for g in (0.0, 0.2, 0.5, 0.9, 1.0):
        check_partition(P.partition(labels, 5, "gamma", gamma=g), labels)


def test_dirichlet_histograms():
    labels = np.repeat(np.arange(10), 200)
    flat = P.partition(labels, 10, "dirichlet", alpha=1000.0, seed=0)
    check_partition(flat, labels)
    share = histograms(flat, labels, 10) / flat.sizes[:, None]
    np.testing.assert_allclose(share, 0.1, atol=0.05)
    # Every class is split over the workers in Dir(alpha) proportions: column sums are intact.
    np.testing.assert_array_equal(histograms(flat, labels, 10).sum(0), [200] * 10)
    skewed = P.partition(labels, 10, "dirichlet", alpha=0.05, seed=0)
    check_partition(skewed, labels)
    hist = histograms(skewed, labels, 10)
    assert np.mean(hist.max(1) / hist.sum(1)) > 0.6
    np.testing.assert_array_equal(
        P.partition(labels, 10, "dirichlet", alpha=0.05, seed=0).indices, skewed.indices)


def test_dirichlet_cuts_match_numpy_reference():
    """One draw, no redraw needed: the cuts are floor(cumsum(p) * |class|) of the shuffled class."""
    labels = np.repeat(np.arange(3), 50)
    part = P.partition(labels, 4, "dirichlet", alpha=5.0, seed=7)
    rng = np.random.default_rng(7)
    shares = rng.dirichlet(np.full(4, 5.0), size=3)
    expected = [[] for _ in range(4)]
    for c in range(3):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = [0] + [int(np.floor(s * 50)) for s in np.cumsum(shares[c])[:-1]] + [50]
        for w in range(4):
            expected[w].extend(idx[bounds[w]:bounds[w + 1]].tolist())
    for got, ref in zip(rows(part), expected):
        assert got.tolist() == sorted(ref)


def test_dirichlet_impossible_setting():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match=r"scheme='dirichlet'.*alpha=0\.001.*n=18.*larger alpha"):
        P.partition(labels, 18, "dirichlet", alpha=0.001)


def test_classes_disjoint_class_sets():
    part = P.partition(LABELS, 5, "classes", classes_per_worker=2, seed=1)
    check_partition(part, LABELS)
    for i, r in enumerate(rows(part)):
        assert sorted(set(LABELS[r].tolist())) == [2 * i, 2 * i + 1]
        assert len(r) == 60                                   # whole classes


def test_classes_fewer_workers_leave_classes_out():
    part = P.partition(LABELS, 3, "classes", classes_per_worker=2)
    check_partition(part, LABELS, expected_cover=np.flatnonzero(LABELS < 6))


def test_classes_shared_when_more_workers_than_classes():
    part = P.partition(LABELS, 20, "classes", classes_per_worker=1, seed=0)
    check_partition(part, LABELS)
    hist = histograms(part, LABELS, 10)
    for i in range(20):                      # workers i and i + 10 split class i % 10 in halves
        assert np.flatnonzero(hist[i]).tolist() == [i % 10] and hist[i, i % 10] == 15
    part = P.partition(LABELS, 7, "classes", classes_per_worker=3, seed=0)
    check_partition(part, LABELS)
    held = [set(LABELS[r].tolist()) for r in rows(part)]
    assert held[0] == {0, 1, 2} and held[3] == {9, 0, 1}
    assert all(len(h) == 3 for h in held)


def test_classes_errors():
    with pytest.raises(ValueError, match=r"classes_per_worker=11 exceeds the 10 classes"):
        P.partition(LABELS, 2, "classes", classes_per_worker=11)
    labels = np.array([0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"scheme='classes'.*worker\(s\) \[3\] get no examples"):
        P.partition(labels, 4, "classes")
    with pytest.raises(ValueError, match="classes_per_worker must be >= 1"):
        P.partition(LABELS, 2, "classes", classes_per_worker=0)


@pytest.mark.parametrize("scheme", P.SCHEMES)
def test_more_workers_than_examples(scheme):
    with pytest.raises(ValueError, match=rf"scheme='{scheme}'.*n=11 workers but only 10 examples"):
        P.partition(np.arange(10) % 3, 11, scheme)


@pytest.mark.parametrize("labels, n, scheme, kw, words", [
    (LABELS, 3, "random", {}, ("unknown scheme 'random'; choose one of iid, dirichlet, "
                               "classes, gamma, sorted")),
    (LABELS, 0, "iid", {}, "n must be >= 1"),
    (LABELS, 2.0, "iid", {}, "n must be a Python int"),
    (LABELS.astype(float), 3, "iid", {}, "1-D integer array"),
    (LABELS.reshape(30, 10), 3, "iid", {}, "1-D integer array"),
    (LABELS - 1, 3, "iid", {}, "labels must be >= 0"),
    (LABELS, 3, "dirichlet", {"alpha": 0.0}, "alpha must be a finite number > 0"),
    (LABELS, 3, "dirichlet", {"alpha": float("inf")}, "alpha must be"),
    (LABELS, 3, "gamma", {"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    (LABELS, 3, "gamma", {"gamma": -0.1}, r"gamma must be in \[0, 1\]"),
])
def test_bad_settings(labels, n, scheme, kw, words):
    with pytest.raises(ValueError, match=words):
        P.partition(labels, n, scheme, **kw)


def test_unused_parameters_are_ignored():
    a = P.partition(LABELS, 4, "iid", seed=1, alpha=-1.0, gamma=7.0, classes_per_worker=99)
    np.testing.assert_array_equal(a.indices, P.partition(LABELS, 4, "iid", seed=1).indices)


@given(st.data())
def test_property_disjoint_and_covering(draw):
    classes = draw.draw(st.integers(1, 6))
    labels = np.array(draw.draw(st.lists(st.integers(0, classes - 1), min_size=1, max_size=60)))
    n = draw.draw(st.integers(1, len(labels)))
    scheme = draw.draw(st.sampled_from(P.SCHEMES))
    kw = {"seed": draw.draw(st.integers(0, 2**31)),
          "alpha": draw.draw(st.sampled_from([0.1, 1.0, 100.0])),
          "classes_per_worker": draw.draw(st.integers(1, classes)),
          "gamma": draw.draw(st.floats(0, 1))}
    try:
        part = P.partition(labels, n, scheme, **kw)
    except ValueError as err:
        # Only the label-driven schemes can find a setting impossible when n <= N.
        assert scheme in ("dirichlet", "classes") and scheme in str(err)
        return
    cover = None
    if scheme == "classes":
        present = np.unique(labels)
        held = {int(present[(i * kw["classes_per_worker"] + j) % len(present)])
                for i in range(n) for j in range(kw["classes_per_worker"])}
        cover = np.flatnonzero(np.isin(labels, sorted(held)))
    check_partition(part, labels, cover)


# ------------------------------------------------------------------------------------------------
# Samplers

def sentinel_part():
    """Three workers whose padding is a sentinel -1: drawing a position >= size would show."""
    indices = np.array([[5, -1, -1, -1], [0, 1, 2, -1], [7, 8, 9, 4]], dtype=np.int32)
    return indices, np.array([1, 3, 4], dtype=np.int32)


def test_sample_bounds_and_uniformity():
    indices, sizes = sentinel_part()
    idx = np.asarray(P.sample(jax.random.key(0), indices, sizes, 4000))
    assert idx.shape == (3, 4000) and idx.dtype == np.int32
    assert (idx != -1).all()
    for row, size, drawn in zip(indices, sizes, idx):
        assert set(drawn.tolist()) == set(row[:size].tolist())
        freq = np.array([np.mean(drawn == v) for v in row[:size]], dtype=np.float64)
        np.testing.assert_allclose(freq, 1.0 / size, atol=0.03)


def test_sample_deterministic_and_jittable():
    part = P.partition(LABELS, 5, "iid")
    key = jax.random.key(3)
    a = P.sample(key, part.indices, part.sizes, 8)
    b = jax.jit(P.sample, static_argnums=3)(key, jnp.asarray(part.indices),
                                            jnp.asarray(part.sizes), 8)
    np.testing.assert_array_equal(a, b)
    # Raw key data (jax.random.PRNGKey, stored state) draws the same as the typed key.
    np.testing.assert_array_equal(a, P.sample(jax.random.PRNGKey(3), part.indices, part.sizes, 8))
    assert not np.array_equal(a, P.sample(jax.random.key(4), part.indices, part.sizes, 8))
    for r, drawn in zip(rows(part), np.asarray(a)):
        assert np.isin(drawn, r).all()


def test_sample_errors():
    indices, sizes = sentinel_part()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        P.sample(0, indices, sizes, 0)
    with pytest.raises(ValueError, match=r"sample: needs sizes \[n\]"):
        P.sample(0, indices, sizes[:2], 4)
    with pytest.raises(ValueError, match=r"sample: needs indices \[n, max_size\]"):
        P.sample(0, indices[0], sizes, 4)
    with pytest.raises(ValueError, match="integer indices"):
        P.sample(0, indices.astype(np.float32), sizes, 4)


def test_sample_grouped_identical_within_groups():
    part = P.partition(LABELS, 4, "dirichlet", alpha=0.5, seed=1)
    key = jax.random.key(9)
    idx = np.asarray(P.sample_grouped(key, part.indices, part.sizes, 16, 3))
    assert idx.shape == (12, 16) and idx.dtype == np.int32
    for g, r in enumerate(rows(part)):
        group = idx[3 * g: 3 * g + 3]
        assert (group == group[0]).all()
        assert np.isin(group[0], r).all()
    assert not (idx[0] == idx[3]).all()
    np.testing.assert_array_equal(idx[::3], P.sample(key, part.indices, part.sizes, 16))
    with pytest.raises(ValueError, match="sample_grouped: r must be >= 1"):
        P.sample_grouped(key, part.indices, part.sizes, 16, 0)


def test_flip_labels_on_byzantine_rows_only():
    y = np.random.default_rng(0).integers(0, 10, (5, 7)).astype(np.int32)
    mask = np.array([False, True, False, False, True])
    out = np.asarray(P.flip_labels(jnp.asarray(y), mask, 10))
    expected = y.copy()
    expected[mask] = 9 - y[mask]
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.int32
    traced = jax.jit(lambda lab, m: P.flip_labels(lab, m, 10))(jnp.asarray(y), jnp.asarray(mask))
    np.testing.assert_array_equal(traced, expected)
    with pytest.raises(ValueError, match="flip_labels: needs a mask"):
        P.flip_labels(y, mask[:3], 10)
    with pytest.raises(ValueError, match="flip_labels: needs a boolean mask"):
        P.flip_labels(y, mask.astype(np.int32), 10)


def test_heterogeneity_label():
    assert [P.heterogeneity_label(s, alpha=0.1, classes_per_worker=2, gamma=0.25)
            for s in P.SCHEMES] == ["iid", "dirichlet(0.1)", "classes(2)", "gamma(0.25)",
                                    "sorted"]
    with pytest.raises(ValueError, match="unknown scheme"):
        P.heterogeneity_label("bogus")
