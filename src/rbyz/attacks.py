"""Byzantine attacks: pure functions from known honest updates to the Byzantine workers' rows.

Every gradient attack has the signature ``attack(honest, *, f, key=None, **hparams)``: ``honest``
is a stacked pytree ``[h, ...]`` of the honest gradients the attacker knows, and the result is
the stacked pytree ``[f, ...]`` of what the ``f`` Byzantine workers send (``f = 0`` gives an
empty stack). What ``honest`` holds depends on the attacker's knowledge, which each docstring
states:

- *own*: the Byzantine workers' own honest gradients (``h = f``; the non-omniscient setting of
  Baruch et al.). Row-wise attacks (``reverse``, ``bit_flip``, ``sign_reverse``) map row ``i``
  to Byzantine worker ``i``, cycling over the rows when fewer than ``f`` are given.
- *honest*: all honest workers' gradients (``h = n - f``; the omniscient setting).
- *aggregator*: the adaptive attacks also need the aggregation rule they target.

:func:`inject` builds the full ``[n, ...]`` stack a server receives: it draws (or takes) the
Byzantine positions, hands the attack the rows it may know, and writes the result back.
Randomness only comes from an explicit ``key`` (an int seed or a JAX key). Outputs keep the
input dtype; means and deviations of 16-bit inputs are accumulated in float32.

References:
  Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
  Learning <https://arxiv.org/abs/1902.06156>`_, NeurIPS 2019.
  Xie, Koyejo, Gupta, `Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
  Manipulation <https://arxiv.org/abs/1903.03936>`_, UAI 2019.
  Shejwalkar, Houmansadr, `Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
  Defenses for Federated Learning`, NDSS 2021.
  Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
  More Robust Gradient Aggregation <https://arxiv.org/abs/1907.12205>`_, NeurIPS 2019.
  Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD against
  Byzantine Attacks <https://arxiv.org/abs/1910.06093>`_, NeurIPS 2020.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import registry as registry_lib
from rbyz._src import tree as tree_util

_REGISTRY = registry_lib.Registry("attack")

# Default scale grid of the adaptive attacks: wide enough for ALIE's z (~0.1-3) and for IPM's
# epsilon (0.1 against medians, ~100 against means).
DEFAULT_SCALES = tuple(float(s) for s in np.geomspace(1e-2, 1e2, 25))


def get(name: str) -> Callable:
    """The attack registered as ``name`` (see :func:`names`); ``ValueError`` if unknown."""
    return _REGISTRY.get(name)


def names() -> tuple[str, ...]:
    """The names of all registered gradient and sign attacks (``label_flip`` is data-level)."""
    return _REGISTRY.names()


# ------------------------------------------------------------------------------------------
# Shared helpers.


def _prepare(honest, f, rule: str) -> tuple[int, int]:
    """Validates the stacked input and ``f``; returns ``(h, f)``."""
    h = tree_util.num_workers(honest, rule)
    return h, checks.static_int(f, rule, "f", minimum=0)


def _empty(honest):
    """The ``[0, ...]`` stack returned when there are no Byzantine workers."""
    return jax.tree.map(lambda x: x[:0], honest)


def _repeat(vector_tree, honest, f: int):
    """Stacks ``f`` copies of a per-worker pytree, in the dtypes of ``honest``."""
    return jax.tree.map(
        lambda v, x: jnp.broadcast_to(v.astype(x.dtype)[None], (f,) + x.shape[1:]),
        vector_tree,
        honest,
    )


def _cycle_rows(honest, f: int):
    """Row ``i % h`` for Byzantine worker ``i``: each attacker starts from its own gradient."""
    h = tree_util.num_workers(honest, "attack")
    index = np.arange(f) % h
    return jax.tree.map(lambda x: x[index], honest)


def _leaf_mean(x: jax.Array) -> jax.Array:
    acc = tree_util.accumulation_dtype(x.dtype)
    return tree_util.sum_rows(x.astype(acc)) / x.shape[0]


def _leaf_std(x: jax.Array, ddof: int) -> jax.Array:
    # Direct differences from the mean: the one-pass E[x^2] - E[x]^2 cancels badly when the
    # honest gradients are close to each other.
    acc = tree_util.accumulation_dtype(x.dtype)
    centred = x.astype(acc) - _leaf_mean(x)[None]
    return jnp.sqrt(tree_util.sum_rows(jnp.square(centred)) / (x.shape[0] - ddof))


def _mean(honest):
    return jax.tree.map(_leaf_mean, honest)


def _std(honest, ddof: int):
    return jax.tree.map(lambda x: _leaf_std(x, ddof), honest)


def _tree_vdot(a, b) -> jax.Array:
    """Inner product of two pytrees over every coordinate, in float32."""
    return sum(
        jnp.vdot(x.astype(jnp.float32).ravel(), y.astype(jnp.float32).ravel())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ------------------------------------------------------------------------------------------
# A Little Is Enough.


def alie_z(n: int, f: int, *, variant: str = "v2") -> float:
    """The largest z of "A Little Is Enough" for ``n`` workers of which ``f`` are Byzantine.

    ``s = floor(n/2 + 1) - f`` honest "supporters" are needed for a majority, and
    ``z = Phi^{-1}(q)`` with ``q_v1 = (n - s)/n`` (arXiv v1, Algorithm 1) or
    ``q_v2 = (n - f - s)/(n - f)`` (counts only the honest workers; used by the epfml, Blades and
    NDSS'21 code). ``z`` is negative when ``q < 1/2`` (e.g. ``n = 10, f = 1`` with ``v2``); the
    formula is returned as is. Needs ``0 <= f < floor(n/2 + 1)`` (``s >= 1``) and ``0 < q < 1``.

    Args:
      n: the number of workers (Python int).
      f: the number of Byzantine workers, called ``m`` in the paper (Python int).
      variant: ``"v2"`` (default) or ``"v1"``.

    Returns:
      z as a Python float (static; computed with ``statistics.NormalDist``).

    Example:
      >>> round(alie_z(51, 12, variant="v1"), 3), round(alie_z(51, 12), 3)
      (0.599, 0.361)

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
      Learning`, NeurIPS 2019.
    """
    n = checks.static_int(n, "alie_z", "n", minimum=1)
    f = checks.static_int(f, "alie_z", "f", minimum=0)
    checks.require(variant in ("v1", "v2"), "alie_z",
                   f"variant must be 'v1' or 'v2'; got {variant!r}.")
    supporters = math.floor(n / 2 + 1) - f
    checks.require(
        supporters >= 1, "alie_z",
        f"needs f < floor(n/2 + 1) (the attackers must lack a majority); got n={n}, f={f}. "
        "Use fewer Byzantine workers or pass a fixed z.",
    )
    q = (n - supporters) / n if variant == "v1" else (n - f - supporters) / (n - f)
    checks.require(
        0.0 < q < 1.0, "alie_z",
        f"the quantile q={q} is outside (0, 1) for n={n}, f={f}, variant={variant!r}; pass a "
        "fixed z instead.",
    )
    return statistics.NormalDist().inv_cdf(q)


def _alie_shift(honest, scale, *, ddof: int, sign: float):
    mean, std = _mean(honest), _std(honest, ddof)
    return jax.tree.map(lambda m, s: m + sign * scale * s, mean, std)


def _check_alie(h: int, f: int, n, ddof: int, sign, rule: str) -> None:
    checks.require(sign in (-1, 1), rule, f"sign must be -1 or +1; got sign={sign!r}.")
    ddof = checks.static_int(ddof, rule, "ddof", minimum=0)
    checks.require(
        h > ddof, rule,
        f"needs more known honest rows than ddof for a standard deviation; got {h} rows, "
        f"ddof={ddof}. Pass more rows or ddof=0.",
    )
    if n is not None:
        n = checks.static_int(n, rule, "n", minimum=1)
        checks.byzantine_count(f, n, rule, "f < n", lambda n, f: f < n)


@_REGISTRY.register()
def alie(honest, *, f: int, n: int | None = None, z: float | None = None,
         variant: str = "v2", ddof: int = 0, sign: float = -1, key=None):
    """A Little Is Enough: every Byzantine worker sends ``mu + sign * z * sigma``.

    ``mu`` and ``sigma`` are the coordinate-wise mean and standard deviation (``ddof``) of the
    known honest gradients; ``z`` is fixed or :func:`alie_z` ``(n, f, variant)``. Knowledge:
    *own* gradients (the paper's setting, ``ddof=0``) or all *honest* ones (epfml and Blades,
    ``ddof=1``). Defaults follow the official code: minus sign, population std; z from ``q_v2``
    (the ALIE CLI uses ``z=1.5``, DETOX ``z=1.0``, ByzFL ``z=1.5, sign=+1, ddof=1``).
    Needs ``f < n``; ``n`` is required when ``z`` is not given.

    Args:
      honest: stacked pytree ``[h, ...]`` of the gradients the attacker knows.
      f: number of Byzantine workers (static).
      n: total number of workers, used to compute z.
      z: a fixed number of standard deviations, overriding ``n`` and ``variant``.
      variant: ``"v2"`` or ``"v1"``, the quantile of :func:`alie_z`.
      ddof: delta degrees of freedom of the standard deviation.
      sign: ``-1`` or ``+1``, the direction of the shift.
      key: unused (the attack is deterministic).

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows, in the dtypes of ``honest``.

    Example:
      >>> g = jnp.array([[0.0, 1.0], [2.0, 3.0]])
      >>> alie(g, f=1, z=1.0)
      Array([[0., 1.]], dtype=float32)

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
      Learning`, NeurIPS 2019.
    """
    del key
    h, f = _prepare(honest, f, "alie")
    _check_alie(h, f, n, ddof, sign, "alie")
    if z is None:
        checks.require(n is not None, "alie", "needs n (the number of workers) to compute z; "
                       "got n=None and z=None. Pass n=... or a fixed z=....")
        z = alie_z(n, f, variant=variant)
    if f == 0:
        return _empty(honest)
    return _repeat(_alie_shift(honest, z, ddof=ddof, sign=sign), honest, f)


# ------------------------------------------------------------------------------------------
# Attacks built from the honest mean or the attacker's own gradients.


@_REGISTRY.register()
def ipm(honest, *, f: int, epsilon: float = 0.1, key=None):
    """Inner-product manipulation: every Byzantine worker sends ``-epsilon * mean(honest)``.

    Small ``epsilon`` (0.1, epfml's default) turns the output of median- and Krum-type rules
    against the true gradient; large ``epsilon`` (e.g. 100) does the same to the mean.
    Knowledge: all *honest* gradients. Any ``f >= 0``.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      epsilon: the scale of the reversed mean.
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> ipm(jnp.array([[1.0, 2.0], [3.0, 4.0]]), f=2, epsilon=0.5)
      Array([[-1. , -1.5],
             [-1. , -1.5]], dtype=float32)

    References:
      Xie, Koyejo, Gupta, `Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
      Manipulation`, UAI 2019.
    """
    del key
    _, f = _prepare(honest, f, "ipm")
    if f == 0:
        return _empty(honest)
    return _repeat(jax.tree.map(lambda m: -epsilon * m, _mean(honest)), honest, f)


@_REGISTRY.register()
def sign_flip(honest, *, f: int, key=None):
    """Sign flip: every Byzantine worker sends ``-mean(honest)`` (IPM with ``epsilon = 1``).

    Knowledge: all *honest* gradients (or its *own*). Any ``f >= 0``.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> sign_flip(jnp.array([[1.0, -2.0], [3.0, 0.0]]), f=1)
      Array([[-2.,  1.]], dtype=float32)

    References:
      Allouah et al., `Fixing by Mixing: A Recipe for Optimal Byzantine ML under
      Heterogeneity`, AISTATS 2023 (ByzFL's SignFlipping).
    """
    return ipm(honest, f=f, epsilon=1.0, key=key)


@_REGISTRY.register()
def reverse(honest, *, f: int, scale: float = 100.0, key=None):
    """Reversed gradient: Byzantine worker ``i`` sends ``-scale * g_i``, its own gradient reversed.

    ``scale = 100`` as in DETOX and DRACO. Knowledge: its *own* gradient (row ``i % h``).

    Args:
      honest: stacked pytree ``[h, ...]``; row ``i % h`` is Byzantine worker ``i``'s gradient.
      f: number of Byzantine workers (static).
      scale: the factor ``c`` of ``-c * g``.
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> reverse(jnp.array([[1.0, -2.0]]), f=2, scale=10.0)
      Array([[-10.,  20.],
             [-10.,  20.]], dtype=float32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX`, NeurIPS 2019.
    """
    del key
    _, f = _prepare(honest, f, "reverse")
    return jax.tree.map(lambda x: (-scale * x.astype(jnp.float32)).astype(x.dtype),
                        _cycle_rows(honest, f))


@_REGISTRY.register()
def constant(honest, *, f: int, value: float = -100.0, key=None):
    """Constant: every entry of every Byzantine row is ``value`` (-100 as in DETOX and DRACO).

    Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]`` (only shapes and dtypes are used).
      f: number of Byzantine workers (static).
      value: the constant.
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> constant({"b": jnp.zeros((3, 2))}, f=1)
      {'b': Array([[-100., -100.]], dtype=float32)}

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX`, NeurIPS 2019.
    """
    del key
    _, f = _prepare(honest, f, "constant")
    return jax.tree.map(lambda x: jnp.full((f,) + x.shape[1:], value, x.dtype), honest)


@_REGISTRY.register()
def non_finite(honest, *, f: int, value: float = float("nan"), key=None):
    """Non-finite: every entry of every Byzantine row is ``value`` (NaN, ``inf`` or ``-inf``).

    Models crashed or overflowing workers; a robust rule must keep these out of its output.
    Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      value: a non-finite float.
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> non_finite(jnp.zeros((2, 3)), f=1, value=float("inf"))
      Array([[inf, inf, inf]], dtype=float32)
    """
    checks.require(not math.isfinite(value), "non_finite",
                   f"value must be NaN, inf or -inf; got value={value!r}. Use constant instead.")
    return constant(honest, f=f, value=value, key=key)


@_REGISTRY.register()
def gaussian(honest, *, f: int, key=None, mean: float = 0.0, std: float = 200.0):
    """Gaussian: every Byzantine entry is drawn independently from ``N(mean, std^2)``.

    ``std = 200`` as the Gaussian Byzantine workers of Blanchard et al.; ByzFL uses ``std = 1``.
    Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key.
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
    _, f = _prepare(honest, f, "gaussian")
    key = checks.as_key(key, "gaussian")
    flat, treedef = jax.tree.flatten(honest)
    keys = jax.random.split(key, len(flat))
    drawn = [
        (mean + std * jax.random.normal(k, (f,) + x.shape[1:], jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, flat)
    ]
    return jax.tree.unflatten(treedef, drawn)


@_REGISTRY.register()
def mimic(honest, *, f: int, target: int = 0, key=None):
    """Mimic: every Byzantine worker sends a copy of honest worker ``target``'s gradient.

    Over-weights one honest worker, which biases the aggregate under heterogeneous data.
    Knowledge: one *honest* worker's gradient. Needs ``0 <= target < h``.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      target: the index of the honest row to copy (static).
      key: unused.

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
    del key
    h, f = _prepare(honest, f, "mimic")
    target = checks.static_int(target, "mimic", "target", minimum=0)
    checks.require(target < h, "mimic", f"needs target < h; got target={target}, h={h}.")
    return _repeat(tree_util.take_row(honest, target), honest, f)


# ------------------------------------------------------------------------------------------
# Min-Max and Min-Sum (Shejwalkar and Houmansadr).

_MIN_MAX_DIRECTIONS = ("unit_vec", "sign", "std")


def _direction(honest, mean, kind: str):
    if kind == "unit_vec":
        norm = jnp.sqrt(_tree_vdot(mean, mean))
        return jax.tree.map(lambda m: m / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny), mean)
    if kind == "sign":
        return jax.tree.map(jnp.sign, mean)
    # The scale of the direction does not matter (gamma absorbs it), so ddof is irrelevant.
    return _std(honest, 0)


def _largest_feasible(feasible, start: float, steps: int) -> jax.Array:
    """The largest ``gamma >= 0`` with ``feasible(gamma)``, for a feasible set ``[0, gamma*]``.

    Doubles ``start`` until it fails (at most 64 times), then bisects ``steps`` times; the lower
    end, always feasible, is returned.
    """
    start = jnp.float32(start)

    def grow(state):
        hi, count = state
        return hi * 2, count + 1

    hi, _ = jax.lax.while_loop(lambda s: feasible(s[0]) & (s[1] < 64), grow, (start, 0))
    lo = jnp.where(feasible(hi), hi, jnp.where(hi > start, hi / 2, 0.0))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = feasible(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, steps, bisect, (lo, hi))
    return lo


def _pairwise_from_offsets(offsets, sq_norms: jax.Array) -> jax.Array:
    """``[h, h]`` squared distances ``|o_i|^2 + |o_j|^2 - 2 <o_i, o_j>`` of mean-centred rows.

    The rows are already centred at their mean, so the Gram form keeps its digits; HIGHEST
    precision keeps GPUs from using TF32.
    """
    gram = sum(
        jnp.matmul(o.reshape(o.shape[0], -1).astype(jnp.float32),
                   o.reshape(o.shape[0], -1).astype(jnp.float32).T,
                   precision=jax.lax.Precision.HIGHEST)
        for o in jax.tree.leaves(offsets)
    )
    return jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * gram, 0.0)


def _min_max_sum(honest, *, f: int, direction: str, gamma_init: float, steps: int,
                 rule: str, objective: str):
    h, f = _prepare(honest, f, rule)
    checks.require(direction in _MIN_MAX_DIRECTIONS, rule,
                   f"direction must be one of {_MIN_MAX_DIRECTIONS}; got {direction!r}.")
    checks.require(gamma_init > 0, rule, f"needs gamma_init > 0; got {gamma_init!r}.")
    if f == 0:
        return _empty(honest)
    mean = _mean(honest)
    perturbation = _direction(honest, mean, direction)
    # ||mean - gamma p - g_i||^2 = c_i - 2 gamma e_i + gamma^2 q: the search runs on scalars,
    # and c_i comes from direct differences, which keeps close honest gradients accurate.
    offsets = jax.tree.map(lambda x, m: m[None] - x.astype(m.dtype), honest, mean)
    c = sum(jnp.sum(jnp.square(o.reshape(h, -1).astype(jnp.float32)), axis=1)
            for o in jax.tree.leaves(offsets))
    e = sum(jnp.sum((o * p[None]).reshape(h, -1).astype(jnp.float32), axis=1)
            for o, p in zip(jax.tree.leaves(offsets), jax.tree.leaves(perturbation)))
    q = _tree_vdot(perturbation, perturbation)
    pairwise = _pairwise_from_offsets(offsets, c)
    if objective == "max":
        threshold, reduce = jnp.max(pairwise), jnp.max
    else:
        threshold, reduce = jnp.min(jnp.sum(pairwise, axis=1)), jnp.sum

    def feasible(gamma):
        return reduce(c - 2 * gamma * e + gamma * gamma * q) <= threshold

    gamma = _largest_feasible(feasible, gamma_init, steps)
    return _repeat(jax.tree.map(lambda m, p: m - gamma * p, mean, perturbation), honest, f)


_MIN_MAX_DOC = """{title}: the Byzantine workers send ``mean - gamma * p`` with gamma maximal.

    The constraint: {constraint}. ``mean`` is the mean of the honest gradients ``g_i`` and the
    direction ``p`` is
    ``"unit_vec"`` (``mean / ||mean||``), ``"sign"`` (``sign(mean)``) or ``"std"`` (the
    coordinate-wise standard deviation, the default of the authors' notebooks). The feasible
    ``gamma`` form an interval ``[0, gamma*]`` (the constraint is convex in ``gamma`` and holds at
    0), found inside jit by doubling from ``gamma_init`` and ``steps`` bisection steps on the
    squared distances, returned at the feasible end. Knowledge: all *honest* gradients (or the
    attackers' *own*); ``h >= 1``, any ``f >= 0``.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      direction: ``"std"``, ``"unit_vec"`` or ``"sign"``.
      gamma_init: first upper bound tried (10, as in the reference search).
      steps: bisection steps (40 halve the bracket to float32 resolution).
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows.

    Example:
      >>> g = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
      >>> {name}(g, f=1, direction="unit_vec").shape
      (1, 2)

    References:
      Shejwalkar, Houmansadr, `Manipulating the Byzantine: Optimizing Model Poisoning Attacks
      and Defenses for Federated Learning`, NDSS 2021.
    """


@_REGISTRY.register()
def min_max(honest, *, f: int, direction: str = "std", gamma_init: float = 10.0,
            steps: int = 40, key=None):
    del key
    return _min_max_sum(honest, f=f, direction=direction, gamma_init=gamma_init, steps=steps,
                        rule="min_max", objective="max")


@_REGISTRY.register()
def min_sum(honest, *, f: int, direction: str = "std", gamma_init: float = 10.0,
            steps: int = 40, key=None):
    del key
    return _min_max_sum(honest, f=f, direction=direction, gamma_init=gamma_init, steps=steps,
                        rule="min_sum", objective="sum")


min_max.__doc__ = _MIN_MAX_DOC.format(
    title="Min-Max", name="min_max",
    constraint="``max_i ||m - g_i||^2 <= max_{i,j} ||g_i - g_j||^2``: the malicious ``m`` is no "
    "farther from any honest gradient than the two farthest honest ones are from each other")
min_sum.__doc__ = _MIN_MAX_DOC.format(
    title="Min-Sum", name="min_sum",
    constraint="``sum_i ||m - g_i||^2 <= min_j sum_i ||g_j - g_i||^2``: the malicious ``m`` is "
    "no farther from the honest ones in total than the most central honest gradient")


# ------------------------------------------------------------------------------------------
# Bit flips.

_BIT_RANGES = ("any", "sign", "exponent", "mantissa")


def _bit_range(dtype, bit_range) -> tuple[int, int]:
    """``[lo, hi)``: the bit positions (0 = least significant) that may be flipped."""
    info = jnp.finfo(dtype)
    width = 8 * jnp.dtype(dtype).itemsize
    named = {
        "any": (0, width),
        "sign": (width - 1, width),
        "exponent": (info.nmant, info.nmant + info.nexp),
        "mantissa": (0, info.nmant),
    }
    if isinstance(bit_range, str):
        checks.require(bit_range in named, "bit_flip",
                       f"bit_range must be one of {_BIT_RANGES} or (lo, hi); got {bit_range!r}.")
        return named[bit_range]
    lo, hi = (int(b) for b in bit_range)
    checks.require(0 <= lo < hi <= width, "bit_flip",
                   f"bit_range (lo, hi) needs 0 <= lo < hi <= {width} for {jnp.dtype(dtype)}; "
                   f"got {bit_range!r}.")
    return lo, hi


def _distinct_draws(key, bits: int, size: int) -> jax.Array:
    """``[bits]`` distinct integers drawn uniformly from ``[0, size)``.

    Floyd's algorithm: draw ``t`` in ``[0, j]`` for ``j = size - bits, ..., size - 1`` and keep
    ``j`` instead when ``t`` was taken; a fixed number of draws, no rejection loop.
    """
    slots = jnp.arange(bits)

    def draw(step, picks):
        j = size - bits + step
        t = jax.random.randint(jax.random.fold_in(key, step), (), 0, j + 1)
        taken = jnp.any((picks == t) & (slots < step))
        return picks.at[step].set(jnp.where(taken, j, t))

    return jax.lax.fori_loop(0, bits, draw, jnp.zeros((bits,), jnp.int32))


def _flip(x: jax.Array, mask: jax.Array) -> jax.Array:
    uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(x, uint)
    return jax.lax.bitcast_convert_type(bits ^ mask.astype(uint), x.dtype)


def _flip_per_value(key, x: jax.Array, bits: int, lo: int, hi: int) -> jax.Array:
    """Flips ``bits`` distinct bits of ``[lo, hi)`` in every value (Floyd's draws, per value)."""
    uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    one = jnp.ones(x.shape, uint)

    def draw(step, mask):
        j = hi - lo - bits + step
        t = jax.random.randint(jax.random.fold_in(key, step), x.shape, 0, j + 1)
        taken = (jnp.right_shift(mask, (t + lo).astype(uint)) & one) == one
        pick = jnp.where(taken, j, t)
        return mask | jnp.left_shift(one, (pick + lo).astype(uint))

    return _flip(x, jax.lax.fori_loop(0, bits, draw, jnp.zeros(x.shape, uint)))


def _flip_per_row(key, row_leaves: list[jax.Array], bits: int, ranges) -> list[jax.Array]:
    """Flips ``bits`` distinct (value, bit) positions drawn over all leaves of one row."""
    counts = [x.size * (hi - lo) for x, (lo, hi) in zip(row_leaves, ranges)]
    total = sum(counts)
    checks.require(bits <= total, "bit_flip",
                   f"needs bits <= the flippable bits of a row; got bits={bits}, {total}.")
    checks.require(total < 2**31, "bit_flip", "a row has 2**31 or more flippable bits; use "
                   "per='value'.")
    positions = _distinct_draws(key, bits, total)
    out, offset = [], 0
    for x, (lo, hi), count in zip(row_leaves, ranges, counts):
        uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
        local = positions - offset
        inside = (local >= 0) & (local < count)
        value = jnp.where(inside, local // (hi - lo), x.size)  # out of bounds: dropped
        shift = (lo + local % (hi - lo)).astype(uint)
        powers = jnp.where(inside, jnp.left_shift(jnp.ones_like(shift), shift), 0)
        # Positions are distinct, so adding the powers of two is a bitwise or.
        mask = jnp.zeros(x.size, uint).at[value].add(powers.astype(uint), mode="drop")
        out.append(_flip(x, mask.reshape(x.shape)))
        offset += count
    return out


@_REGISTRY.register()
def bit_flip(honest, *, f: int, key=None, bits: int = 1, per: str = "row",
             bit_range: str | tuple[int, int] = "any"):
    """Bit flips: Byzantine worker ``i`` sends its own gradient with IEEE-754 bits flipped.

    The hardware fault DETOX names: values are reinterpreted as same-width unsigned integers
    (``lax.bitcast_convert_type``) and XOR-ed with a random mask holding exactly ``bits`` ones
    per row (over all leaves) or per value, drawn without replacement inside ``bit_range``:
    ``"any"``, ``"sign"``, ``"exponent"``, ``"mantissa"`` or ``(lo, hi)`` (bit 0 = least
    significant). One exponent flip can turn 0.5 into ~1.7e38 (float32). Note: epfml's
    "bit flip" is a plain negation, :func:`reverse` with ``scale=1``. Knowledge: its *own*
    gradient (row ``i % h``). Floating-point leaves only.

    Args:
      honest: stacked pytree ``[h, ...]`` of floating-point leaves.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key.
      bits: how many bits to flip per row or per value (static, >= 1).
      per: ``"row"`` (default) or ``"value"``.
      bit_range: which bits may flip.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> out = bit_flip(jnp.ones((1, 4)), f=1, key=0, bits=1, bit_range="sign")
      >>> int(jnp.sum(out < 0))
      1

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX`, NeurIPS 2019.
    """
    _, f = _prepare(honest, f, "bit_flip")
    bits = checks.static_int(bits, "bit_flip", "bits", minimum=1)
    checks.require(per in ("row", "value"), "bit_flip", f"per must be 'row' or 'value'; got "
                   f"{per!r}.")
    flat, treedef = jax.tree.flatten(_cycle_rows(honest, f))
    for x in flat:
        checks.require(jnp.issubdtype(x.dtype, jnp.floating), "bit_flip",
                       f"needs floating-point leaves; got {x.dtype}.")
    ranges = [_bit_range(x.dtype, bit_range) for x in flat]
    if per == "value":
        for lo, hi in ranges:
            checks.require(bits <= hi - lo, "bit_flip",
                           f"needs bits <= the bits in bit_range; got bits={bits}, {hi - lo}.")
    key = checks.as_key(key, "bit_flip")
    if f == 0:
        return jax.tree.unflatten(treedef, flat)
    row_keys = jax.random.split(key, f)
    if per == "value":
        flipped = [
            jax.vmap(lambda k, row, i=i: _flip_per_value(jax.random.fold_in(k, i), row, bits,
                                                         *ranges[i]))(row_keys, x)
            for i, x in enumerate(flat)
        ]
    else:
        flipped = jax.vmap(lambda k, *row: _flip_per_row(k, list(row), bits, ranges))(
            row_keys, *flat)
    return jax.tree.unflatten(treedef, list(flipped))


# ------------------------------------------------------------------------------------------
# Adaptive attacks.


def _distance_to_mean(aggregator, honest, mean, byzantine) -> jax.Array:
    stacked = jax.tree.map(lambda x, b: jnp.concatenate([x, b]), honest, byzantine)
    out = aggregator(stacked)
    diff = jax.tree.map(lambda o, m: o.astype(jnp.float32) - m.astype(jnp.float32), out, mean)
    value = _tree_vdot(diff, diff)
    # An aggregate that fails to be a number is not a usable maximum of the search.
    return jnp.where(jnp.isnan(value), -jnp.inf, value)


def _golden_section(objective, lo, hi, steps: int):
    """Maximises ``objective`` on ``[lo, hi]``: returns ``(argmax estimate, value)``."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)

    def step(_, state):
        lo, hi, c, d, fc, fd = state
        left = fc >= fd
        lo, hi = jnp.where(left, lo, c), jnp.where(left, d, hi)
        new = jnp.where(left, hi - ratio * (hi - lo), lo + ratio * (hi - lo))
        fnew = objective(new)
        c, d = jnp.where(left, new, d), jnp.where(left, c, new)
        fc, fd = jnp.where(left, fnew, fd), jnp.where(left, fc, fnew)
        return lo, hi, c, d, fc, fd

    _, _, c, d, fc, fd = jax.lax.fori_loop(0, steps, step,
                                           (lo, hi, c, d, objective(c), objective(d)))
    return jnp.where(fc >= fd, c, d), jnp.maximum(fc, fd)


def search_scale(objective, scales: Sequence[float], refine_steps: int) -> jax.Array:
    """The scale from ``scales`` that maximises ``objective``, refined by golden-section search.

    Every grid scale is evaluated (``lax.map``, one compiled body); the search then refines in
    log-space between the best grid point's neighbours and keeps the refinement only if it is
    better, so the result is never worse than the best grid point.

    Args:
      objective: ``scale (float32 scalar) -> float32 scalar`` to maximise (traceable).
      scales: positive grid of scales, increasing (static).
      refine_steps: golden-section steps after the grid (static, >= 0).

    Returns:
      The chosen scale, a float32 scalar.

    Example:
      >>> s = search_scale(lambda s: -(s - 2.0) ** 2, (0.5, 1.0, 4.0, 8.0), refine_steps=30)
      >>> round(float(s), 3)
      2.0
    """
    grid = jnp.asarray(scales, jnp.float32)
    values = jax.lax.map(objective, grid)
    best = jnp.argmax(values)
    if refine_steps == 0 or grid.shape[0] < 2:
        return grid[best]
    lo = jnp.log(grid[jnp.maximum(best - 1, 0)])
    hi = jnp.log(grid[jnp.minimum(best + 1, grid.shape[0] - 1)])
    log_scale, refined = _golden_section(lambda t: objective(jnp.exp(t)), lo, hi, refine_steps)
    return jnp.where(refined > values[best], jnp.exp(log_scale), grid[best])


def _check_adaptive(rule: str, aggregator, scales, refine_steps) -> None:
    checks.require(
        callable(aggregator), rule,
        f"needs the aggregator it targets; got aggregator={aggregator!r}. Pass e.g. "
        "aggregator=functools.partial(rbyz.aggregators.median, f=f).",
    )
    checks.require(len(scales) >= 1 and all(s > 0 for s in scales), rule,
                   f"scales must be a non-empty sequence of positive floats; got {scales!r}.")
    checks.static_int(refine_steps, rule, "refine_steps", minimum=0)


def _adaptive(honest, f, rule, aggregator, scales, refine_steps, rows_at):
    _, f = _prepare(honest, f, rule)
    _check_adaptive(rule, aggregator, scales, refine_steps)
    if f == 0:
        return _empty(honest)
    mean = _mean(honest)
    scale = search_scale(
        lambda s: _distance_to_mean(aggregator, honest, mean, rows_at(s)), scales, refine_steps)
    return rows_at(scale)


@_REGISTRY.register()
def alie_adaptive(honest, *, f: int, aggregator: Callable | None = None,
                  scales: Sequence[float] = DEFAULT_SCALES, refine_steps: int = 12,
                  ddof: int = 0, sign: float = -1, key=None):
    """ALIE with ``z`` searched to push ``aggregator``'s output farthest from the honest mean.

    Rows ``mu + sign * z * sigma`` as :func:`alie`, with
    ``z = argmax_z ||aggregator([honest; rows(z)]) - mean(honest)||^2`` over the grid ``scales``
    refined by golden-section search (:func:`search_scale`), as ByzFL's optimal ALIE does with
    its own line search. The aggregator receives the ``h + f`` rows, honest first.
    Knowledge: all *honest* gradients and the *aggregator*.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      aggregator: ``stacked [h + f, ...] -> pytree``, e.g.
        ``functools.partial(rbyz.aggregators.median, f=f)``. Required.
      scales: candidate ``z`` values (static, positive).
      refine_steps: golden-section steps after the grid.
      ddof: delta degrees of freedom of sigma.
      sign: ``-1`` or ``+1``.
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows.

    Example:
      >>> g = jnp.array([[0.0], [1.0], [2.0], [3.0]])
      >>> lowest = lambda x: jnp.min(x, axis=0)
      >>> alie_adaptive(g, f=1, aggregator=lowest, scales=(1.0, 2.0), refine_steps=0)
      Array([[-0.736068]], dtype=float32)

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough`, NeurIPS 2019; Allouah et al., ByzFL
      (`Optimal_ALittleIsEnough`).
    """
    del key
    h, _ = _prepare(honest, f, "alie_adaptive")
    _check_alie(h, f, None, ddof, sign, "alie_adaptive")
    return _adaptive(
        honest, f, "alie_adaptive", aggregator, scales, refine_steps,
        lambda z: _repeat(_alie_shift(honest, z, ddof=ddof, sign=sign), honest, f))


@_REGISTRY.register()
def ipm_adaptive(honest, *, f: int, aggregator: Callable | None = None,
                 scales: Sequence[float] = DEFAULT_SCALES, refine_steps: int = 12, key=None):
    """IPM with ``epsilon`` searched to push ``aggregator``'s output farthest from the mean.

    Rows ``-epsilon * mean(honest)`` as :func:`ipm`, with ``epsilon`` maximising
    ``||aggregator([honest; rows(epsilon)]) - mean(honest)||^2`` (:func:`search_scale`), as
    ByzFL's optimal IPM. Knowledge: all *honest* gradients and the *aggregator*.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      aggregator: ``stacked [h + f, ...] -> pytree``. Required.
      scales: candidate ``epsilon`` values (static, positive).
      refine_steps: golden-section steps after the grid.
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows.

    Example:
      >>> g = jnp.array([[1.0], [1.0], [1.0]])
      >>> mean = lambda x: jnp.mean(x, axis=0)
      >>> ipm_adaptive(g, f=1, aggregator=mean, scales=(0.1, 1.0, 10.0), refine_steps=0)
      Array([[-10.]], dtype=float32)

    References:
      Xie, Koyejo, Gupta, `Fall of Empires`, UAI 2019; Allouah et al., ByzFL
      (`Optimal_InnerProductManipulation`).
    """
    del key
    return _adaptive(honest, f, "ipm_adaptive", aggregator, scales, refine_steps,
                     lambda eps: ipm(honest, f=f, epsilon=eps))


# ------------------------------------------------------------------------------------------
# Sign-domain attacks (majority-vote training, Election Coding).


@_REGISTRY.register()
def sign_reverse(honest, *, f: int, key=None):
    """Sign reverse: Byzantine worker ``i`` sends the negation of its own sign vector.

    Election Coding's default attack: negating every partition sign before the local vote sends
    ``-(honest local majority)``. Knowledge: its *own* sign vector (row ``i % h``).

    Args:
      honest: stacked pytree ``[h, ...]`` of sign vectors (values in {-1, 0, 1}).
      f: number of Byzantine workers (static).
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> sign_reverse(jnp.array([[1.0, -1.0, 0.0]]), f=1)
      Array([[-1.,  1., -0.]], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning`, NeurIPS 2020.
    """
    del key
    _, f = _prepare(honest, f, "sign_reverse")
    return jax.tree.map(jnp.negative, _cycle_rows(honest, f))


@_REGISTRY.register()
def sign_directional(honest, *, f: int, direction: int = -1, key=None):
    """Directional signs: every Byzantine entry is ``direction`` (-1 in the CIFAR code).

    Election Coding's Amazon code sends all ``+1``. Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]`` of sign vectors.
      f: number of Byzantine workers (static).
      direction: ``-1`` or ``+1``.
      key: unused.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> sign_directional(jnp.ones((3, 2)), f=1, direction=1)
      Array([[1., 1.]], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning`, NeurIPS 2020.
    """
    checks.require(direction in (-1, 1), "sign_directional",
                   f"direction must be -1 or +1; got direction={direction!r}.")
    return constant(honest, f=f, value=float(direction), key=key)


@_REGISTRY.register()
def sign_random(honest, *, f: int, key=None):
    """Random signs: every Byzantine entry is an independent uniform draw from {-1, +1}.

    Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]`` of sign vectors.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> out = sign_random(jnp.ones((3, 100)), f=2, key=0)
      >>> bool(jnp.all(jnp.abs(out) == 1))
      True

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning`, NeurIPS 2020.
    """
    _, f = _prepare(honest, f, "sign_random")
    key = checks.as_key(key, "sign_random")
    flat, treedef = jax.tree.flatten(honest)
    keys = jax.random.split(key, len(flat))
    drawn = [
        jnp.where(jax.random.bernoulli(k, 0.5, (f,) + x.shape[1:]), 1, -1).astype(x.dtype)
        for k, x in zip(keys, flat)
    ]
    return jax.tree.unflatten(treedef, drawn)


# ------------------------------------------------------------------------------------------
# Data-level attack.


def label_flip(labels: jax.Array, *, num_classes: int = 10) -> jax.Array:
    """Label flipping: a Byzantine worker trains on ``num_classes - 1 - y`` instead of ``y``.

    A data-level attack for the experiment harness (it is not in the gradient registry).

    Args:
      labels: integer class labels in ``[0, num_classes)``, any shape.
      num_classes: the number of classes (static, >= 1).

    Returns:
      The flipped labels, same shape and dtype.

    Example:
      >>> label_flip(jnp.array([0, 3, 9]))
      Array([9, 6, 0], dtype=int32)

    References:
      Karimireddy, He, Jaggi, `Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing`, ICLR 2022.
    """
    num_classes = checks.static_int(num_classes, "label_flip", "num_classes", minimum=1)
    labels = jnp.asarray(labels)
    checks.require(jnp.issubdtype(labels.dtype, jnp.integer), "label_flip",
                   f"needs integer labels; got dtype {labels.dtype}.")
    return (num_classes - 1 - labels).astype(labels.dtype)


# ------------------------------------------------------------------------------------------
# Building the full stack.


class Injected(NamedTuple):
    """What :func:`inject` returns: the ``[n, ...]`` updates and the ``[n]`` Byzantine mask."""

    updates: Any
    byzantine: jax.Array


def _byzantine_indices(n: int, f: int, positions, key) -> jax.Array:
    if isinstance(positions, str):
        checks.require(positions in ("random", "first", "last"), "inject",
                       f"positions must be 'random', 'first', 'last' or {f} indices; got "
                       f"{positions!r}.")
        if positions == "first":
            return jnp.arange(f)
        if positions == "last":
            return jnp.arange(n - f, n)
        return jax.random.permutation(key, n)[:f]
    index = jnp.asarray(positions)
    checks.require(index.shape == (f,) and jnp.issubdtype(index.dtype, jnp.integer), "inject",
                   f"explicit positions must be {f} integer indices (one per Byzantine worker); "
                   f"got shape {index.shape}, dtype {index.dtype}.")
    if not isinstance(positions, jax.Array):
        values = np.asarray(positions)
        checks.require(len(set(values.tolist())) == f and values.min(initial=0) >= 0
                       and values.max(initial=0) < n, "inject",
                       f"explicit positions must be distinct indices in [0, {n}); got "
                       f"{values.tolist()}.")
    return index


def inject(honest, attack: Callable | str, *, f: int, key=None, positions="random",
           omniscient: bool = True, **hparams) -> Injected:
    """Replaces ``f`` of the ``n`` honest rows with the rows an attack produces.

    Byzantine positions are ``"random"`` (drawn from ``key``: a new key each step redraws
    them), ``"first"``, ``"last"`` or explicit (``f`` distinct indices, fixed). The attack sees
    the ``n - f`` honest workers' rows when ``omniscient`` (the default), and only the Byzantine
    workers' own honest rows otherwise; it gets an independent subkey. Everything has fixed
    shapes, so the step compiles once. Needs ``0 <= f < n``.

    Args:
      honest: stacked pytree ``[n, ...]``: what every worker would send if honest.
      attack: an attack function or its registered name.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key; needed for random positions and random attacks.
      positions: ``"random"``, ``"first"``, ``"last"`` or a sequence of ``f`` indices.
      omniscient: whether the attack knows the honest workers' rows.
      **hparams: forwarded to the attack (e.g. ``n=25`` for :func:`alie`).

    Returns:
      :class:`Injected` ``(updates, byzantine)``: the ``[n, ...]`` stack and the ``[n]`` mask.

    Example:
      >>> g = jnp.arange(8.0).reshape(4, 2)
      >>> out = inject(g, "constant", f=1, positions="last", value=-1.0)
      >>> out.updates[3], out.byzantine
      (Array([-1., -1.], dtype=float32), Array([False, False, False,  True], dtype=bool))
    """
    n = tree_util.num_workers(honest, "inject")
    f = checks.byzantine_count(f, n, "inject", "f < n", lambda n, f: f < n)
    attack_fn = get(attack) if isinstance(attack, str) else attack
    needs_key = isinstance(positions, str) and positions == "random"
    checks.require(not (needs_key and key is None), "inject",
                   "positions='random' needs a key; got key=None. Pass key=... (a new one each "
                   "step redraws the positions) or fixed positions.")
    position_key = attack_key = None
    if key is not None:
        position_key, attack_key = jax.random.split(checks.as_key(key, "inject"))
    byzantine = _byzantine_indices(n, f, positions, position_key)
    mask = jnp.zeros((n,), bool).at[byzantine].set(True)
    if f == 0:
        return Injected(honest, mask)
    # A stable argsort of the mask lists the honest workers in index order.
    honest_index = jnp.argsort(mask, stable=True)[: n - f]
    known = tree_util.take_rows(honest, honest_index if omniscient else byzantine)
    rows = attack_fn(known, f=f, key=attack_key, **hparams)
    expected = jax.tree.map(lambda x: (f,) + x.shape[1:], honest)
    got = jax.tree.map(jnp.shape, rows)
    checks.require(jax.tree.structure(rows) == jax.tree.structure(honest) and got == expected,
                   "inject", f"the attack must return [f, ...] rows like honest; got {got}, "
                   f"expected {expected}.")
    updates = jax.tree.map(lambda x, r: x.at[byzantine].set(r.astype(x.dtype)), honest, rows)
    return Injected(updates, mask)


__all__ = (
    "DEFAULT_SCALES",
    "Injected",
    "alie",
    "alie_adaptive",
    "alie_z",
    "bit_flip",
    "constant",
    "gaussian",
    "get",
    "inject",
    "ipm",
    "ipm_adaptive",
    "label_flip",
    "mimic",
    "min_max",
    "min_sum",
    "names",
    "non_finite",
    "reverse",
    "search_scale",
    "sign_directional",
    "sign_flip",
    "sign_random",
    "sign_reverse",
)
