"""Min-Max and Min-Sum (Shejwalkar and Houmansadr): the farthest shift that still looks honest.

The Byzantine row is ``mean - gamma * p`` with ``gamma`` as large as a distance constraint to the
honest rows allows. Along the line the squared distances are quadratics in ``gamma``, so the
search runs on scalars: ``||mean - gamma p - g_i||^2 = c_i - 2 gamma e_i + gamma^2 q``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz.attacks import _common

_DIRECTIONS = ("unit_vec", "sign", "std")

_NOTE = ("direction='std' as the authors' notebooks. Their search moves gamma from 10 in halving "
         "steps until a step changes it by at most 1e-5; rbyz doubles from gamma_init=10, then "
         "bisects 40 times and returns the feasible end: both approach the largest feasible "
         "gamma.")


def _direction(honest, mean, kind: str, dtype):
    if kind == "unit_vec":
        norm = jnp.sqrt(_common.tree_vdot(mean, mean, dtype))
        return jax.tree.map(lambda m: m / jnp.maximum(norm, jnp.finfo(dtype).tiny).astype(m.dtype),
                            mean)
    if kind == "sign":
        return jax.tree.map(jnp.sign, mean)
    # The scale of the direction does not matter (gamma absorbs it), so ddof is irrelevant.
    return _common.std(honest, 0)


def _largest_feasible(feasible, start, steps: int) -> jax.Array:
    """The largest ``gamma >= 0`` with ``feasible(gamma)``, for a feasible set ``[0, gamma*]``.

    Doubles ``start`` until it fails (at most 64 times), then bisects ``steps`` times; the lower
    end, always feasible, is returned.
    """

    def grow(state):
        hi, count = state
        return hi * 2, count + 1

    hi, _ = jax.lax.while_loop(lambda s: feasible(s[0]) & (s[1] < 64), grow, (start, 0))
    lo = jnp.where(feasible(hi), hi, jnp.where(hi > start, hi / 2, jnp.zeros_like(hi)))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = feasible(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, steps, bisect, (lo, hi))
    return lo


def _pairwise_from_offsets(offsets, sq_norms: jax.Array, dtype) -> jax.Array:
    """``[h, h]`` squared distances ``|o_i|^2 + |o_j|^2 - 2 <o_i, o_j>`` of mean-centred rows.

    The rows are already centred at their mean, so the Gram form keeps its digits; HIGHEST
    precision keeps GPUs from using TF32.
    """
    gram = sum(
        jnp.matmul(o.reshape(o.shape[0], -1).astype(dtype),
                   o.reshape(o.shape[0], -1).astype(dtype).T,
                   precision=jax.lax.Precision.HIGHEST)
        for o in jax.tree.leaves(offsets)
    )
    return jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * gram, 0)


def _min_max_sum(honest, *, f: int, direction: str, gamma_init: float, steps: int,
                 rule: str, objective: str):
    h, f = _common.prepare(honest, f, rule)
    checks.require(direction in _DIRECTIONS, rule,
                   f"direction must be one of {_DIRECTIONS}; got {direction!r}.")
    checks.require(gamma_init > 0, rule, f"needs gamma_init > 0; got {gamma_init!r}.")
    steps = checks.static_int(steps, rule, "steps", minimum=0)
    if f == 0:
        return _common.empty(honest)
    dtype = _common.acc_dtype(honest)
    mean = _common.mean(honest)
    perturbation = _direction(honest, mean, direction, dtype)
    # c_i comes from direct differences, which keeps close honest gradients accurate.
    offsets = jax.tree.map(lambda x, m: m[None] - x.astype(m.dtype), honest, mean)
    c = _common.row_dots(offsets, offsets, dtype)
    e = _common.row_dots(offsets, perturbation, dtype)
    q = _common.tree_vdot(perturbation, perturbation, dtype)
    pairwise = _pairwise_from_offsets(offsets, c, dtype)
    if objective == "max":
        threshold, reduce = jnp.max(pairwise), jnp.max
    else:
        threshold, reduce = jnp.min(jnp.sum(pairwise, axis=1)), jnp.sum

    def feasible(gamma):
        return reduce(c - 2 * gamma * e + gamma * gamma * q) <= threshold

    gamma = _largest_feasible(feasible, jnp.asarray(gamma_init, dtype), steps)
    shifted = jax.tree.map(lambda m, p: m - gamma.astype(m.dtype) * p.astype(m.dtype), mean,
                           perturbation)
    return _common.repeat(shifted, honest, f)


_DOC = """{title}: the Byzantine workers send ``mean - gamma * p`` with gamma maximal.

    The constraint: {constraint}. ``mean`` is the mean of the honest gradients ``g_i`` and the
    direction ``p`` is ``"unit_vec"`` (``mean / ||mean||``), ``"sign"`` (``sign(mean)``) or
    ``"std"`` (the coordinate-wise standard deviation, the default of the authors' notebooks).
    The feasible ``gamma`` form an interval ``[0, gamma*]`` (the constraint is convex in
    ``gamma`` and holds at 0), found inside jit by doubling from ``gamma_init`` and ``steps``
    bisection steps on the squared distances, returned at the feasible end. Distances are
    accumulated in float32 for 16-bit inputs, in float64 for float64 ones. Knowledge: all
    *honest* gradients (or the attackers' *own*); ``h >= 1``, any ``f >= 0``.

    Args:
      honest: stacked pytree ``[h, ...]``.
      f: number of Byzantine workers (static).
      direction: ``"std"``, ``"unit_vec"`` or ``"sign"``.
      gamma_init: first upper bound tried (10, as in the reference search).
      steps: bisection steps (40 halve the bracket to float32 resolution).

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

_DECLARATION = dict(constraint=_spec.MINORITY, reference=(_common.SHEJWALKAR,),
                    cost="O(n^2 d + n^2 steps)", note=_NOTE)


@_common.declare_attack(**_DECLARATION)
def min_max(honest, *, f: int, direction: str = "std", gamma_init: float = 10.0,
            steps: int = 40):
    return _min_max_sum(honest, f=f, direction=direction, gamma_init=gamma_init, steps=steps,
                        rule="min_max", objective="max")


@_common.declare_attack(**_DECLARATION)
def min_sum(honest, *, f: int, direction: str = "std", gamma_init: float = 10.0,
            steps: int = 40):
    return _min_max_sum(honest, f=f, direction=direction, gamma_init=gamma_init, steps=steps,
                        rule="min_sum", objective="sum")


min_max.__doc__ = _DOC.format(
    title="Min-Max", name="min_max",
    constraint="``max_i ||m - g_i||^2 <= max_{i,j} ||g_i - g_j||^2``: the malicious ``m`` is no "
    "farther from any honest gradient than the two farthest honest ones are from each other")
min_sum.__doc__ = _DOC.format(
    title="Min-Sum", name="min_sum",
    constraint="``sum_i ||m - g_i||^2 <= min_j sum_i ||g_j - g_i||^2``: the malicious ``m`` is "
    "no farther from the honest ones in total than the most central honest gradient")
