"""The private kernels shared by the rules: whole-update reductions, distances, key normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rbyz._src import checks, reductions

from references import float64


def reference_sq_distances(leaves):
    """Plain float64 ``D[i, j] = sum over leaves of ||x_i - x_j||^2``."""
    n = leaves[0].shape[0]
    out = np.zeros((n, n))
    for leaf in leaves:
        flat = np.asarray(leaf, np.float64).reshape(n, -1)
        out += ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    return out


@pytest.mark.parametrize("columns", [7, 10_000, 23_456])  # below, at and across a chunk edge
def test_distances_match_float64_reference_when_honest_rows_are_close(columns):
    # A large common component and small differences: the uncentred Gram formula loses
    # log10(|g|^2 / D) ~ 5 digits here; the centred one must keep about float32 accuracy.
    rng = np.random.default_rng(0)
    common = rng.normal(size=(1, columns)) * 100.0
    leaves = [
        (common + rng.normal(size=(6, columns)) * 0.1).astype(np.float32),
        rng.normal(size=(6, 3, 4)).astype(np.float32),
    ]
    got = np.asarray(reductions.pairwise_sq_distances({"a": leaves[0], "b": leaves[1]}))
    want = reference_sq_distances(leaves)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_array_equal(np.diag(got), 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, 1e18])
def test_hostile_rows_are_infinitely_far_and_do_not_touch_honest_pairs(bad):
    # A row of 1e18 is finite but its squared norm overflows float32: the diagonal must catch it.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 30_000)).astype(np.float32)
    x[2, 5] = bad
    x[5] = bad
    got = np.asarray(reductions.pairwise_sq_distances(x))
    honest = [0, 1, 3, 4, 6]
    want = reference_sq_distances([x[honest]])
    np.testing.assert_allclose(got[np.ix_(honest, honest)], want, rtol=2e-5)
    for row in (2, 5):
        others = [j for j in range(7) if j != row]
        assert got[row, row] == 0.0
        if row == 2 and bad == 1e18:  # one entry of 1e18: far (1e36) but a finite distance
            assert np.all(got[row, others] >= 1e35) and np.all(got[others, row] >= 1e35)
            continue
        assert np.all(np.isposinf(got[row, others])) and np.all(np.isposinf(got[others, row]))


@pytest.mark.parametrize("scale", [1.0, 1e25])
def test_float64_reductions_stay_float64(scale):
    # Rows of norm ~1e27: their squared norm overflows float32 but is an ordinary float64.
    rng = np.random.default_rng(2)
    leaves = [rng.normal(size=(6, 20_000)) * scale, rng.normal(size=(6, 3, 4)) * scale]
    with float64():
        tree = {"a": jnp.asarray(leaves[0]), "b": jnp.asarray(leaves[1])}
        assert reductions.accumulation_dtype(tree) == jnp.float64
        dist = reductions.pairwise_sq_distances(tree)
        norms = reductions.row_sq_norms(tree)
        point = {"a": tree["a"][0] * 0.5, "b": tree["b"][1] * 0.5}
        to_point = reductions.sq_distances_to(tree, point)
        finite = reductions.finite_rows(tree)
    assert dist.dtype == norms.dtype == to_point.dtype == jnp.float64
    assert bool(np.all(np.asarray(finite)))
    np.testing.assert_allclose(np.asarray(dist), reference_sq_distances(leaves), rtol=1e-12)
    flat = np.concatenate([leaf.reshape(6, -1) for leaf in leaves], axis=1)
    np.testing.assert_allclose(np.asarray(norms), (flat**2).sum(1), rtol=1e-13)
    centre = np.concatenate([leaves[0][0] * 0.5, (leaves[1][1] * 0.5).ravel()])
    np.testing.assert_allclose(np.asarray(to_point), ((flat - centre) ** 2).sum(1), rtol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_16_and_32_bit_reductions_accumulate_in_float32(dtype):
    tree = {"a": jnp.ones((4, 3), dtype), "b": jnp.ones((4, 2), jnp.float32)}
    assert reductions.accumulation_dtype(tree) == jnp.float32
    assert reductions.accumulation_dtype({"a": tree["a"]}) == jnp.float32
    for value in (reductions.row_sq_norms(tree), reductions.pairwise_sq_distances(tree),
                  reductions.sq_distances_to(tree, jax.tree.map(lambda x: x[0], tree))):
        assert value.dtype == jnp.float32


def test_empty_leaves_contribute_nothing():
    rng = np.random.default_rng(3)
    full = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    tree = {"e": jnp.zeros((5, 0)), "f": jnp.zeros((5, 2, 0)), "x": full}
    only = {"x": full}
    for kernel in (reductions.row_sq_norms, reductions.finite_rows,
                   reductions.pairwise_sq_distances):
        np.testing.assert_array_equal(np.asarray(kernel(tree)), np.asarray(kernel(only)))
    np.testing.assert_array_equal(np.asarray(reductions.pairwise_sq_distances({"e": tree["e"]})),
                                  np.zeros((5, 5)))


def test_as_key_accepts_every_key_form_and_gives_the_same_key():
    want = jax.random.key_data(jax.random.key(3)).tolist()
    forms = [3, np.int64(3), jax.random.key(3), jax.random.PRNGKey(3)]
    for form in forms:
        assert jax.random.key_data(checks.as_key(form, "demo")).tolist() == want
    traced = jax.jit(lambda seed: jax.random.key_data(checks.as_key(seed, "demo")))
    assert traced(jnp.int32(3)).tolist() == want


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, r"demo: needs a random key; got key=None"),
        (jnp.zeros(2, jnp.float32), r"demo: key must be an int seed or a jax key; got an array "
                                    r"of dtype float32"),
    ],
)
def test_as_key_rejects_missing_or_wrong_keys_naming_the_rule(key, message):
    with pytest.raises(ValueError, match=message):
        checks.as_key(key, "demo")
