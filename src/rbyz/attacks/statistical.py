"""Statistical attacks: rows built from the honest mean and spread (ALIE, IPM).

A Little Is Enough hides in the honest spread, ``mu - z * sigma`` with ``z`` just small enough
that the rows still look honest to a majority; inner-product manipulation sends the reversed
mean ``-epsilon * mu``. Both send one row, repeated for every Byzantine worker.
"""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.attacks import _common

_VARIANTS = ("v1", "v2")


def _quantile(n: int, f: int, variant: str) -> tuple[float, str]:
    """``(q, the formula with its numbers)`` of :func:`alie_z`."""
    supporters = math.floor(n / 2 + 1) - f
    if variant == "v1":
        return (n - supporters) / n, f"q_v1 = (n - s)/n = {n - supporters}/{n}"
    return ((n - f - supporters) / (n - f),
            f"q_v2 = (n - f - s)/(n - f) = {n - f - supporters}/{n - f}")


def alie_z(n: int, f: int, *, variant: str = "v1") -> float:
    """The largest z of "A Little Is Enough" for ``n`` workers of which ``f`` are Byzantine.

    ``s = floor(n/2 + 1) - f`` honest "supporters" are needed for a majority, and
    ``z = Phi^{-1}(q)`` with

    - ``q_v1 = (n - s)/n`` (default): Algorithm 1 of the paper (arXiv v1);
    - ``q_v2 = (n - f - s)/(n - f)``: counts only the honest workers, as the epfml
      (byzantine-robust-noniid-optimizer), Blades and NDSS'21 code do.

    At ``n = 51, f = 12`` (the paper's setting) ``v1`` gives 0.599 and ``v2`` 0.361; at
    ``n = 10, f = 2`` ``v1`` gives 0.253 and ``v2`` 0. The formula is returned as is, even when
    ``z <= 0`` (:func:`alie` refuses such a ``z``). Needs ``0 <= f < floor(n/2 + 1)``
    (``s >= 1``) and ``0 < q < 1``.

    Args:
      n: the number of workers (Python int).
      f: the number of Byzantine workers, called ``m`` in the paper (Python int).
      variant: ``"v1"`` (default) or ``"v2"``.

    Returns:
      z as a Python float (static; computed with ``statistics.NormalDist``).

    Example:
      >>> round(alie_z(51, 12), 3), round(alie_z(51, 12, variant="v2"), 3)
      (0.599, 0.361)

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
      Learning`, NeurIPS 2019.
    """
    n = checks.static_int(n, "alie_z", "n", minimum=1)
    f = checks.static_int(f, "alie_z", "f", minimum=0)
    checks.require(variant in _VARIANTS, "alie_z",
                   f"variant must be 'v1' or 'v2'; got {variant!r}.")
    checks.require(
        math.floor(n / 2 + 1) - f >= 1, "alie_z",
        f"needs f < floor(n/2 + 1) (the attackers must lack a majority); got n={n}, f={f}. "
        "Use fewer Byzantine workers or pass a fixed z.",
    )
    q, formula = _quantile(n, f, variant)
    checks.require(
        0.0 < q < 1.0, "alie_z",
        f"the quantile {formula} = {q} is outside (0, 1) for n={n}, f={f}; pass a fixed z "
        "instead.",
    )
    return statistics.NormalDist().inv_cdf(q)


def _positive_z(n: int, f: int, variant: str) -> float:
    """:func:`alie_z`, or a ``ValueError`` saying how to get a real attack when it is ``<= 0``."""
    z = alie_z(n, f, variant=variant)
    if z > 0:
        return z
    other = "v2" if variant == "v1" else "v1"
    try:
        alternative = alie_z(n, f, variant=other)
    except ValueError:
        alternative = 0.0
    instead = (f", or variant={other!r}, which gives z={alternative:.3f} here"
               if alternative > 0 else "")
    raise ValueError(
        f"alie: z = Phi^-1({_quantile(n, f, variant)[1]}) = {z:.3f} <= 0 for n={n}, f={f} "
        f"(variant={variant!r}, s = floor(n/2 + 1) - f = {math.floor(n / 2 + 1) - f} "
        "supporters): the Byzantine rows would sit at the honest mean or on its far side, "
        "which is no attack. Pass z=... explicitly (1.0 as in DETOX, 1.5 as in the ALIE code "
        f"and ByzFL){instead}."
    )


