"""Attacks tailored to a defence: Fang et al.'s (trimmed mean / median, Krum), ByzMean (the mean),
relocated orthogonal perturbation (centered clipping).

All work in the gradient domain: the server steps against the aggregate, so "the direction the
honest update moves a parameter" of Fang et al. (model domain) is ``-sign(mean gradient)``, and
pushing the model against it means pushing the aggregated *gradient* against
``s = sign(mean(honest))``. The before-attack global model ``w_Re`` of the paper is the zero
update here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz.aggregators.krum import _hide as _krum_hide
from rbyz.aggregators.krum import _krum_order
from rbyz.attacks import _common

FANG, XU, OZFATURA = (
    _spec.Reference(*entry) for entry in (
        ("Fang, Cao, Jia, Gong", "Local Model Poisoning Attacks to Byzantine-Robust Federated "
         "Learning", "USENIX Security", 2020),
        ("Xu, Huang, Song, Lan", "SignGuard: Byzantine-robust Federated Learning through "
         "Collaborative Malicious Gradient Filtering", "ICDCS", 2022),
        ("Özfatura, Özfatura, Küpçü, Gündüz", "Byzantines Can Also Learn From History: Fall of "
         "Centered Clipping in Federated Learning", "IEEE TIFS", 2024),
    )
)


def _uniform_between(honest, f: int, key, low, high, rule: str):
    """``f`` rows, each value uniform in ``[low, high]`` (pytrees of per-coordinate bounds in
    the accumulation dtype), one independent key per leaf, cast to the dtypes of ``honest``."""
    key = checks.as_key(key, rule)
    flat, treedef = jax.tree.flatten(honest)
    keys = jax.random.split(key, len(flat))
    lows, highs = treedef.flatten_up_to(low), treedef.flatten_up_to(high)
    rows = []
    for k, x, lo, hi in zip(keys, flat, lows, highs):
        u = jax.random.uniform(k, (f,) + x.shape[1:], lo.dtype)
        rows.append((lo[None] + u * (hi - lo)[None]).astype(x.dtype))
    return jax.tree.unflatten(treedef, rows)


def _leaf_extremes(x):
    acc = x.astype(_common.acc_dtype(x))
    return jnp.max(acc, axis=0), jnp.min(acc, axis=0)


# ------------------------------------------------------------------------------------------------
# Fang et al., trimmed mean and median.


@_common.declare_attack(
    key=True, constraint=_spec.MINORITY, reference=(FANG,), cost="O(n d)",
    note="b=2 as in the paper (Section 4.2) and the NDSS'21 code. Coordinates with mean gradient "
         "> 0 go below the honest minimum, the others (sign 0 included) above the maximum, as "
         "the NDSS'21 comparisons do; that code multiplies both ranges by (deviation > 0), a "
         "typo that rbyz does not copy.")
def fang_trimmed_mean(honest, *, f: int, key=None, b: float = 2.0):
    """Fang et al.'s full-knowledge attack on trimmed mean and median.

    Per coordinate ``j``, with ``s_j = sign(mean_i g_ij)``, ``max_j`` and ``min_j`` over the
    honest gradients, every Byzantine value is drawn uniformly in

    - ``[b min_j, min_j]`` if ``min_j < 0``, else ``[min_j / b, min_j]``, when ``s_j > 0``;
    - ``[max_j, b max_j]`` if ``max_j > 0``, else ``[max_j, max_j / b]``, otherwise,

    i.e. beyond the honest extreme on the side opposite to the honest direction (Section 4.2 of
    the paper, "Attacking Trimmed mean", full knowledge; the same attack serves the median).
    Each Byzantine row and coordinate draws its own value. Knowledge: all *honest* gradients
    (``h = n - f``); :func:`fang_trimmed_mean_partial` uses the attackers' own. Any ``f``.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      key: int seed or JAX key for the uniform draws.
      b: how far beyond the extreme the interval reaches (``b > 1``; 2 in the paper).

    Returns:
      Stacked pytree ``[f, ...]`` in the dtypes of ``honest``.

    Example:
      >>> g = jnp.array([[1.0, -1.0], [2.0, -3.0]])
      >>> rows = fang_trimmed_mean(g, f=2, key=0)
      >>> bool(jnp.all((rows[:, 0] >= 0.5) & (rows[:, 0] <= 1.0)))  # [min/b, min]
      True
      >>> bool(jnp.all((rows[:, 1] >= -1.0) & (rows[:, 1] <= -0.5)))  # [max, max/b]
      True

    References:
      Fang, Cao, Jia, Gong, `Local Model Poisoning Attacks to Byzantine-Robust Federated
      Learning`, USENIX Security 2020.
    """
    _, f = _common.prepare(honest, f, "fang_trimmed_mean")
    if not isinstance(b, jax.core.Tracer):
        checks.require(float(b) > 1, "fang_trimmed_mean",
                       f"needs b > 1 (the interval reaches b times beyond the honest extreme); "
                       f"got b={b!r}. The paper uses b=2.")
    if f == 0:
        return _common.empty(honest)
    mean = _common.mean(honest)

    def bounds(x, m):
        hi, lo = _leaf_extremes(x)
        bb = jnp.asarray(b, m.dtype)
        below = (jnp.where(lo < 0, lo * bb, lo / bb), lo)   # [low, high] under the minimum
        above = (hi, jnp.where(hi > 0, hi * bb, hi / bb))   # [low, high] over the maximum
        down = m > 0
        return (jnp.where(down, below[0], above[0]), jnp.where(down, below[1], above[1]))

    pairs = jax.tree.map(bounds, honest, mean)
    treedef = jax.tree.structure(honest)
    leaves = treedef.flatten_up_to(pairs)
    low = treedef.unflatten([p[0] for p in leaves])
    high = treedef.unflatten([p[1] for p in leaves])
    return _uniform_between(honest, f, key, low, high, "fang_trimmed_mean")


@_common.declare_attack(
    key=True, knowledge="own", constraint=_spec.MINORITY, reference=(FANG,), cost="O(n d)",
    note="[mu + 3 sigma, mu + 4 sigma] / [mu - 4 sigma, mu - 3 sigma] as in the paper (Section "
         "4.2, partial knowledge); ddof=1 as torch.std in the NDSS'21 code.")
def fang_trimmed_mean_partial(honest, *, f: int, key=None, low: float = 3.0, high: float = 4.0,
                              ddof: int = 1):
    """Fang et al.'s partial-knowledge attack on trimmed mean and median.

    With ``mu_j`` and ``sigma_j`` the mean and standard deviation (``ddof``) of coordinate ``j``
    over the known gradients (the Byzantine workers' own, before the attack), every Byzantine
    value is drawn uniformly in ``[mu_j - high sigma_j, mu_j - low sigma_j]`` when
    ``mu_j > 0`` and in ``[mu_j + low sigma_j, mu_j + high sigma_j]`` otherwise: against the
    estimated honest direction, as far as a few standard deviations (Section 4.2, partial
    knowledge, ``low=3, high=4``). Knowledge: the attackers' *own* gradients; ``h > ddof``.

    Args:
      honest: stacked pytree ``[h, ...]`` of the gradients the attacker knows.
      f: number of Byzantine workers (static).
      key: int seed or JAX key for the uniform draws.
      low: near end of the interval, in standard deviations (``0 <= low <= high``).
      high: far end of the interval, in standard deviations.
      ddof: delta degrees of freedom of the standard deviation.

    Returns:
      Stacked pytree ``[f, ...]`` in the dtypes of ``honest``.

    Example:
      >>> g = jnp.array([[1.0], [3.0]])  # mu = 2, sigma = 1.414 (ddof=1)
      >>> rows = fang_trimmed_mean_partial(g, f=3, key=0)
      >>> bool(jnp.all((rows >= 2 - 4 * 2 ** 0.5) & (rows <= 2 - 3 * 2 ** 0.5)))
      True

    References:
      Fang, Cao, Jia, Gong, `Local Model Poisoning Attacks to Byzantine-Robust Federated
      Learning`, USENIX Security 2020.
    """
    rule = "fang_trimmed_mean_partial"
    h, f = _common.prepare(honest, f, rule)
    ddof = checks.static_int(ddof, rule, "ddof", minimum=0)
    checks.require(h > ddof, rule,
                   f"needs more known rows than ddof for a standard deviation; got {h} rows, "
                   f"ddof={ddof}. Pass more rows or ddof=0.")
    checks.require(0 <= float(low) <= float(high), rule,
                   f"needs 0 <= low <= high (standard deviations); got low={low!r}, "
                   f"high={high!r}. The paper uses low=3, high=4.")
    if f == 0:
        return _common.empty(honest)
    mean, sigma = _common.mean(honest), _common.std(honest, ddof)
    down = jax.tree.map(lambda m: m > 0, mean)
    lo = jax.tree.map(lambda m, s, d: jnp.where(d, m - high * s, m + low * s), mean, sigma, down)
    hi = jax.tree.map(lambda m, s, d: jnp.where(d, m - low * s, m + high * s), mean, sigma, down)
    return _uniform_between(honest, f, key, lo, hi, rule)


# ------------------------------------------------------------------------------------------------
# Fang et al., Krum.


# One compiled search per shape and (n, f, halvings), also when called eagerly.
@functools.partial(jax.jit, static_argnames=("n", "f", "halvings"))
def _fang_krum_search(honest, *, n: int, f: int, threshold, halvings: int):
    """``(lambda, selected, s)``: the paper's search, in the accumulation dtype."""
    dtype = _common.acc_dtype(honest)
    h = jax.tree.leaves(honest)[0].shape[0]
    d = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(honest))
    s = jax.tree.map(jnp.sign, _common.mean(honest))
    # Honest-honest squared distances (+inf for non-finite rows) and norms (the distance to
    # w_Re, the zero update).
    dist_hh = reductions.pairwise_sq_distances(honest).astype(dtype)
    sq_norms = reductions.row_sq_norms(honest).astype(dtype)
    sq_norms = jnp.where(jnp.isfinite(sq_norms), sq_norms, jnp.inf)
    s_dot_g = _common.row_dots(honest, s, dtype)
    s_sq = _common.tree_vdot(s, s, dtype)

    # The upper bound of Section 4.1 (Krum, full knowledge), with m = n, c = f:
    # 1/((m - 2c - 1) sqrt(d)) min_i sum_{l in the m - c - 2 nearest benign} D(w_l, w_i)
    # + 1/sqrt(d) max_i D(w_i, w_Re), D the Euclidean distance.
    near = min(n - f - 2, h - 1)
    nearest = jnp.sort(jnp.where(jnp.eye(h, dtype=bool), jnp.inf, jnp.sqrt(dist_hh)), axis=1)
    finite_min = lambda v: jnp.min(jnp.where(jnp.isfinite(v), v, jnp.inf))  # noqa: E731
    finite_max = lambda v: jnp.max(jnp.where(jnp.isfinite(v), v, -jnp.inf))  # noqa: E731
    term_1 = finite_min(jnp.sum(nearest[:, :near], axis=1)) / ((n - 2 * f - 1) * math.sqrt(d))
    term_2 = finite_max(jnp.sqrt(sq_norms)) / math.sqrt(d)
    lam0 = term_1 + term_2
    lam0 = jnp.where(jnp.isfinite(lam0), lam0, 0.0)  # every honest row hostile: no search

    # The simulated server stack: f copies of -lambda s (rows 0..f-1), then the known rows.
    # ||-lambda s - g_i||^2 = lambda^2 |s|^2 + 2 lambda <s, g_i> + |g_i|^2.
    neighbours = min(n - f - 2, f + h - 1)
    nobody = jnp.zeros((f + h,), bool)

    def selected(lam):
        cross = jnp.maximum(lam * lam * s_sq + 2 * lam * s_dot_g + sq_norms, 0.0)
        cross = jnp.where(jnp.isfinite(sq_norms) & jnp.isfinite(s_dot_g), cross, jnp.inf)
        top = jnp.concatenate([jnp.zeros((f, f), dtype), jnp.broadcast_to(cross, (f, h))], 1)
        bottom = jnp.concatenate([jnp.broadcast_to(cross[:, None], (h, f)), dist_hh], 1)
        dist = jnp.concatenate([top, bottom], 0)
        order = _krum_order(_krum_hide(dist, nobody), neighbours, nobody)
        return order[0] < f

    def searching(state):
        lam, done, count = state
        return (lam > threshold) & ~done & (count < halvings)

    def halve(state):
        lam, _, count = state
        ok = selected(lam)
        return jnp.where(ok, lam, lam / 2), ok, count + 1

    lam, done, _ = jax.lax.while_loop(searching, halve, (lam0, jnp.asarray(False), 0))
    return lam, done, s


