"""Tests of rbyz.sim.models (shapes, determinism, initialisation, wrapping a user's own flax
module, loss and accuracy against float64 NumPy) and rbyz.sim.grads (per-worker gradients against
a per-worker Python loop of jax.grad, in float64)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from rbyz.sim import grads, models
from references import float64


def count(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def batch(shape, b=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, *shape)), jnp.float32)


# ------------------------------------------------------------------------------------------
# Builders: shapes, parameter counts, dtypes, determinism.


@pytest.mark.parametrize("name, shape, classes, params", [
    ("mlp", (28, 28, 1), 10, 784 * 100 + 100 + 100 * 10 + 10),   # the ALIE paper's 79 510
    ("mlp", (8, 8, 1), 10, 64 * 100 + 100 + 1010),
    ("mlp", (32,), 4, 32 * 100 + 100 + 404),
    ("logistic", (28, 28, 1), 10, 7850),
    ("logistic", (32,), 3, 99),
    # PyTorch's MNIST example has 1 199 882 parameters.
    ("cnn", (28, 28, 1), 10, 320 + 18496 + 9216 * 128 + 128 + 1290),
    ("cnn", (8, 8, 1), 10, 320 + 18496 + 256 * 128 + 128 + 1290),
    ("cnn", (6, 6, 3), 2, 3 * 9 * 32 + 32 + 18496 + 64 * 128 + 128 + 258),
    ("cnn", (9, 7), 5, 320 + 18496 + 2 * 1 * 64 * 128 + 128 + 645),
])
def test_builders_shapes_and_counts(name, shape, classes, params):
    model = models.build(name, shape, classes)
    p = model.init(0)
    assert count(p) == params
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))
    logits = jax.jit(model.apply)(p, batch(shape))
    assert logits.shape == (3, classes) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_same_seed_same_params_and_logits():
    model = models.mlp((8, 8, 1), 10, hidden=(16, 8))
    a, b, c = model.init(0), model.init(0), model.init(1)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["out"]["kernel"], c["out"]["kernel"])
    x = batch((8, 8, 1))
    np.testing.assert_array_equal(model.apply(a, x), model.apply(b, x))
    # A typed key works as well as an int seed.
    jax.tree.map(np.testing.assert_array_equal, model.init(jax.random.key(0)), a)


def test_mlp_matches_numpy_forward():
    model = models.mlp((4, 2), 3, hidden=5)
    p = model.init(3)
    x = batch((4, 2), b=6)
    xf = np.asarray(x, np.float64).reshape(6, 8)
    h = np.maximum(xf @ np.asarray(p["hidden"][0]["kernel"], np.float64)
                   + np.asarray(p["hidden"][0]["bias"], np.float64), 0.0)
    want = h @ np.asarray(p["out"]["kernel"], np.float64) + np.asarray(p["out"]["bias"])
    np.testing.assert_allclose(model.apply(p, x), want, rtol=1e-5, atol=1e-6)


def test_initialisation_is_pytorch_default():
    """Every weight and bias in +-1/sqrt(fan_in), and spread over that range (uniform)."""
    p = models.cnn((8, 8, 1), 10).init(0)
    fans = {"conv1": 9 * 1, "conv2": 9 * 32, "fc1": 256, "fc2": 128}
    for layer, fan_in in fans.items():
        bound = 1.0 / math.sqrt(fan_in)
        for leaf in p[layer].values():
            values = np.asarray(leaf)
            assert np.max(np.abs(values)) <= bound
            if values.size >= 256:
                assert np.max(np.abs(values)) > 0.9 * bound
                assert abs(np.std(values) - bound / math.sqrt(3)) < 0.1 * bound


def test_cnn_needs_an_image():
    with pytest.raises(ValueError, match=r"cnn: needs an image shape .* got \(5, 5, 1\)"):
        models.cnn((5, 5, 1), 10)
    with pytest.raises(ValueError, match="Use mlp or logistic"):
        models.build("cnn", (32,), 10)


@pytest.mark.parametrize("call, match", [
    (lambda: models.build("resnet", (4,), 2), "build: unknown model 'resnet'"),
    (lambda: models.build("cnn", (8, 8, 1), 2, hidden=3), "build: cnn takes no keyword hidden"),
    (lambda: models.mlp((4,), 2, hidden=(3, 0)), "mlp: hidden must be"),
    (lambda: models.mlp((), 2), "mlp: input_shape must be"),
    (lambda: models.mlp((4, -1), 2), "mlp: input_shape must be"),
    (lambda: models.logistic((4,), 0), "logistic: num_classes must be"),
])
def test_bad_settings_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_apply_checks_the_example_shape():
    model = models.mlp((8, 8, 1), 10)
    with pytest.raises(ValueError, match=r"expects a batch \[b, 8, 8, 1\]; got x of shape"):
        model.apply(model.init(0), jnp.zeros((2, 64)))


# ------------------------------------------------------------------------------------------
# from_flax: a user's own module, unchanged.


class UserNet(nnx.Module):
    """A user's module with a non-Param variable (batch statistics) beside the parameters."""

    def __init__(self, features: int, classes: int, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(features, 6, rngs=rngs)
        self.norm = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(6, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.tanh(self.norm(self.dense(x))))


class UserLinen(linen.Module):
    classes: int

    @linen.compact
    def __call__(self, x):
        return linen.Dense(self.classes)(linen.relu(linen.Dense(7)(x.reshape(x.shape[0], -1))))


def test_from_flax_nnx_class_trains_only_params():
    model = models.from_flax(functools.partial(UserNet, 5, 3), (5,))
    p = model.init(0)
    assert model.name == "UserNet"
    assert set(p) == {"dense", "norm", "head"} and set(p["norm"]) == {"scale", "bias"}
    jax.tree.map(np.testing.assert_array_equal, p, model.init(0))
    assert not np.array_equal(p["dense"]["kernel"], model.init(1)["dense"]["kernel"])
    # The module's own forward pass, with the same parameters, gives the same logits.
    module = UserNet(5, 3, rngs=nnx.Rngs(0))
    x = batch((5,), b=4)
    np.testing.assert_allclose(model.apply(p, x), module(x), rtol=1e-6)
    g = jax.grad(lambda q: jnp.sum(model.apply(q, x)))(p)
    assert jax.tree.structure(g) == jax.tree.structure(p)


def test_from_flax_instance_lambda_and_linen():
    instance = UserNet(5, 3, rngs=nnx.Rngs(7))
    model = models.from_flax(instance, (5,), name="mine")
    assert model.name == "mine"
    jax.tree.map(np.testing.assert_array_equal, model.init(0), model.init(1))
    lam = models.from_flax(lambda rngs: nnx.Linear(5, 2, rngs=rngs), (5,))
    assert lam.apply(lam.init(0), batch((5,))).shape == (3, 2)
    net = models.from_flax(UserLinen(classes=4), (2, 3))
    p = net.init(0)
    assert net.name == "UserLinen" and count(p) == 6 * 7 + 7 + 7 * 4 + 4
    np.testing.assert_allclose(net.apply(p, batch((2, 3))),
                               UserLinen(classes=4).apply({"params": p}, batch((2, 3))))


def test_from_flax_rejects_bad_modules():
    with pytest.raises(ValueError, match="from_flax: expects an nnx.Module"):
        models.from_flax(3, (5,))
    with pytest.raises(ValueError, match=r"calling UserNet\(rngs=...\) failed .*functools"):
        models.from_flax(UserNet, (5,))
    with pytest.raises(ValueError, match=r"must map a batch \[b, \.\.\.\] to logits"):
        models.from_flax(lambda rngs: nnx.Conv(1, 2, (3, 3), rngs=rngs), (4, 4, 1))


# ------------------------------------------------------------------------------------------
# Loss and accuracy against float64 NumPy.


def ref_cross_entropy(logits, labels):
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1, keepdims=True)
    log_softmax = z - top - np.log(np.exp(z - top).sum(axis=1, keepdims=True))
    return -np.mean(log_softmax[np.arange(len(labels)), labels])


