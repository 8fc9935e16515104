"""Clustering rules: keep the majority group of the workers' updates, average it clipped.

:func:`clipped_clustering` clips every row to the median norm and keeps the larger of two
agglomerative clusters of cosine distances; :func:`signguard` keeps the rows that pass a norm
filter and fall in the larger cluster of their sign statistics; :func:`flame` keeps the HDBSCAN
cluster of cosine distances (which, at FLAME's settings, is the smallest single-linkage cluster
holding a strict majority), clips it to the median norm and may add Gaussian noise.

All three average clipped rows, so that the output norm is at most the median norm of the rows
(at most the largest honest norm when ``n > 2f``). A row holding NaN or Inf, or whose norm
overflows the accumulation dtype, is at the largest distance from every other row and has weight
0 in the average, so it never reaches the output. Norms and distances are whole-update
quantities summed over the leaves (``rbyz._src.reductions``); the clustering itself runs on the
``[n, n]`` distance matrix with static loops over the merges (``O(n^3)``, for ``n`` up to about
a hundred).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection
from rbyz.aggregators import subsets as _subsets

LINKAGES = ("average", "single", "complete")
FLAME_DISTANCES = ("cosine", "cosine_rows")
# SignGuard's 2-means: relative differences of squared distances below this are ties.
TIE = 1e-5


# ------------------------------------------------------------------------------------------------
# Shared pieces: norms, clipping, cosine distances, the clipped mean of a subset.


def _norms(updates) -> tuple[jax.Array, jax.Array]:
    """``([n], [n] bool)``: each row's whole-update norm, and whether it is finite (a row with
    NaN/Inf values or whose norm overflows the accumulation dtype is not)."""
    norms = jnp.sqrt(reductions.row_sq_norms(updates))
    return norms, jnp.isfinite(norms)


def _median(values: jax.Array, even: str) -> jax.Array:
    """Median of ``[n]`` values, NaN as ``+inf``; ``even``: ``"midpoint"`` or ``"lower"``."""
    s = jnp.sort(jnp.where(jnp.isnan(values), jnp.inf, values))
    n = s.shape[0]
    if even == "lower":
        return s[(n - 1) // 2]
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def _clip_scales(norms, finite, threshold) -> jax.Array:
    """``min(1, threshold / ||g_i||)`` per row (1 for a zero row), 0 for a non-finite row."""
    safe = jnp.where(norms > 0, norms, 1.0)
    scale = jnp.where(norms > threshold, threshold / safe, 1.0)
    return jnp.where(finite, scale, 0.0)


def _cosine_distances(updates, norms, finite, hostile) -> jax.Array:
    """``[n, n]`` cosine distances ``1 - <g_i, g_j> / (||g_i|| ||g_j||)`` in ``[0, 2]``.

    Computed as ``||u_i - u_j||^2 / 2`` on the unit rows ``u_i = g_i / ||g_i||`` with the
    accurate (centred) pairwise distances, so that nearly parallel rows keep their digits. A zero
    row has similarity 0 with every other row (distance 1, as scikit-learn's
    ``cosine_distances``); a non-finite row is at distance ``hostile`` from every other row.
    """
    dtype = norms.dtype
    inverse = jnp.where(finite & (norms > 0), 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)

    def unit(leaf):
        shape = (leaf.shape[0],) + (1,) * (leaf.ndim - 1)
        rows = jnp.where(finite.reshape(shape), leaf.astype(dtype), 0.0)
        return rows * inverse.reshape(shape)

    sq = reductions.pairwise_sq_distances(jax.tree.map(unit, updates))
    nonzero = (inverse > 0).astype(dtype)
    # ||u_i - u_j||^2 = |u_i|^2 + |u_j|^2 - 2 <u_i, u_j>, with |u_i|^2 = 1 (or 0 for a zero row).
    dist = jnp.clip(1.0 + (sq - nonzero[:, None] - nonzero[None, :]) / 2, 0.0, 2.0)
    dist = jnp.where(finite[:, None] & finite[None, :], dist, jnp.asarray(hostile, dtype))
    return jnp.where(jnp.eye(dist.shape[0], dtype=bool), 0.0, dist)


def _clipped_mean(updates, kept, scales):
    """Mean of the kept rows, each scaled by ``scales``; 0 when no row is kept."""
    weights = jnp.where(kept, scales, 0.0)
    count = jnp.maximum(jnp.sum(kept.astype(scales.dtype)), 1.0)
    return _common.cast_like(_common.weighted_mean(updates, weights, count), updates)


# ------------------------------------------------------------------------------------------------
# Clipped clustering.


def _agglomerate(dist: jax.Array, linkage: str, clusters: int) -> jax.Array:
    """``[n]`` int labels after agglomerative merging down to ``clusters`` clusters.

    Each of the ``n - clusters`` steps merges the two closest clusters (the first pair in
    row-major order among equal distances) and updates the cluster distances by the
    Lance-Williams formula of ``linkage``. A cluster's label is its smallest member index.
    """
    n = dist.shape[0]
    off_diagonal = ~jnp.eye(n, dtype=bool)

    def merge(_, carry):
        d, size, active, label = carry
        candidates = jnp.where(active[:, None] & active[None, :] & off_diagonal, d, jnp.inf)
        flat = jnp.argmin(candidates)
        a, b = jnp.minimum(flat // n, flat % n), jnp.maximum(flat // n, flat % n)
        if linkage == "single":
            row = jnp.minimum(d[a], d[b])
        elif linkage == "complete":
            row = jnp.maximum(d[a], d[b])
        else:  # average (UPGMA): the mean of the member-to-member distances
            row = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])
        d = d.at[a, :].set(row).at[:, a].set(row)
        return (d, size.at[a].add(size[b]), active.at[b].set(False),
                jnp.where(label == b, a, label))

    carry = (dist, jnp.ones((n,), dist.dtype), jnp.ones((n,), bool), jnp.arange(n))
    return jax.lax.fori_loop(0, max(n - clusters, 0), merge, carry)[3]


def _larger_cluster(dist: jax.Array, labels: jax.Array) -> jax.Array:
    """``[n]`` bool: the larger of the two clusters; of two equal ones the one of smaller mean
    within-cluster distance; both when that ties too (so that the workers' order never
    decides)."""
    first = labels == labels[0]
    dtype = dist.dtype

    def spread(mask):
        size = jnp.sum(mask.astype(dtype))
        total = jnp.sum(jnp.where(mask[:, None] & mask[None, :], dist, 0.0))
        return size, total / jnp.maximum(size * (size - 1), 1.0)

    (size_a, spread_a), (size_b, spread_b) = spread(first), spread(~first)
    keep_a = (size_a > size_b) | ((size_a == size_b) & (spread_a <= spread_b))
    keep_b = (size_b > size_a) | ((size_a == size_b) & (spread_b <= spread_a))
    return (first & keep_a) | (~first & keep_b)


@_spec.declare(
    "aggregator", reports=True, coordinate_slices=True, constraint=_spec.MAJORITY,
    cost="O(n^2 d + n^3)",
    reference=_spec.Reference(
        "Li, Ngai, Voigt",
        "An Experimental Study of Byzantine-Robust Aggregation Schemes in Federated Learning",
        "IEEE Transactions on Big Data", 2023),
    note="Blades (lishenghui/blades, Clippedclustering) clips to the median of every norm seen "
         "since the first step; this rule is stateless and clips to the median of the current "
         "step's norms. linkage='average' and max_tau=1e5 follow Blades. Two clusters of equal "
         "size (n even) go to the one of smaller mean within-cluster distance, and both are "
         "kept when that ties too: Blades' choice depends on scikit-learn's label order.",
)
def clipped_clustering(updates, *, f: int, linkage: str = "average", max_tau: float = 1e5,
                       report: bool = False):
    """Clipped clustering: the mean of the larger of two cosine clusters of median-clipped rows.

    ``tau = min(median_i ||g_i||, max_tau)``, ``c_i = g_i min(1, tau / ||g_i||)``; the ``n``
    rows are merged agglomeratively (``linkage`` of the cosine distances
    ``1 - cos(g_i, g_j)``, which clipping does not change) until two clusters are left, and
    ``agg = mean_{i in S} c_i`` over the larger one ``S``. Of two equal clusters (``n`` even)
    the one of smaller mean within-cluster distance is taken (both when that ties too). Needs
    ``n > 2f``; the output norm is at most ``tau``. A row holding NaN/Inf (or whose norm
    overflows) is at cosine distance 2 from every row, as in Blades, and has weight 0 in the
    mean (which divides by the finite rows of ``S``).

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f`` (used for the check only).
      linkage: ``"average"`` (Blades' default), ``"single"`` or ``"complete"``.
      max_tau: upper bound on the clipping threshold (Blades: ``1e5``), ``> 0``.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [2.0, 0.2], [1.0, -0.1], [-5.0, 0.0], [-4.0, 1.0]])
      >>> clipped_clustering(g, f=2)
      Array([1.3333334 , 0.03333334], dtype=float32)

    References:
      Li, Ngai, Voigt, `An Experimental Study of Byzantine-Robust Aggregation Schemes in
      Federated Learning`, IEEE Transactions on Big Data 2023 (Blades).
    """
    n, f = _common.workers_and_f(updates, f, clipped_clustering.spec)
    _common.check_choice(linkage, "clipped_clustering", "linkage", LINKAGES)
    _common.check_positive(max_tau, "clipped_clustering", "max_tau")
    norms, finite = _norms(updates)
    tau = jnp.minimum(_median(norms, "midpoint"), max_tau)
    dist = _cosine_distances(updates, norms, finite, hostile=2.0)
    kept = _larger_cluster(dist, _agglomerate(dist, linkage, 2)) & finite
    scales = _clip_scales(norms, finite, tau)
    return _selection.returning(_clipped_mean(updates, kept, scales), report,
                                jnp.where(kept, scales, 0.0))


# ------------------------------------------------------------------------------------------------
# SignGuard.


def _sign_features(updates, finite, key, coordinates: float) -> jax.Array:
    """``[n, 3]``: fractions of positive, zero and negative coordinates of each row, each
    divided by its largest value over the finite rows (plus ``1e-8``), as SignGuard's code."""
    dtype = reductions.accumulation_dtype(updates)
    total = sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(updates))
    if coordinates >= 1.0 or total == 0:
        def count(leaf, test):
            return jnp.sum(test(leaf.reshape(leaf.shape[0], -1) if leaf.shape[1:] else
                                leaf[:, None]).astype(dtype), axis=1)

        leaves = [leaf for leaf in jax.tree.leaves(updates) if math.prod(leaf.shape[1:])]
        positive = sum((count(x, lambda v: v > 0) for x in leaves), jnp.zeros(finite.shape, dtype))
        negative = sum((count(x, lambda v: v < 0) for x in leaves), jnp.zeros(finite.shape, dtype))
        size = max(total, 1)
    else:
        size = max(1, int(coordinates * total))
        sample = _subsets._sampled_columns(updates, checks.as_key(key, "signguard"), size)
        positive = jnp.sum((sample > 0).astype(dtype), axis=1)
        negative = jnp.sum((sample < 0).astype(dtype), axis=1)
    fractions = jnp.stack([positive, size - positive - negative, negative], axis=1) / size
    fractions = jnp.where(finite[:, None], fractions, 0.0)
    return fractions / (jnp.max(fractions, axis=0) + 1e-8)[None, :]