@_common.declare_attack(
    takes_n=True, constraint=_spec.KRUM, reference=(FANG,), cost="O(n^2 d + n^2 halvings)",
    note="The paper's bound and threshold 1e-5; D(w_i, w_Re) is the norm of g_i (the paper; the "
         "NDSS'21 code uses ||g_i - mean||) and the m - c - 2 nearest benign rows enter the "
         "first term (the NDSS'21 code uses m - 2c - 2). The other Byzantine rows are copies "
         "(the paper's epsilon-ball with epsilon = 0, as in the NDSS'21 code). Krum is simulated "
         "as rbyz.aggregators.krum with its default neighbours = n - f - 2.")
def fang_krum(honest, *, f: int, n: int, threshold: float = 1e-5, halvings: int = 64):
    """Fang et al.'s attack on Krum: the largest ``-lambda s`` that Krum still selects.

    ``s = sign(mean(honest))`` and every Byzantine worker sends ``-lambda s`` (the paper's
    ``w_Re - lambda s`` in the gradient domain, where the before-attack model ``w_Re`` is the
    zero update). ``lambda`` starts at the paper's upper bound (Section 4.1)

    ``lambda_0 = min_i sum_{l in G_i} ||g_l - g_i|| / ((n - 2f - 1) sqrt(d))
    + max_i ||g_i|| / sqrt(d)``

    (``G_i`` the ``n - f - 2`` honest rows nearest to ``g_i``) and is halved while it exceeds
    ``threshold`` and Krum, on the ``f`` crafted rows and the known rows, does not select a
    crafted row (a ``lax.while_loop`` of at most ``halvings`` steps). If no ``lambda`` above
    ``threshold`` is selected, the last (smallest) one is sent. Knowledge: all *honest* rows;
    with the attackers' *own* rows (``inject(..., omniscient=False)``) it is the paper's
    partial-knowledge attack. Needs ``n >= 2f + 3`` (Krum's requirement).

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      n: total number of workers (static).
      threshold: smallest ``lambda`` tried (1e-5 in the paper).
      halvings: static cap on the number of halvings.

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows in the dtypes of ``honest``.

    Example:
      >>> import jax, rbyz
      >>> g = 0.5 + jax.random.normal(jax.random.key(0), (7, 50))  # n = 10, f = 3
      >>> rows = fang_krum(g, f=3, n=10)
      >>> chosen = rbyz.aggregators.krum(jnp.concatenate([g, rows]), f=3)
      >>> bool(jnp.all(chosen == rows[0])), bool(jnp.dot(chosen, g.mean(0)) < 0)
      (True, True)

    References:
      Fang, Cao, Jia, Gong, `Local Model Poisoning Attacks to Byzantine-Robust Federated
      Learning`, USENIX Security 2020.
    """
    rule = "fang_krum"
    _, f = _common.prepare(honest, f, rule)
    n = checks.static_int(n, rule, "n", minimum=1)
    checks.byzantine_count(f, n, rule, "n >= 2f + 3", _spec.KRUM.holds)
    halvings = checks.static_int(halvings, rule, "halvings", minimum=0)
    if not isinstance(threshold, jax.core.Tracer):
        checks.require(float(threshold) > 0, rule,
                       f"needs threshold > 0; got threshold={threshold!r}. The paper uses 1e-5.")
    if f == 0:
        return _common.empty(honest)
    lam, _, s = _fang_krum_search(honest, n=n, f=f, threshold=jnp.asarray(threshold),
                                  halvings=halvings)
    crafted = jax.tree.map(lambda v: -lam.astype(v.dtype) * v, s)
    return _common.repeat(crafted, honest, f)