def test_cross_entropy_and_accuracy_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(64, 10)).astype(np.float32)
    logits[0, 3] = 80.0  # large logits: computed stably
    labels = rng.integers(0, 10, 64).astype(np.int32)
    got = models.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_cross_entropy(logits, labels), rtol=1e-6)
    want = np.mean(np.argmax(logits, axis=1) == labels)
    np.testing.assert_allclose(models.accuracy(jnp.asarray(logits), jnp.asarray(labels)), want)
    with float64():
        got64 = models.cross_entropy(jnp.asarray(logits, jnp.float64), jnp.asarray(labels))
        np.testing.assert_allclose(got64, ref_cross_entropy(logits, labels), rtol=1e-13)


# ------------------------------------------------------------------------------------------
# per_worker_grads.


def loop_reference(loss_fn, params, x, y):
    """One jax.value_and_grad per worker in a Python loop (the definition); x may be a pytree."""
    out = [jax.value_and_grad(loss_fn)(params, jax.tree.map(lambda a, i=i: a[i], x), y[i])
           for i in range(y.shape[0])]
    return (jnp.stack([loss for loss, _ in out]),
            jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g in out]))


@pytest.mark.parametrize("name, shape", [("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)),
                                         ("logistic", (12,))])
# "auto" resolves to one of the others (test_per_worker_grads_bad_input): each formulation once.
@pytest.mark.parametrize("method", [m for m in grads.METHODS if m != "auto"])
def test_per_worker_grads_equal_loop_in_float64(name, shape, method):
    n, b = 4, 5
    with float64():
        model = models.build(name, shape, 3)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(0))
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(n, b, *shape)))
        y = jnp.asarray(rng.integers(0, 3, (n, b)).astype(np.int32))

        def loss_fn(p, xb, yb):
            return models.cross_entropy(model.apply(p, xb), yb)

        losses, g = jax.jit(functools.partial(grads.per_worker_grads, loss_fn,
                                              method=method))(params, x, y)
        want_losses, want = loop_reference(loss_fn, params, x, y)
        assert losses.dtype == jnp.float64 and losses.shape == (n,)
        np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
        jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-10, atol=1e-13),
                     g, want)
        # Different workers' data give different gradients (no row is broadcast).
        last = jax.tree.leaves(g)[-1]
        assert not np.allclose(last[0], last[1])


