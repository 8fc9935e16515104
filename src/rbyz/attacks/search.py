"""A worst-case search over one positive scale, inside jit, with fixed shapes.

The adaptive attacks look for the scale of their rows (ALIE's ``z``, IPM's ``epsilon``) that
pushes a defence's output farthest. The objective often keeps growing without bound (against the
mean it grows as the square of the scale), so a grid with a fixed top would report the top of the
grid as the worst case. :func:`search_scale` evaluates a base grid, extends it geometrically for
as long as the objective keeps growing, up to a documented cap, refines around the best point,
and says whether the best point was the end of the range (:attr:`ScaleSearch.at_end`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks


class _Grid(tuple):
    """A tuple of scales that prints as the expression that made it (for ``rbyz list``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"geomspace({self[0]:g}, {self[-1]:g}, {len(self)})"


# The base grid: wide enough for ALIE's z (~0.1-3) and IPM's epsilon against medians (~0.1),
# six points a decade.
DEFAULT_SCALES = _Grid(float(s) for s in np.geomspace(1e-2, 1e2, 25))
# How far the grid may be extended: well past the 1e7 ByzFL's optimal attacks reach against the
# mean, while squared distances of unit-size gradients (~1e24 a coordinate) stay far from
# float32's overflow (~3e38).
MAX_SCALE = 1e12
# The ratio between the extension points: that of DEFAULT_SCALES.
GROWTH = 10.0 ** (1.0 / 6.0)
# Extension points evaluated per step of the while loop (one decade at GROWTH).
_BLOCK = 6


class ScaleSearch(NamedTuple):
    """What :func:`search_scale` found.

    Attributes:
      scale: the scale with the largest objective (float32 scalar).
      value: the objective there (the objective's dtype; ``-inf`` if it was never finite).
      at_end: bool scalar, ``True`` when the best scale is the last one the search could use:
        the objective was still growing at the end of the range (``max_scale``, or the last
        scale before the objective stopped being finite). The true worst case then lies beyond
        the range (the mean has none); raise ``max_scale`` or treat the attack as unbounded.
    """

    scale: jax.Array
    value: jax.Array
    at_end: jax.Array


def _usable_prefix(values: jax.Array, valid: jax.Array):
    """``(values with -inf after the first unusable point, index of that point or len)``."""
    ok = valid & jnp.isfinite(values)
    first_bad = jnp.where(jnp.all(ok), ok.shape[0], jnp.argmin(ok)).astype(jnp.int32)
    inside = jnp.arange(ok.shape[0], dtype=jnp.int32) < first_bad
    return jnp.where(inside, values, -jnp.inf), first_bad


def _extension(top: float, max_scale: float, growth: float) -> np.ndarray:
    """The static scales beyond ``top``: ``top * growth^j``, the last one clipped to the cap."""
    if max_scale <= top:
        return np.zeros((0,), np.float32)
    count = math.ceil(math.log(max_scale / top) / math.log(growth) - 1e-9)
    points = top * growth ** np.arange(1, count + 1, dtype=np.float64)
    return np.minimum(points, max_scale).astype(np.float32)


def check_settings(scales, refine_steps, max_scale, growth, rtol, rule: str) -> int:
    """Validates the settings of :func:`search_scale`; returns ``refine_steps``."""
    checks.require(
        len(scales) >= 1 and all(s > 0 for s in scales)
        and all(a < b for a, b in zip(scales, scales[1:])), rule,
        f"scales must be a non-empty increasing sequence of positive floats; got {scales!r}.")
    checks.require(max_scale >= scales[-1], rule,
                   f"needs max_scale >= the last grid scale; got max_scale={max_scale!r}, "
                   f"scales[-1]={scales[-1]!r}. Pass max_scale=scales[-1] not to extend the grid.")
    checks.require(growth > 1, rule, f"needs growth > 1; got growth={growth!r}.")
    checks.require(rtol >= 0, rule, f"needs rtol >= 0; got rtol={rtol!r}.")
    return checks.static_int(refine_steps, rule, "refine_steps", minimum=0)


class _Search(NamedTuple):
    """The carry of the search loop: the grid phase, then the refinement rounds."""

    step: jax.Array  # blocks of the grid evaluated (int32)
    rounds: jax.Array  # refinement rounds done (int32)
    refining: jax.Array  # bool: the grid phase is over
    best: jax.Array  # grid index of the best grid scale (int32)
    last: jax.Array  # grid index of the last usable grid scale, -1 if none (int32)
    value: jax.Array  # the best objective value
    lowest: jax.Array  # the lowest finite value on the base grid
    scale: jax.Array  # the best scale (float32)
    log_scale: jax.Array  # its log, and the refinement bracket [lo, hi] in log-space
    lo: jax.Array
    hi: jax.Array
    at_end: jax.Array  # bool, set when the grid phase ends


def _grid_step(state: _Search, found, first_bad, *, every, base_blocks, blocks, rtol):
    """One block of grid scales evaluated: the best so far, the usable range, whether to go on."""
    offset = state.step * _BLOCK
    in_base = state.step < base_blocks
    j = jnp.argmax(found).astype(jnp.int32)
    # Growth is measured against how far the objective has moved since the smallest base
    # scale, so that an offset in the objective does not change where the search stops.
    moved = state.value - state.lowest
    needed = jnp.where(in_base, state.value,
                       state.value + rtol * jnp.where(jnp.isfinite(moved), moved, 0))
    better = found[j] > needed
    best = jnp.where(better, offset + j, state.best)
    last = jnp.where(first_bad > 0, offset + first_bad - 1, state.last)
    lowest = jnp.where(in_base, jnp.minimum(
        state.lowest, jnp.min(jnp.where(jnp.isfinite(found), found, jnp.inf))), state.lowest)
    step = state.step + 1
    going_on = (first_bad == _BLOCK) & ((step < base_blocks)
                                        | ((best == last) & (step < blocks)))
    log_every = jnp.log(every)
    return state._replace(
        step=step, refining=~going_on, best=best, last=last,
        value=jnp.where(better, found[j], state.value), lowest=lowest, scale=every[best],
        log_scale=log_every[best], lo=log_every[jnp.maximum(best - 1, 0)],
        hi=log_every[jnp.clip(best + 1, 0, jnp.maximum(last, 0))],
        at_end=(best == last) & (last >= 0))


def _refine_step(state: _Search, logs, found):
    """One refinement round: the best of the bracket's interior points, and a narrower bracket
    (the nearest evaluated points on either side of the best scale)."""
    j = jnp.argmax(found)
    better = found[j] > state.value
    log_scale = jnp.where(better, logs[j], state.log_scale)
    known = jnp.concatenate([state.lo[None], logs, state.hi[None]])
    below = jnp.max(jnp.where(known < log_scale, known, -jnp.inf))
    above = jnp.min(jnp.where(known > log_scale, known, jnp.inf))
    return state._replace(
        rounds=state.rounds + 1, value=jnp.where(better, found[j], state.value),
        scale=jnp.where(better, jnp.exp(logs[j]), state.scale), log_scale=log_scale,
        lo=jnp.where(jnp.isfinite(below), below, log_scale),
        hi=jnp.where(jnp.isfinite(above), above, log_scale))


def search_scale(objective: Callable[[jax.Array], jax.Array],
                 scales: Sequence[float] = DEFAULT_SCALES, refine_steps: int = 4, *,
                 max_scale: float = MAX_SCALE, growth: float = GROWTH,
                 rtol: float = 1e-3) -> ScaleSearch:
    """The scale that maximises ``objective``: a grid, extended while it grows, then refined.

    1. The base grid ``scales`` is evaluated, six scales at a time.
    2. While the best value is at the last scale evaluated (the objective is still growing), the
       grid is extended by ``top * growth^j``, six points at a time, up to ``max_scale``. An
       extension block counts only if it improves the best value by more than ``rtol`` times
       the best value's rise over the lowest value of the base grid, so a plateau (a defence
       whose output stopped moving) ends the search.
    3. ``refine_steps`` rounds, each evaluating six scales evenly spaced in log-space between
       the best scale's neighbours and narrowing the bracket to the points around the best one
       (about 3.5 times a round). A refined scale is kept only if it is better, so the result is
       never worse than the best grid point.

    Non-finite objective values count as unusable: the range ends at the first one. All of it
    is one ``lax.while_loop`` whose body evaluates the objective on six scales (``lax.map``):
    fixed shapes, one copy of the objective to compile, one compilation under jit. At most
    ``6 * ceil((len(scales) + ceil(log(max_scale / scales[-1]) / log(growth))) / 6) + 6 *
    refine_steps`` evaluations (114 by default).

    Args:
      objective: ``scale (float32 scalar) -> real scalar`` to maximise (traceable).
      scales: the base grid, positive and increasing (static).
      refine_steps: refinement rounds of six evaluations after the grid (static, >= 0).
      max_scale: the cap of the extension (static, >= ``scales[-1]``; equal: no extension).
      growth: ratio between extension points (static, > 1).
      rtol: relative improvement an extension block needs for the search to go on.

    Returns:
      :class:`ScaleSearch` ``(scale, value, at_end)``.

    Example:
      >>> s = search_scale(lambda s: -(s - 2.0) ** 2, (0.5, 1.0, 4.0, 8.0))
      >>> round(float(s.scale), 2), bool(s.at_end)
      (2.0, False)
      >>> s = search_scale(lambda s: s, (0.5, 1.0), max_scale=1e9)  # grows without bound
      >>> float(s.scale), bool(s.at_end)
      (1000000000.0, True)
    """
    refine_steps = check_settings(scales, refine_steps, max_scale, growth, rtol, "search_scale")
    grid = np.concatenate([np.asarray(scales, np.float32),
                           _extension(float(scales[-1]), float(max_scale), float(growth))])
    size = grid.shape[0]
    blocks = -(-size // _BLOCK)
    every = jnp.asarray(np.pad(grid, (0, blocks * _BLOCK - size), mode="edge"))
    fractions = jnp.arange(1, _BLOCK + 1, dtype=jnp.float32) / (_BLOCK + 1)
    dtype = jax.eval_shape(objective, jax.ShapeDtypeStruct((), jnp.float32)).dtype
    zero = jnp.float32(0)
    start = _Search(
        step=jnp.int32(0), rounds=jnp.int32(0), refining=jnp.bool_(False), best=jnp.int32(0),
        last=jnp.int32(-1), value=jnp.asarray(-jnp.inf, dtype),
        lowest=jnp.asarray(jnp.inf, dtype), scale=every[0], log_scale=zero, lo=zero, hi=zero,
        at_end=jnp.bool_(False))

    def evaluate(state: _Search) -> _Search:
        offset = jnp.minimum(state.step, blocks - 1) * _BLOCK
        logs = state.lo + (state.hi - state.lo) * fractions
        points = jnp.where(state.refining, jnp.exp(logs),
                           jax.lax.dynamic_slice(every, (offset,), (_BLOCK,)))
        values = jax.lax.map(objective, points)
        valid = state.refining | (offset + jnp.arange(_BLOCK, dtype=jnp.int32) < size)
        found, first_bad = _usable_prefix(values, valid)
        on_grid = _grid_step(state, found, first_bad, every=every,
                             base_blocks=-(-len(scales) // _BLOCK), blocks=blocks, rtol=rtol)
        refined = _refine_step(state, logs, jnp.where(jnp.isfinite(values), values, -jnp.inf))
        return jax.tree.map(lambda r, g: jnp.where(state.refining, r, g), refined, on_grid)

    final = jax.lax.while_loop(lambda s: ~s.refining | (s.rounds < refine_steps), evaluate,
                               start)
    return ScaleSearch(final.scale, final.value, final.at_end)