# ------------------------------------------------------------------------------------------------
# ByzMean (SignGuard).


@_common.declare_attack(
    takes_n=True, constraint=_spec.MINORITY, reference=(XU,), cost="O(n d)",
    note="z=0.5 and ddof=1 as JianXu95/SignGuard attacks/byzMean.py. The dragging rows follow "
         "the paper (the mean of all n rows equals the target); that code computes "
         "((n - f - m1) t - sum of all n rows)/m2, which does not: variant='signguard_code' "
         "reproduces it (with the f Byzantine rows' own gradients estimated by the known mean).")
def byzmean(honest, *, f: int, n: int, z: float = 0.5, ddof: int = 1, variant: str = "paper"):
    """ByzMean: half the Byzantine rows send a target, the others drag the mean of all n there.

    ``t = mu - z sigma`` (coordinate-wise mean and standard deviation of the known rows); the
    first ``m1 = floor(f/2)`` Byzantine workers send ``t`` and the other ``m2 = f - m1`` send

    ``v = ((n - m1) t - (n - f) mu) / m2``,

    so that ``(sum_honest + m1 t + m2 v) / n = t`` when the known rows are the ``n - f`` honest
    ones (``(n - f) mu`` is their sum). ``variant="signguard_code"`` gives the authors' code,
    ``v = ((n - f - m1) t - (n - f) mu - f mu) / m2``. Knowledge: all *honest* rows; needs
    ``f < n`` and more known rows than ``ddof``.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      n: total number of workers (static).
      z: standard deviations of the target below the mean (0.5 as the authors' code).
      ddof: delta degrees of freedom of the standard deviation.
      variant: ``"paper"`` (default) or ``"signguard_code"``.

    Returns:
      Stacked pytree ``[f, ...]``: ``m1`` rows ``t`` then ``m2`` rows ``v``.

    Example:
      >>> g = jnp.array([[0.0], [2.0], [4.0]])
      >>> rows = byzmean(g, f=2, n=5, z=1.0)  # t = 0, v = (4 * 0 - 3 * 2) / 1
      >>> rows[:, 0].tolist(), float((g.sum() + rows.sum()) / 5)
      ([0.0, -6.0], 0.0)

    References:
      Xu, Huang, Song, Lan, `SignGuard: Byzantine-robust Federated Learning through
      Collaborative Malicious Gradient Filtering`, ICDCS 2022.
    """
    rule = "byzmean"
    h, f = _common.prepare(honest, f, rule)
    n = checks.static_int(n, rule, "n", minimum=1)
    checks.byzantine_count(f, n, rule, "f < n", lambda n, f: f < n)
    ddof = checks.static_int(ddof, rule, "ddof", minimum=0)
    checks.require(h > ddof, rule,
                   f"needs more known rows than ddof for a standard deviation; got {h} rows, "
                   f"ddof={ddof}. Pass more rows or ddof=0.")
    checks.require(variant in ("paper", "signguard_code"), rule,
                   f"variant must be 'paper' or 'signguard_code'; got {variant!r}.")
    if f == 0:
        return _common.empty(honest)
    m1 = f // 2
    m2 = f - m1
    honest_count = n - f
    mean, sigma = _common.mean(honest), _common.std(honest, ddof)
    target = jax.tree.map(lambda m, s: m - jnp.asarray(z, m.dtype) * s, mean, sigma)
    if variant == "paper":
        drag = jax.tree.map(lambda t, m: ((n - m1) * t - honest_count * m) / m2, target, mean)
    else:
        drag = jax.tree.map(lambda t, m: ((honest_count - m1) * t - n * m) / m2, target, mean)
    return jax.tree.map(
        lambda t, v, x: jnp.concatenate([
            jnp.broadcast_to(t.astype(x.dtype)[None], (m1,) + x.shape[1:]),
            jnp.broadcast_to(v.astype(x.dtype)[None], (m2,) + x.shape[1:])]),
        target, drag, honest)


