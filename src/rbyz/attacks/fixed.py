"""Fixed-form attacks: each Byzantine row is one formula of the known rows, with no search.

The reversed mean (sign flip), a reversed and scaled own gradient, a constant, a non-finite
value, Gaussian noise, and a copy of one honest worker.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.attacks import _common
from rbyz.attacks import statistical


@_common.declare_attack(constraint=_spec.MINORITY, reference=(_common.ALLOUAH, _common.BYZFL),
                        cost="O(n d)")
def sign_flip(honest, *, f: int):
    """Sign flip: every Byzantine worker sends ``-mean(honest)`` (IPM with ``epsilon = 1``).

    Knowledge: all *honest* gradients (or its *own*). Any ``f >= 0``.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> sign_flip(jnp.array([[1.0, -2.0], [3.0, 0.0]]), f=1)
      Array([[-2.,  1.]], dtype=float32)

    References:
      Allouah et al., `Fixing by Mixing: A Recipe for Optimal Byzantine ML under
      Heterogeneity`, AISTATS 2023 (ByzFL's SignFlipping).
    """
    return statistical.ipm(honest, f=f, epsilon=1.0)


@_common.declare_attack(knowledge="own", reference=(_common.RAJPUT,), cost="O(f d)")
def reverse(honest, *, f: int, scale: float = 100.0):
    """Reversed gradient: Byzantine worker ``i`` sends ``-scale * g_i``, its own gradient reversed.

    ``scale = 100`` as in DETOX and DRACO. Knowledge: its *own* gradient (row ``i % h``).

    Args:
      honest: stacked pytree ``[h, ...]``; row ``i % h`` is Byzantine worker ``i``'s gradient.
      f: number of Byzantine workers (static).
      scale: the factor ``c`` of ``-c * g``.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> reverse(jnp.array([[1.0, -2.0]]), f=2, scale=10.0)
      Array([[-10.,  20.],
             [-10.,  20.]], dtype=float32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX`, NeurIPS 2019.
    """
    _, f = _common.prepare(honest, f, "reverse")

    def reversed_rows(x):
        acc = tree_util.accumulation_dtype(x.dtype)
        return (-jnp.asarray(scale, acc) * x.astype(acc)).astype(x.dtype)

    return jax.tree.map(reversed_rows, _common.cycle_rows(honest, f))


@_common.declare_attack(knowledge="shapes", reference=(_common.RAJPUT,), cost="O(f d)")
def constant(honest, *, f: int, value: float = -100.0):
    """Constant: every entry of every Byzantine row is ``value`` (-100 as in DETOX and DRACO).

    Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]`` (only shapes and dtypes are used).
      f: number of Byzantine workers (static).
      value: the constant.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> constant({"b": jnp.zeros((3, 2))}, f=1)
      {'b': Array([[-100., -100.]], dtype=float32)}

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX`, NeurIPS 2019.
    """
    _, f = _common.prepare(honest, f, "constant")
    return _common.full_like(honest, f, value)


@_common.declare_attack(knowledge="shapes", cost="O(f d)")
def non_finite(honest, *, f: int, value: float = float("nan")):
    """Non-finite: every entry of every Byzantine row is ``value`` (NaN, ``inf`` or ``-inf``).

    Models crashed or overflowing workers; a robust rule must keep these out of its output.
    Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      value: a non-finite float.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> non_finite(jnp.zeros((2, 3)), f=1, value=float("inf"))
      Array([[inf, inf, inf]], dtype=float32)
    """
    checks.require(not math.isfinite(value), "non_finite",
                   f"value must be NaN, inf or -inf; got value={value!r}. Use constant instead.")
    _, f = _common.prepare(honest, f, "non_finite")
    return _common.full_like(honest, f, value)


@_common.declare_attack(
    key=True, knowledge="shapes", reference=(_common.BLANCHARD,), cost="O(f d)",
    note="std=200 as the Gaussian Byzantine workers of Blanchard et al.; ByzFL uses std=1.")
def gaussian(honest, *, f: int, key=None, mean: float = 0.0, std: float = 200.0):
    """Gaussian: every Byzantine entry is drawn independently from ``N(mean, std^2)``.

    ``std = 200`` as the Gaussian Byzantine workers of Blanchard et al.; ByzFL uses ``std = 1``.
    Draws are made in the accumulation dtype (float32 for 16-bit leaves) and cast to each leaf's
    dtype. Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key (required: there is no default seed).
      mean: mean of the noise.
      std: standard deviation of the noise.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> gaussian(jnp.zeros((4, 1000)), f=2, key=0, std=1.0).shape
      (2, 1000)

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer, `Machine Learning with Adversaries: Byzantine
      Tolerant Gradient Descent`, NeurIPS 2017.
    """
    _, f = _common.prepare(honest, f, "gaussian")

    def draw(k, shape, dtype):
        acc = tree_util.accumulation_dtype(dtype)
        return (mean + std * jax.random.normal(k, shape, acc)).astype(dtype)

    return _common.draw_leaves(honest, f, key, "gaussian", draw)


@_common.declare_attack(
    constraint=_spec.MINORITY, reference=(_common.KARIMIREDDY,), cost="O(f d)",
    note="target=0, a fixed honest worker; Karimireddy et al. pick the target from an initial "
         "phase of training, ByzFL and epfml take it as a setting.")
def mimic(honest, *, f: int, target: int = 0):
    """Mimic: every Byzantine worker sends a copy of honest worker ``target``'s gradient.

    Over-weights one honest worker, which biases the aggregate under heterogeneous data.
    Knowledge: one *honest* worker's gradient. Needs ``0 <= target < h``.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      target: the index of the honest row to copy (static).

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> mimic(jnp.array([[1.0], [2.0]]), f=2, target=1)
      Array([[2.],
             [2.]], dtype=float32)

    References:
      Karimireddy, He, Jaggi, `Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing`, ICLR 2022.
    """
    h, f = _common.prepare(honest, f, "mimic")
    target = checks.static_int(target, "mimic", "target", minimum=0)
    checks.require(target < h, "mimic", f"needs target < h; got target={target}, h={h}.")
    return _common.repeat(tree_util.take_row(honest, target), honest, f)