def test_per_worker_grads_float32_and_any_pytree():
    """A hand-written loss on nested params and pytree inputs; float32 against the loop."""
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
              "extra": (jnp.float32(0.5), jnp.ones((2,), jnp.float32))}

    def loss_fn(p, xb, yb):
        pred = jnp.tanh(xb["a"] @ p["w"]) * p["extra"][0] + p["extra"][1][None, :] * xb["b"][:, None]
        return jnp.mean((pred - yb[:, None]) ** 2)

    x = {"a": jnp.asarray(rng.normal(size=(6, 4, 3)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    y = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    losses, g = grads.per_worker_grads(loss_fn, params, x, y)
    want_losses, want = loop_reference(loss_fn, params, x, y)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7), g, want)
    assert g["extra"][0].shape == (6,) and g["w"].shape == (6, 3, 2)


def test_per_worker_grads_bad_input():
    loss_fn = lambda w, xb, yb: jnp.mean(xb @ w - yb)
    w, x, y = jnp.zeros(2), jnp.ones((3, 4, 2)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match="per_worker_grads: method must be one of auto, vmap"):
        grads.per_worker_grads(loss_fn, w, x, y, method="scan")
    with pytest.raises(ValueError, match="same number of workers; got 3 and 2"):
        grads.per_worker_grads(loss_fn, w, x, y[:2])
    with pytest.raises(ValueError, match="same leading worker axis"):
        grads.per_worker_grads(loss_fn, w, {"a": x, "b": x[:1]}, y)
    assert grads.resolve_method("auto", "gpu") == "vmap"
    assert grads.resolve_method("auto") in grads.METHODS