def _two_means(points: jax.Array, valid: jax.Array, iterations: int) -> jax.Array:
    """``[n]`` bool: the valid points of the larger cluster of 2-means (the first one on ties).

    Deterministic: the first centre is the coordinate-wise (lower) median of the valid points,
    the second the valid point farthest from it (the lexicographically largest of equally far
    ones, so that it never depends on the workers' order); ``iterations`` Lloyd steps (an
    empty cluster keeps its centre) follow. Sign statistics take few distinct values, so ties are
    common: a point goes to the second centre only if nearer by a relative ``TIE``, and
    distances within a relative ``TIE`` of the farthest count as farthest, so that rounding
    (float32 features, the order of a sum) does not decide.
    """
    count = jnp.sum(valid.astype(jnp.int32))
    ordered = jnp.sort(jnp.where(valid[:, None], points, jnp.inf), axis=0)
    first = ordered[jnp.maximum(count - 1, 0) // 2]
    far = jnp.where(valid, jnp.sum(jnp.square(points - first[None, :]), axis=1), -1.0)
    farthest = valid & (far >= (1.0 - TIE) * jnp.max(far))
    # Distinct points may be equally far (mirror images): take the lexicographically largest.
    for k in range(points.shape[1]):
        top = jnp.max(jnp.where(farthest, points[:, k], -jnp.inf))
        farthest = farthest & (points[:, k] >= top - TIE * jnp.abs(top))
    farthest = farthest.astype(points.dtype)
    second = jnp.sum(farthest[:, None] * points, axis=0) / jnp.maximum(jnp.sum(farthest), 1.0)
    weights = valid.astype(points.dtype)

    def assign(centres):
        c0, c1 = centres
        return (jnp.sum(jnp.square(points - c1[None, :]), axis=1)
                < (1.0 - TIE) * jnp.sum(jnp.square(points - c0[None, :]), axis=1)) & valid

    def lloyd(_, centres):
        to_second = assign(centres)
        new = []
        for centre, members in zip(centres, (~to_second & valid, to_second)):
            w = members.astype(points.dtype)
            mass = jnp.sum(w)
            mean = jnp.sum(w[:, None] * points, axis=0) / jnp.maximum(mass, 1.0)
            new.append(jnp.where(mass > 0, mean, centre))
        return tuple(new)

    to_second = assign(jax.lax.fori_loop(0, iterations, lloyd, (first, second)))
    second_size = jnp.sum(to_second.astype(weights.dtype))
    larger_second = second_size > jnp.sum(weights) - second_size
    return jnp.where(larger_second, to_second, ~to_second & valid)


@_spec.declare(
    "aggregator", reports=True, key=True, coordinate_slices=False, constraint=_spec.MAJORITY,
    cost="O(n d + T n)",
    reference=_spec.Reference(
        "Xu, Huang, Song, Lan",
        "Byzantine-robust Federated Learning through Collaborative Malicious Gradient Filtering",
        "ICDCS", 2022),
    note="The authors' code (JianXu95/SignGuard, signguard_multiclass) clusters the sign "
         "statistics with MeanShift (estimated bandwidth, bin seeding) on a random contiguous "
         "10% block of coordinates; this rule uses 2-means with a deterministic start and a "
         "fixed number of Lloyd steps (iterations=10), and by default the statistics of every "
         "coordinate (coordinates=1.0: exact fractions, no key used); coordinates < 1 draws "
         "that fraction of coordinates uniformly with replacement (key needed). The bounds "
         "0.1 < ||g|| / median < 3.0 (strict, midpoint median) and the clipping to the lower "
         "median norm follow the code. Rows holding NaN/Inf are removed (the code zeroes NaN "
         "values); if the two filters share no row, the norm filter's rows are averaged.",
)
def signguard(updates, *, f: int, key=None, lower: float = 0.1, upper: float = 3.0,
              coordinates: float = 1.0, iterations: int = 10, report: bool = False):
    """SignGuard: norm filter and sign-statistics clustering, then the median-clipped mean.

    With ``M`` the median norm, ``S_1 = {i : lower < ||g_i|| / M < upper}``. Each row's sign
    statistics ``s_i = (#{g_ik > 0}, #{g_ik = 0}, #{g_ik < 0}) / d`` (each column divided by
    its largest value) are split by 2-means; ``S_2`` is the larger cluster. The output is
    ``mean_{i in S_1 ∩ S_2} g_i min(1, M' / ||g_i||)`` with ``M'`` the lower median norm (the
    rows of ``S_1`` if the intersection is empty; 0 if that is empty too, which needs half the
    rows to be zero, when clipping zeroes every row anyway). Needs ``n > 2f``; rows holding
    NaN/Inf (or whose norm overflows) are in neither set. Not available with
    ``layout="coordinates"``: the statistics span every coordinate.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f`` (used for the check only).
      key: int seed or JAX key for the coordinate subsample; used only when
        ``coordinates < 1``.
      lower: lower bound ``L`` of the norm ratio, ``>= 0``.
      upper: upper bound ``R`` of the norm ratio, ``> L``.
      coordinates: fraction of the coordinates the sign statistics are computed on, in
        ``(0, 1]`` (the code uses 0.1).
      iterations: Lloyd steps of the 2-means, ``>= 1``.
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 2.0, -1.0], [1.5, 1.0, -2.0], [2.0, 1.0, -1.0],
      ...                [-9.0, -9.0, 9.0], [-1.0, -2.0, 1.0]])
      >>> signguard(g, f=2)
      Array([ 1.4548588,  1.3032392, -1.2731452], dtype=float32)

    References:
      Xu, Huang, Song, Lan, `Byzantine-robust Federated Learning through Collaborative
      Malicious Gradient Filtering`, ICDCS 2022.
    """
    n, f = _common.workers_and_f(updates, f, signguard.spec)
    iterations = checks.static_int(iterations, "signguard", "iterations", minimum=1)
    checks.require(0 <= lower < upper, "signguard",
                   f"needs 0 <= lower < upper; got lower={lower}, upper={upper}.")
    checks.require(0 < coordinates <= 1, "signguard",
                   f"needs 0 < coordinates <= 1 (a fraction of the coordinates); got "
                   f"coordinates={coordinates}.")
    norms, finite = _norms(updates)
    middle = _median(norms, "midpoint")
    by_norm = finite & (norms > lower * middle) & (norms < upper * middle)
    by_sign = _two_means(_sign_features(updates, finite, key, coordinates), finite, iterations)
    kept = by_norm & by_sign
    kept = jnp.where(jnp.any(kept), kept, by_norm)
    scales = _clip_scales(norms, finite, _median(norms, "lower"))
    return _selection.returning(_clipped_mean(updates, kept, scales), report,
                                jnp.where(kept, scales, 0.0))


# ------------------------------------------------------------------------------------------------
# FLAME.


def _minimax_distances(dist: jax.Array) -> jax.Array:
    """``[n, n]`` single-linkage (cophenetic) distances: over all paths from ``i`` to ``j``,
    the least possible largest step (Floyd-Warshall with ``(min, max)``, ``n`` static steps)."""
    n = dist.shape[0]

    def through(k, u):
        column = jax.lax.dynamic_slice_in_dim(u, k, 1, axis=1)
        row = jax.lax.dynamic_slice_in_dim(u, k, 1, axis=0)
        return jnp.minimum(u, jnp.maximum(column, row))

    return jax.lax.fori_loop(0, n, through, dist)


def _majority_cluster(dist: jax.Array) -> jax.Array:
    """``[n]`` bool: HDBSCAN's cluster at ``min_cluster_size = n // 2 + 1``, ``min_samples = 1``,
    ``allow_single_cluster=True``: the single-linkage cluster of at least ``n // 2 + 1`` rows at
    the lowest merge height ``t*`` where one exists (rows joining at ``t*`` itself included).

    Why: with ``min_samples = 1`` the core distance of a row is at most its distance to any
    other row, so the mutual reachability distance equals ``dist`` and HDBSCAN's tree is the
    single-linkage tree. Clusters smaller than the minimum size are not clusters, and no split
    can have two children of more than ``n / 2`` rows: the condensed tree is the root alone,
    shedding rows as the distance shrinks until its last split, at ``t*``. With
    ``allow_single_cluster`` the root is selected and its members are the rows shed last (at
    the largest ``lambda = 1 / t*``), i.e. the rows of the component of size ``>= n // 2 + 1``
    in the graph of the edges ``dist <= t*``.
    """
    n = dist.shape[0]
    size = n // 2 + 1
    reach = _minimax_distances(dist)
    height = jnp.min(jnp.sort(reach, axis=1)[:, size - 1])
    return jnp.sum((reach <= height).astype(jnp.int32), axis=1) >= size


def _rows_distances(cos: jax.Array, finite: jax.Array) -> jax.Array:
    """``[n, n]`` Euclidean distances between the rows of the cosine-distance matrix (the
    released FLAME code passes that matrix to HDBSCAN as features); non-finite rows at
    ``+inf``."""
    rows = jnp.where(jnp.isfinite(cos), cos, 2.0)
    diff = rows[:, None, :] - rows[None, :, :]
    dist = jnp.sqrt(jnp.sum(jnp.square(diff), axis=2))
    dist = jnp.where(finite[:, None] & finite[None, :], dist, jnp.inf)
    return jnp.where(jnp.eye(cos.shape[0], dtype=bool), 0.0, dist)


@_spec.declare(
    "aggregator", reports=True, key=True, coordinate_slices=False, constraint=_spec.MAJORITY,
    cost="O(n^2 d + n^3)",
    reference=_spec.Reference(
        "Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini, "
        "Zeitouni, Koushanfar, Sadeghi, Schneider",
        "FLAME: Taming Backdoors in Federated Learning", "USENIX Security", 2022),
    note="The paper sets the noise level lambda = 0.001 for image tasks; the default here is "
         "noise=0.0 (a deterministic robust mean; pass noise=0.001 and a key for the paper's "
         "setting). distance='cosine' clusters the cosine distances as the paper describes; the "
         "released code (and its copies) passes the cosine-distance matrix to HDBSCAN as "
         "features, i.e. Euclidean distances between its rows: distance='cosine_rows'. The "
         "code's cosines are between local models, here between the updates an aggregator "
         "receives. The clipping bound is the median norm of all rows, as in the paper.",
)
def flame(updates, *, f: int, key=None, noise: float = 0.0, distance: str = "cosine",
          report: bool = False):
    """FLAME: the HDBSCAN majority cluster of cosine distances, median-clipped, plus noise.

    The kept set ``S`` is the HDBSCAN cluster (``min_cluster_size = n // 2 + 1``,
    ``min_samples = 1``, ``allow_single_cluster=True``) of the cosine distances
    ``1 - cos(g_i, g_j)``, which at these settings is the single-linkage cluster of at least
    ``n // 2 + 1`` rows at the lowest merge height where one exists. With
    ``S_t = median_i ||g_i||`` over all rows,
    ``agg = mean_{i in S} g_i min(1, S_t / ||g_i||) + N(0, (noise S_t)^2 I)``.
    Needs ``n > 2f``; a row holding NaN/Inf (or whose norm overflows) is at infinite distance
    from every row, so it is never in ``S``. Not available with ``layout="coordinates"``: the
    noise would repeat on every slice.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers, ``n > 2f`` (used for the check only).
      key: int seed or JAX key for the noise; needed when ``noise > 0``.
      noise: ``lambda``, the noise standard deviation relative to ``S_t``, ``>= 0`` (the
        paper: 0.001 for image classification, 0.01 for NLP).
      distance: ``"cosine"`` (the paper) or ``"cosine_rows"`` (the released code: Euclidean
        distances between the rows of the cosine-distance matrix).
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (which rows
        reached the output, with what weight), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [3.0, 0.3], [1.0, -0.1], [0.0, 5.0], [-4.0, 1.0]])
      >>> flame(g, f=2)
      Array([1.6666667 , 0.06666668], dtype=float32)

    References:
      Nguyen et al., `FLAME: Taming Backdoors in Federated Learning`, USENIX Security 2022.
    """
    n, f = _common.workers_and_f(updates, f, flame.spec)
    _common.check_choice(distance, "flame", "distance", FLAME_DISTANCES)
    silent = False
    if isinstance(noise, (int, float)):  # a traced noise level cannot be checked
        checks.require(noise >= 0, "flame",
                       f"needs noise >= 0 (lambda, relative to the median norm); got "
                       f"noise={noise}.")
        silent = noise == 0
    norms, finite = _norms(updates)
    cos = _cosine_distances(updates, norms, finite, hostile=jnp.inf)
    dist = cos if distance == "cosine" else _rows_distances(cos, finite)
    kept = _majority_cluster(dist) & finite
    bound = _median(norms, "midpoint")
    scales = _clip_scales(norms, finite, bound)
    out = _clipped_mean(updates, kept, scales)
    selected = jnp.where(kept, scales, 0.0)
    if silent:
        return _selection.returning(out, report, selected)
    key = checks.as_key(key, "flame")
    leaves, treedef = jax.tree.flatten(out)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = []
    for k, leaf in zip(keys, leaves):
        acc = reductions.accumulation_dtype(leaf)
        std = (noise * bound).astype(acc)
        noisy.append((leaf.astype(acc) + std * jax.random.normal(k, leaf.shape, acc))
                     .astype(leaf.dtype))
    return _selection.returning(jax.tree.unflatten(treedef, noisy), report, selected)
