"""Noise a trusted server adds once, after the aggregation, and why only the mean allows it.

Worker-level noise (:meth:`rbyz.privacy.PrivacyPlan.worker_noise`) protects each worker's records
from everyone else, and every rule after it is post-processing. Central noise, added by a
trusted server to the aggregate, needs the aggregate's sensitivity: for the mean of ``n``
workers' clipped releases one record moves it by ``s / n`` (``s`` the release's sensitivity),
a ``sqrt(n)``-fold saving over worker noise at the same ε. No robust rule has that sensitivity:
one changed row can move a coordinate-wise median or a Krum selection by ``O(C)`` (it changes
which row is the middle one, or which row is selected), so noise sized for a mean under-noises it
(what Flower's ``DifferentialPrivacyServerSideFixedClipping`` does around any strategy).
:func:`central_noise` therefore refuses every rule but the mean.

Example:
  >>> import jax.numpy as jnp
  >>> tx = central_noise("mean", stddev=0.0, key=0)
  >>> tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))[0]
  Array([1., 1., 1.], dtype=float32)
  >>> central_noise("median", stddev=0.1, key=0)
  Traceback (most recent call last):
  ...
  ValueError: central_noise: the noise after a median cannot be sized like a mean's: one record can move the median's output by O(C), not C / n, so noise for a mean leaves it under-noised. Add the noise on the workers instead (PrivacyPlan.worker_noise, the harness's privacy.at = 'worker'), where every rule is post-processing, or aggregate with the mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rbyz._src import spec as _spec
from rbyz.transforms import _modes

# The rules whose sensitivity to one row is 1/n of the row's: the mean only.
LINEAR_RULES = ("mean",)


class CentralNoiseState(NamedTuple):
    """State of :func:`central_noise`: the raw key data."""

    key: jax.Array


def _rule_name(rule: Callable | str) -> str:
    if isinstance(rule, str):
        return rule
    declared, _ = _spec.resolve(rule, "aggregator", "central_noise")
    return declared.name


def central_noise(rule: Callable | str, *, stddev: float,
                  key) -> optax.GradientTransformationExtraArgs:
    """Gaussian noise ``N(0, stddev^2 I)`` on the aggregate (model-shaped updates), for a
    trusted server after the mean: chain it between :func:`rbyz.transforms.aggregate` and the
    server's optimizer, with ``stddev = z s / n`` (``PrivacyPlan(..., at="server")``).

    Args:
      rule: the aggregation it follows (a name or a registry rule); anything but the mean is
        refused (module docstring).
      stddev: the noise's std (``>= 0``).
      key: int seed or jax key.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`CentralNoiseState`.
    """
    name = _rule_name(rule)
    if name not in LINEAR_RULES:
        raise ValueError(
            f"central_noise: the noise after a {name} cannot be sized like a mean's: one record "
            f"can move the {name}'s output by O(C), not C / n, so noise for a mean leaves it "
            f"under-noised. Add the noise on the workers instead (PrivacyPlan.worker_noise, the "
            f"harness's privacy.at = 'worker'), where every rule is post-processing, or "
            f"aggregate with the mean.")
    if isinstance(stddev, bool) or not isinstance(stddev, (int, float)) or not (
            math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"central_noise: stddev must be a finite number >= 0; got {stddev!r}.")
    key_data = _modes.key_data(key, "central_noise")

    def init_fn(params):
        del params
        return CentralNoiseState(key_data)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        next_key, step_key = _modes.split(state.key)
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(step_key, len(leaves))
        out = [(x.astype(jnp.float32) + stddev * jax.random.normal(k, x.shape)).astype(x.dtype)
               for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, out), CentralNoiseState(next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ("LINEAR_RULES", "CentralNoiseState", "central_noise")
