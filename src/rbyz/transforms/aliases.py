"""Whole algorithms as one transform: noisy sign / median SGD, signSGD-MV, robust SGD."""

from __future__ import annotations

from typing import Callable

import optax

from rbyz._src import checks
from rbyz.transforms.aggregate import aggregate
from rbyz.transforms.aggregate import majority_vote
from rbyz.transforms.per_worker import add_worker_noise
from rbyz.transforms.per_worker import per_worker
from rbyz.transforms.robust import robust

def _noisy(server: str, learning_rate, b: float, key, axis_name, tiled, layout):
    """Per-worker Gaussian noise ``b``, then the server's rule, then SGD."""
    return optax.chain(
        add_worker_noise(b, key=key, axis_name=axis_name, tiled=tiled),
        majority_vote(axis_name=axis_name, tiled=tiled, layout=layout) if server == "sign" else
        aggregate("median", axis_name=axis_name, tiled=tiled, layout=layout),
        optax.sgd(learning_rate),
    )


def noisy_sign_sgd(
    learning_rate: optax.ScalarOrSchedule,
    b: float,
    *,
    key=None,
    axis_name: str | None = None,
    tiled: bool = False,
    layout: str = "gather",
) -> optax.GradientTransformationExtraArgs:
    """Noisy signSGD with majority vote (Chen et al. 2020, Alg. 3).

    ``x_{t+1} = x_t - lr * sign(sum_i sign(g_i + b * xi_i))``, ``xi_i ~ N(0, I)`` per worker and
    step. ``b = 0`` is signSGD-MV. The theory takes odd ``n``. Consumes stacked (or, with
    ``axis_name``, per-shard) gradients: use it alone, not with ``optax.MultiSteps``.

    Args:
      learning_rate: step size or schedule.
      b: noise standard deviation.
      key: int seed or jax key for the noise (required for ``b > 0``).
      axis_name: ``None`` (stacked) or the named worker axis (collective).
      tiled: collective mode only: each shard holds a stack of its own workers (the vote is then
        over all workers, not over the shards).
      layout: collective mode only: ``"gather"`` or ``"coordinates"``, as in :func:`aggregate`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = noisy_sign_sgd(0.1, 0.0, key=0)
      >>> g = jnp.array([[1.0], [2.0], [-3.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]
      Array([-0.1], dtype=float32)

    References:
      Chen, Chen, Sun, Wu, Hong, `Distributed Training with Heterogeneous Data: Bridging Median-
      and Mean-Based Algorithms`, NeurIPS 2020.
    """
    return _noisy("sign", learning_rate, b, key, axis_name, tiled, layout)


def noisy_median_sgd(learning_rate: optax.ScalarOrSchedule, b: float, *, key=None,
                     axis_name: str | None = None, tiled: bool = False,
                     layout: str = "gather") -> optax.GradientTransformationExtraArgs:
    """Noisy medianSGD (Chen et al. 2020, Alg. 4).

    ``x_{t+1} = x_t - lr * med_i(g_i + b * xi_i)`` (coordinate-wise median, NaN ranked last),
    ``xi_i ~ N(0, I)`` per worker and step. ``b = 0`` is medianSGD. For even ``n`` the two middle
    values are averaged. Arguments as :func:`noisy_sign_sgd`.

    Example (``-lr`` times the median of the rows):
      >>> import jax.numpy as jnp
      >>> tx = noisy_median_sgd(0.1, 0.0, key=0)
      >>> tx.update(jnp.array([[1.0], [2.0], [10.0]]), tx.init(jnp.zeros(1)))[0]
      Array([-0.2], dtype=float32)

    References:
      Chen et al., NeurIPS 2020, Alg. 4 (the paper of :func:`noisy_sign_sgd`).
    """
    return _noisy("median", learning_rate, b, key, axis_name, tiled, layout)


def signsgd_majority(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.0,
    n: int | None = None,
    axis_name: str | None = None,
    tiled: bool = False,
    layout: str = "gather",
) -> optax.GradientTransformationExtraArgs:
    """signSGD with majority vote, and Signum with majority vote when ``momentum > 0``.

    Worker ``i``: ``v_i <- beta v_i + (1 - beta) g_i`` (``beta = momentum``); server:
    ``V = sign(sum_i sign(v_i))``; ``x <- x - lr * V``. ``sign(0) = 0``. Robust to ``f < n/2``
    sign-flipping workers.

    Args:
      learning_rate: step size or schedule.
      momentum: worker momentum ``beta`` in ``[0, 1)``.
      n: number of workers (with momentum: stacked mode, or per shard with ``tiled``).
      axis_name: ``None`` (stacked) or the named worker axis (collective).
      tiled: collective mode only: each shard holds a stack of its own workers.
      layout: collective mode only: ``"gather"`` or ``"coordinates"``, as in :func:`aggregate`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = signsgd_majority(0.5, momentum=0.9, n=3)
      >>> g = jnp.array([[1.0], [2.0], [-3.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]
      Array([-0.5], dtype=float32)

    References:
      Bernstein, Zhao, Azizzadenesheli, Anandkumar, `signSGD with Majority Vote is Communication
      Efficient and Fault Tolerant`, ICLR 2019.
    """
    checks.require(0.0 <= momentum < 1.0, "signsgd_majority",
                   f"momentum must be in [0, 1); got {momentum}.")
    parts = []
    if momentum > 0:
        checks.require(n is not None or (axis_name is not None and not tiled), "signsgd_majority",
                       "worker momentum keeps one state per worker: pass n=<number of workers>.")
        parts.append(per_worker(optax.ema(momentum, debias=False), n=n, axis_name=axis_name,
                                tiled=tiled))
    parts += [majority_vote(axis_name=axis_name, tiled=tiled, layout=layout),
              optax.sgd(learning_rate)]
    return optax.chain(*parts)


def robust_sgd(
    rule: Callable | str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    worker_momentum: float = 0.0,
    n: int | None = None,
    axis_name: str | None = None,
    tiled: bool = False,
    key=None,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """SGD on a robust aggregate, with optional worker momentum: :func:`robust` with
    ``optimizer=optax.sgd(learning_rate)`` and no attack.

    Worker ``i``: ``m_i <- beta m_i + g_i`` (no dampening, as Karimireddy et al. 2021);
    server: ``u = rule([m_1; ...; m_n])``; ``x <- x - lr * u``. ``beta = 0`` is plain robust
    SGD.

    Args:
      rule: an aggregator or its registry name.
      learning_rate: step size or schedule.
      worker_momentum: ``beta`` in ``[0, 1)``.
      n: number of workers (needed for worker momentum in stacked mode).
      axis_name: ``None`` (stacked) or the named worker axis (collective).
      tiled: collective mode only.
      key: int seed or jax key for rules that declare a key.
      **hparams: the rule's hyperparameters and ``layout=``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = robust_sgd("median", 1.0)
      >>> g = jnp.array([[1.0], [2.0], [1e30]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]
      Array([-2.], dtype=float32)

    References:
      Karimireddy, He, Jaggi, `Learning from History for Byzantine Robust Optimization`,
      ICML 2021.
    """
    checks.require(isinstance(worker_momentum, (int, float)) and 0.0 <= worker_momentum < 1.0,
                   "robust_sgd", f"worker_momentum must be in [0, 1); got {worker_momentum}.")
    return robust(rule, optimizer=optax.sgd(learning_rate), momentum=worker_momentum, n=n,
                  axis_name=axis_name, tiled=tiled, key=key, **hparams)