# ------------------------------------------------------------------------------------------------
# Relocated orthogonal perturbation (centered clipping).


@_common.declare_attack(
    constraint=_spec.MINORITY, reference=(OZFATURA,), cost="O(n d)",
    note="angle=90 (orthogonal) and the all-ones direction projected out of the reference, as the "
         "authors' code (reloc.omniscient_callback); radius=99 stays just inside the clipping "
         "radius tau=100 of rbyz.aggregators.centered_clipping (the authors use z_max of ALIE). "
         "Without center the honest mean stands in for the previous aggregate (pi and lamb "
         "then do nothing).")
def rop(honest, *, f: int, center=None, radius: float = 99.0, angle: float = 90.0,
        pi: float = 0.0, lamb: float = 0.0):
    """Relocated orthogonal perturbation against centered clipping's centre.

    With ``mu`` the honest mean and ``c`` the centre of the clipping (the previous aggregate;
    ``mu`` when not given): reference ``r = lamb c + (1 - lamb) mu``, location
    ``a = pi c + (1 - pi) mu``, ``p`` the unit vector of the all-ones vector with its component
    along ``r`` removed, rotated towards ``r``: ``q = sin(angle) p + cos(angle) r / |r|``; every
    Byzantine worker sends ``a + radius q``. With ``angle = 90`` the row is orthogonal to the
    reference at distance ``radius`` from it: it survives clipping at ``tau > radius`` whole,
    and the orthogonal drift accumulates in the server's momentum step after step. Knowledge:
    all *honest* rows (and the centre); any ``f``.

    Args:
      honest: stacked pytree ``[h, ...]`` of the honest gradients.
      f: number of Byzantine workers (static).
      center: the clipping centre (a pytree like one row), or ``None`` for the honest mean.
      radius: norm of the perturbation (just under the clipping radius ``tau``).
      angle: degrees between the perturbation and the reference (90: orthogonal).
      pi: weight of ``center`` in the location.
      lamb: weight of ``center`` in the reference.

    Returns:
      Stacked pytree ``[f, ...]`` of identical rows.

    Example:
      >>> g = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
      >>> rows = rop(g, f=1, radius=2.0)
      >>> round(float(jnp.dot(rows[0] - g[0], g[0])), 6), round(float(jnp.linalg.norm(rows[0] - g[0])), 6)
      (0.0, 2.0)

    References:
      Özfatura, Özfatura, Küpçü, Gündüz, `Byzantines Can Also Learn From History: Fall of
      Centered Clipping in Federated Learning`, IEEE TIFS 2024 (arXiv:2208.09894).
    """
    rule = "rop"
    _, f = _common.prepare(honest, f, rule)
    if not isinstance(radius, jax.core.Tracer):
        checks.require(float(radius) >= 0, rule,
                       f"needs radius >= 0 (the norm of the perturbation); got radius={radius!r}.")
    if center is not None:
        checks.require(jax.tree.structure(center) == jax.tree.structure(honest), rule,
                       "center must be a pytree like one row of the updates; got structure "
                       f"{jax.tree.structure(center)}, expected {jax.tree.structure(honest)}.")
    if f == 0:
        return _common.empty(honest)
    dtype = _common.acc_dtype(honest)
    mean = _common.mean(honest)
    c = mean if center is None else jax.tree.map(lambda v, m: jnp.asarray(v).astype(m.dtype),
                                                 center, mean)
    ref = jax.tree.map(lambda cc, m: lamb * cc + (1 - lamb) * m, c, mean)
    loc = jax.tree.map(lambda cc, m: pi * cc + (1 - pi) * m, c, mean)
    ref_sq = _common.tree_vdot(ref, ref, dtype)
    ones = jax.tree.map(jnp.ones_like, ref)
    tiny = jnp.finfo(dtype).tiny
    coef = jnp.where(ref_sq > tiny, _common.tree_vdot(ones, ref, dtype) / jnp.maximum(ref_sq, tiny),
                     0.0)
    perp = jax.tree.map(lambda o, r: o - coef.astype(r.dtype) * r, ones, ref)
    perp_norm = jnp.sqrt(_common.tree_vdot(perp, perp, dtype))
    ref_norm = jnp.sqrt(ref_sq)
    theta = math.radians(angle)
    # Exact zeros at 0 and 90 degrees: math.cos(pi / 2) is 6e-17, not 0.
    sin, cos = (0.0 if abs(v) < 1e-12 else v for v in (math.sin(theta), math.cos(theta)))
    direction = jax.tree.map(
        lambda p, r: sin * p / jnp.maximum(perp_norm, tiny).astype(p.dtype)
        + cos * r / jnp.maximum(ref_norm, tiny).astype(r.dtype), perp, ref)
    dir_norm = jnp.sqrt(_common.tree_vdot(direction, direction, dtype))
    row = jax.tree.map(
        lambda a, q: a + (radius / jnp.maximum(dir_norm, tiny)).astype(a.dtype) * q, loc, direction)
    return _common.repeat(row, honest, f)
