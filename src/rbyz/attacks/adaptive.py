"""Adaptive attacks: ALIE and IPM with their scale searched against the defence they target.

The objective is ByzFL's: the squared distance between the defence's output on the honest rows
followed by the Byzantine ones and the honest mean. The scale is searched by
:func:`rbyz.attacks.search_scale`, whose range grows until the defence's output stops moving (or
the cap ``max_scale``): against the mean, which has no worst case, it runs to the cap, and
``*_search(...).at_end`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz.attacks import _common
from rbyz.attacks import search as search_lib
from rbyz.attacks import statistical

_NOTE = ("ByzFL's Optimal_ALittleIsEnough / Optimal_InnerProductManipulation search their factor "
         "with a line maximisation of 16 evaluations; rbyz evaluates a base grid of 25 scales "
         "(1e-2 to 1e2), extends it while the objective grows up to max_scale=1e12, then refines "
         "it in 4 rounds of 6 evaluations.")
_COST = "O(S (n d + A(n, d))): S <= 114 evaluations of the targeted aggregator A"


def _distance_to_mean(aggregator, honest, mean, byzantine, dtype):
    stacked = jax.tree.map(lambda x, b: jnp.concatenate([x, b]), honest, byzantine)
    out = aggregator(stacked)
    diff = jax.tree.map(lambda o, m: o.astype(dtype) - m.astype(dtype), out, mean)
    return _common.tree_vdot(diff, diff, dtype)


def _check(rule, aggregator, scales, refine_steps, max_scale) -> None:
    checks.require(
        callable(aggregator), rule,
        f"needs the aggregator it targets; got aggregator={aggregator!r}. Pass e.g. "
        "aggregator=functools.partial(rbyz.aggregators.median, f=f).",
    )
    search_lib.check_settings(scales, refine_steps, max_scale, search_lib.GROWTH, 0.0, rule)


def _search(honest, rule, aggregator, scales, refine_steps, max_scale, rows_at):
    dtype = _common.acc_dtype(honest)
    mean = _common.mean(honest)
    return search_lib.search_scale(
        lambda s: _distance_to_mean(aggregator, honest, mean, rows_at(s), dtype),
        scales, refine_steps, max_scale=max_scale)


def alie_adaptive_search(honest, *, f: int, aggregator: Callable,
                         scales: Sequence[float] = search_lib.DEFAULT_SCALES,
                         refine_steps: int = 4, max_scale: float = search_lib.MAX_SCALE,
                         ddof: int = 0, sign: float = -1) -> search_lib.ScaleSearch:
    """The search behind :func:`alie_adaptive`: its ``z``, the objective there, and ``at_end``.

    Same arguments as :func:`alie_adaptive`. ``at_end`` is ``True`` when the objective was still
    growing at ``max_scale`` (the defence has no bounded worst case along ALIE's direction).

    Example:
      >>> g = jnp.array([[0.0], [1.0], [2.0], [3.0]])
      >>> s = alie_adaptive_search(g, f=1, aggregator=lambda x: x.mean(0))
      >>> f"{float(s.scale):.0e}", bool(s.at_end)  # the mean has no worst case: the cap
      ('1e+12', True)
    """
    h, f = _common.prepare(honest, f, "alie_adaptive")
    ddof = statistical.check_alie(h, ddof, sign, "alie_adaptive")
    _check("alie_adaptive", aggregator, scales, refine_steps, max_scale)
    return _search(honest, "alie_adaptive", aggregator, scales, refine_steps, max_scale,
                   lambda z: statistical.alie_rows(honest, f, z, ddof=ddof, sign=sign))


def ipm_adaptive_search(honest, *, f: int, aggregator: Callable,
                        scales: Sequence[float] = search_lib.DEFAULT_SCALES,
                        refine_steps: int = 4,
                        max_scale: float = search_lib.MAX_SCALE) -> search_lib.ScaleSearch:
    """The search behind :func:`ipm_adaptive`: its ``epsilon``, the objective, and ``at_end``.

    Same arguments as :func:`ipm_adaptive`.

    Example:
      >>> g = jnp.array([[1.0], [2.0], [6.0]])
      >>> s = ipm_adaptive_search(g, f=1, aggregator=lambda x: jnp.median(x, axis=0))
      >>> bool(s.at_end)
      False
    """
    _, f = _common.prepare(honest, f, "ipm_adaptive")
    _check("ipm_adaptive", aggregator, scales, refine_steps, max_scale)
    return _search(honest, "ipm_adaptive", aggregator, scales, refine_steps, max_scale,
                   lambda eps: statistical.ipm(honest, f=f, epsilon=eps))


@_common.declare_attack(constraint=_spec.MINORITY, reference=(_common.BARUCH, _common.BYZFL),
                        cost=_COST, note=_NOTE)
def alie_adaptive(honest, *, f: int, aggregator: Callable,
                  scales: Sequence[float] = search_lib.DEFAULT_SCALES, refine_steps: int = 4,
                  max_scale: float = search_lib.MAX_SCALE, ddof: int = 0, sign: float = -1):
    """ALIE with ``z`` searched to push ``aggregator``'s output farthest from the honest mean.

    Rows ``mu + sign * z * sigma`` as :func:`alie`, with
    ``z = argmax_z ||aggregator([honest; rows(z)]) - mean(honest)||^2``, found by
    :func:`search_scale`: the grid ``scales``, extended while the objective grows up to
    ``max_scale``, then refined, as ByzFL's optimal ALIE does with its own line search. The
    aggregator receives the ``h + f`` rows, honest first. Whether the search hit the end of its
    range (the defence has no worst case below ``max_scale``, e.g. the mean) is reported by
    :func:`alie_adaptive_search`. Knowledge: all *honest* gradients and the *aggregator*.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      aggregator: ``stacked [h + f, ...] -> pytree``, e.g.
        ``functools.partial(rbyz.aggregators.median, f=f)``. Required.
      scales: the base grid of ``z`` values (static, positive, increasing).
      refine_steps: refinement rounds (six evaluations each) after the grid.
      max_scale: the largest ``z`` the extended grid may reach (1e12).
      ddof: delta degrees of freedom of sigma.
      sign: ``-1`` or ``+1``.

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows.

    Example:
      >>> g = jnp.array([[0.0], [1.0], [2.0], [3.0]])
      >>> lowest = lambda x: jnp.min(x, axis=0)
      >>> alie_adaptive(g, f=1, aggregator=lowest, scales=(1.0, 2.0), refine_steps=0,
      ...               max_scale=2.0)
      Array([[-0.736068]], dtype=float32)

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough`, NeurIPS 2019; González et al., `ByzFL:
      Research Framework for Robust Federated Learning`, arXiv:2505.24802, 2025
      (`Optimal_ALittleIsEnough`).
    """
    h, f = _common.prepare(honest, f, "alie_adaptive")
    statistical.check_alie(h, ddof, sign, "alie_adaptive")
    _check("alie_adaptive", aggregator, scales, refine_steps, max_scale)
    if f == 0:
        return _common.empty(honest)
    found = alie_adaptive_search(honest, f=f, aggregator=aggregator, scales=scales,
                                 refine_steps=refine_steps, max_scale=max_scale, ddof=ddof,
                                 sign=sign)
    return statistical.alie_rows(honest, f, found.scale, ddof=ddof, sign=sign)


@_common.declare_attack(constraint=_spec.MINORITY, reference=(_common.XIE, _common.BYZFL),
                        cost=_COST, note=_NOTE)
def ipm_adaptive(honest, *, f: int, aggregator: Callable,
                 scales: Sequence[float] = search_lib.DEFAULT_SCALES, refine_steps: int = 4,
                 max_scale: float = search_lib.MAX_SCALE):
    """IPM with ``epsilon`` searched to push ``aggregator``'s output farthest from the mean.

    Rows ``-epsilon * mean(honest)`` as :func:`ipm`, with ``epsilon`` maximising
    ``||aggregator([honest; rows(epsilon)]) - mean(honest)||^2`` (:func:`search_scale`, grid
    extended up to ``max_scale``), as ByzFL's optimal IPM. :func:`ipm_adaptive_search` reports
    whether the search hit the end of its range. Knowledge: all *honest* gradients and the
    *aggregator*.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      aggregator: ``stacked [h + f, ...] -> pytree``. Required.
      scales: the base grid of ``epsilon`` values (static, positive, increasing).
      refine_steps: refinement rounds (six evaluations each) after the grid.
      max_scale: the largest ``epsilon`` the extended grid may reach (1e12).

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows.

    Example:
      >>> g = jnp.array([[1.0], [1.0], [1.0]])
      >>> mean = lambda x: jnp.mean(x, axis=0)
      >>> ipm_adaptive(g, f=1, aggregator=mean, scales=(0.1, 1.0, 10.0), refine_steps=0)
      Array([[-1.e+12]], dtype=float32)

    References:
      Xie, Koyejo, Gupta, `Fall of Empires`, UAI 2019; González et al., `ByzFL: Research
      Framework for Robust Federated Learning`, arXiv:2505.24802, 2025
      (`Optimal_InnerProductManipulation`).
    """
    _, f = _common.prepare(honest, f, "ipm_adaptive")
    _check("ipm_adaptive", aggregator, scales, refine_steps, max_scale)
    if f == 0:
        return _common.empty(honest)
    found = ipm_adaptive_search(honest, f=f, aggregator=aggregator, scales=scales,
                                refine_steps=refine_steps, max_scale=max_scale)
    return statistical.ipm(honest, f=f, epsilon=found.scale)