def _column_sums(x: jax.Array) -> jax.Array:
    """``sum_i x[i]`` over the rows of ``x [h, ...]``, as one matrix-vector product.

    Written as unrolled row additions (or ``jnp.sum(axis=0)``), the sum is an elementwise
    expression that XLA's CPU backend fuses into every consumer: the centred rows ``x - mu`` of
    the standard deviation then recompute the whole ``h``-row mean for each of their ``h``
    rows (``h^2`` reads per coordinate), and the Byzantine rows once more. A dot is never fused
    into its consumers, so the mean is computed once: ALIE on ``[20, 79510]`` float32 takes
    0.5 ms instead of 1.4-1.7 ms (2 CPU cores, jax 0.10.2; ``jnp.mean``/``jnp.std`` over axis
    0: 10-14 ms), about the two passes over memory it needs. ``HIGHEST``
    keeps the full precision of the input on accelerators (no TF32 or bf16 passes).
    """
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: leaves may be empty
    ones = jnp.ones((x.shape[0],), x.dtype)
    return jnp.dot(ones, flat, precision=jax.lax.Precision.HIGHEST).reshape(x.shape[1:])


def _leaf_mean_std(x: jax.Array, ddof: int):
    """Coordinate-wise mean and standard deviation (``ddof``) of one leaf, in the accumulation
    dtype (direct differences from the mean: ``E[x^2] - E[x]^2`` cancels badly when the honest
    gradients are close to each other)."""
    x = x.astype(tree_util.accumulation_dtype(x.dtype))
    h = x.shape[0]
    mu = _column_sums(x) / h
    sigma = jnp.sqrt(_column_sums(jnp.square(x - mu[None])) / (h - ddof))
    return mu, sigma


def _mean(honest):
    """Coordinate-wise mean of the rows, per leaf, in the accumulation dtype (one dot per leaf).

    Example:
      >>> _mean(jnp.array([[1.0, 2.0], [3.0, 6.0]]))
      Array([2., 4.], dtype=float32)
    """
    return jax.tree.map(
        lambda x: _column_sums(x.astype(tree_util.accumulation_dtype(x.dtype))) / x.shape[0],
        honest)


def _mean_std(honest, ddof: int):
    """``(mean, std)`` of the rows, per leaf, in the accumulation dtype; the mean computed once.

    Example:
      >>> _mean_std(jnp.array([[1.0, 2.0], [3.0, 6.0]]), 0)
      (Array([2., 4.], dtype=float32), Array([1., 2.], dtype=float32))
    """
    pairs = jax.tree.map(lambda x: _leaf_mean_std(x, ddof), honest)
    treedef = jax.tree.structure(honest)
    leaves = treedef.flatten_up_to(pairs)
    return (treedef.unflatten([m for m, _ in leaves]), treedef.unflatten([s for _, s in leaves]))


def alie_rows(honest, f: int, z, *, ddof: int, sign: float):
    """``f`` copies of ``mu + sign * z * sigma`` (``z`` a float or a traced scalar)."""
    mu, sigma = _mean_std(honest, ddof)
    shift = jax.tree.map(lambda m, s: m + (sign * jnp.asarray(z, m.dtype)) * s, mu, sigma)
    return _common.repeat(shift, honest, f)


def check_alie(h: int, ddof, sign, rule: str) -> int:
    """Validates ALIE's ``sign`` and ``ddof`` against ``h`` known rows; returns ``ddof``."""
    checks.require(sign in (-1, 1), rule, f"sign must be -1 or +1; got sign={sign!r}.")
    ddof = checks.static_int(ddof, rule, "ddof", minimum=0)
    checks.require(
        h > ddof, rule,
        f"needs more known honest rows than ddof for a standard deviation; got {h} rows, "
        f"ddof={ddof}. Pass more rows or ddof=0.",
    )
    return ddof


@_common.declare_attack(
    takes_n=True, constraint=_spec.MINORITY, reference=(_common.BARUCH,), cost="O(n d)",
    note="variant='v1' (z from Algorithm 1 of the paper); the epfml, Blades and NDSS'21 code use "
         "'v2'. sign=-1 and ddof=0 follow the authors' code (moranant/attacking_distributed_"
         "learning); ByzFL uses z=1.5, sign=+1, ddof=1. The paper's attacker knows only its own "
         "gradients (inject(..., omniscient=False)); inject's default, omniscient, follows epfml "
         "and Blades.")
