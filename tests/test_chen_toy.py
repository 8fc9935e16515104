"""Chen et al. (NeurIPS 2020), Fig. 1 toy problem: median- and sign-based SGD stall, noise fixes it.

Three nodes hold f_i(x) = (x - a_i)^2 / 2 with a = (1, 2, 10); the optimum of their mean is
13/3. signSGD-MV and medianSGD stop at x = a_2 = 2, where the median gradient vanishes; noisy
medianSGD (Alg. 4) moves towards 13/3 as the noise scale b grows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rbyz
from rbyz import transforms

A = np.array([1.0, 2.0, 10.0], np.float32)
OPTIMUM = 13.0 / 3.0
STEP = 0.001
STEPS = 20_000
X0 = 0.0005
SEEDS = 4


def _local_grads(x: jax.Array) -> jax.Array:
    return x - jnp.asarray(A)  # node i's gradient of (x - a_i)^2 / 2


def _trajectory(tx: optax.GradientTransformation) -> jax.Array:
    """The iterates x_1..x_T of ``tx`` on the toy problem (one scan, no Python loop)."""
    x0 = jnp.asarray(X0, jnp.float32)

    def step(carry, _):
        x, state = carry
        updates, state = tx.update(_local_grads(x), state, x)
        x = optax.apply_updates(x, updates)
        return (x, state), x

    _, xs = jax.lax.scan(step, (x0, tx.init(x0)), None, length=STEPS)
    return xs


@functools.cache
def _deterministic_final(name: str) -> float:
    tx = {
        "mean": rbyz.transforms.robust_sgd("mean", STEP),
        "median": rbyz.transforms.robust_sgd("median", STEP),
        "sign_mv": rbyz.transforms.signsgd_majority(STEP),
    }[name]
    return float(jax.jit(_trajectory, static_argnums=0)(tx)[-1])


@functools.cache
def _noisy_median_tail_mean(b: float) -> float:
    """Iterate averaged over the last quarter of the run and over a few seeds (vmapped)."""

    def run(key):
        xs = _trajectory(transforms.noisy_median_sgd(STEP, b, key=key))
        return xs[-STEPS // 4:].mean()

    keys = jax.random.split(jax.random.key(0), SEEDS)
    return float(jax.jit(jax.vmap(run))(keys).mean())


def test_mean_sgd_reaches_the_optimum():
    assert abs(_deterministic_final("mean") - OPTIMUM) < 1e-3


@pytest.mark.parametrize("name", ["median", "sign_mv"])
def test_median_and_sign_sgd_stall_at_the_middle_node(name):
    x = _deterministic_final(name)
    assert abs(x - 2.0) <= 2 * STEP
    assert abs(x - OPTIMUM) > 2.3  # the true gradient stays at about 7/3 there


def test_noisy_median_sgd_closes_the_gap():
    assert abs(_noisy_median_tail_mean(10.0) - OPTIMUM) < 0.3


def test_gap_shrinks_as_noise_grows():
    gaps = [abs(_noisy_median_tail_mean(b) - OPTIMUM) for b in (0.0, 1.0, 3.0, 10.0)]
    assert gaps[0] == pytest.approx(OPTIMUM - 2.0, abs=1e-2)
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps


def test_noisy_sign_sgd_also_moves_towards_the_optimum():
    def run(key):
        return _trajectory(transforms.noisy_sign_sgd(STEP, 10.0, key=key))[-STEPS // 4:].mean()

    x = float(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(1), SEEDS)).mean())
    assert abs(x - OPTIMUM) < abs(2.0 - OPTIMUM) - 1.0