def alie(honest, *, f: int, n: int | None = None, z: float | None = None,
         variant: str = "v1", ddof: int = 0, sign: float = -1):
    """A Little Is Enough: every Byzantine worker sends ``mu + sign * z * sigma``.

    ``mu`` and ``sigma`` are the coordinate-wise mean and standard deviation (``ddof``) of the
    known honest gradients; ``z`` is fixed or :func:`alie_z` ``(n, f, variant)``, the paper's
    largest z that a majority still accepts. Knowledge: *own* gradients (the paper's setting,
    ``ddof=0``) or all *honest* ones (epfml and Blades, ``ddof=1``). Defaults: ``variant="v1"``
    as the paper's Algorithm 1; minus sign and population std as the authors' code (the ALIE CLI
    uses ``z=1.5``, DETOX ``z=1.0``, ByzFL ``z=1.5, sign=+1, ddof=1``).

    A ``z <= 0`` (given, or from the formula, e.g. ``v2`` at ``n = 10, f = 2``) would send the
    honest mean or worse for the attacker, so it raises ``ValueError`` with ``n``, ``f``, the
    formula, and how to get a real attack. Needs ``f < n``; ``n`` is required when ``z`` is not
    given (the injection path passes it).

    Args:
      honest: stacked pytree ``[h, ...]`` of the gradients the attacker knows.
      f: number of Byzantine workers (static).
      n: total number of workers, used to compute z.
      z: a fixed number of standard deviations (> 0), overriding ``n`` and ``variant``.
      variant: ``"v1"`` (default) or ``"v2"``, the quantile of :func:`alie_z`.
      ddof: delta degrees of freedom of the standard deviation.
      sign: ``-1`` or ``+1``, the direction of the shift.

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows, in the dtypes of ``honest``.

    Example:
      >>> g = jnp.array([[0.0, 1.0], [2.0, 3.0]])
      >>> alie(g, f=1, z=1.0)
      Array([[0., 1.]], dtype=float32)
      >>> alie(g, f=2, n=10, variant="v2")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: alie: z = Phi^-1(q_v2 = ... = 4/8) = 0.000 <= 0 for n=10, f=2 ...z=0.253 here.

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
      Learning`, NeurIPS 2019.
    """
    h, f = _common.prepare(honest, f, "alie")
    ddof = check_alie(h, ddof, sign, "alie")
    checks.require(variant in _VARIANTS, "alie",
                   f"variant must be 'v1' or 'v2'; got {variant!r}.")
    if n is not None:
        n = checks.static_int(n, "alie", "n", minimum=1)
        checks.byzantine_count(f, n, "alie", "f < n", lambda n, f: f < n)
    if z is not None and not isinstance(z, jax.core.Tracer):
        checks.require(
            float(z) > 0, "alie",
            f"needs z > 0 (a number of standard deviations; the direction is sign=-1 or +1); "
            f"got z={z!r}. z = 0 sends the honest mean, which is no attack.")
    if f == 0:
        return _common.empty(honest)
    if z is None:
        checks.require(n is not None, "alie", "needs n (the number of workers) to compute z; "
                       "got n=None and z=None. Pass n=... or a fixed z=....")
        z = _positive_z(n, f, variant)
    return alie_rows(honest, f, z, ddof=ddof, sign=sign)


@_common.declare_attack(
    constraint=_spec.MINORITY, reference=(_common.XIE,), cost="O(n d)",
    note="epsilon=0.1 follows the epfml code (the paper studies small epsilon against median- "
         "and Krum-type rules, large ones against the mean); Blades uses 1.0, ByzFL 2.0.")
def ipm(honest, *, f: int, epsilon: float = 0.1):
    """Inner-product manipulation: every Byzantine worker sends ``-epsilon * mean(honest)``.

    Small ``epsilon`` (0.1, epfml's default) turns the output of median- and Krum-type rules
    against the true gradient; large ``epsilon`` (e.g. 100) does the same to the mean.
    Knowledge: all *honest* gradients. Any ``f >= 0``.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      epsilon: the scale of the reversed mean (a float or a traced scalar).

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
    _, f = _common.prepare(honest, f, "ipm")
    if f == 0:
        return _common.empty(honest)
    reversed_mean = jax.tree.map(lambda m: -jnp.asarray(epsilon, m.dtype) * m, _mean(honest))
    return _common.repeat(reversed_mean, honest, f)
