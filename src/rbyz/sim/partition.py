"""How the workers share the data (partitioners), and how each draws its batch (samplers).

The partitioners run once per run on the host, in NumPy with ``np.random.default_rng(seed)``
(same seed, same split). Each returns a :class:`Partition`: a padded ``[n, max_size]`` index
matrix with the true sizes, so the samplers can draw every worker's batch in one array op inside
the compiled step. Worker index sets are always disjoint.

Schemes (:data:`SCHEMES`):

- ``"iid"``: shuffle, split evenly.
- ``"dirichlet"``: for every class, its examples are split over the workers in proportions
  drawn from ``Dir(alpha)`` (small ``alpha``: few classes per worker).
- ``"classes"``: every worker holds ``classes_per_worker`` whole classes (Chen et al. 2020).
- ``"gamma"``: ByzFL's gamma-similarity: a fraction ``gamma`` iid, the rest label-sorted shards.
- ``"sorted"``: label-sorted contiguous shards (the "noniid" setting of Karimireddy et al.).

Example:
  >>> labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  >>> part = partition(labels, 4, "sorted")
  >>> part.indices.tolist(), part.sizes.tolist()
  ([[0, 1], [2, 3], [4, 5], [6, 7]], [2, 2, 2, 2])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz.attacks.data import label_flip

SCHEMES = ("iid", "dirichlet", "classes", "gamma", "sorted")
# Dirichlet draws that leave a worker empty are redrawn (as the common implementations do);
# after this many the setting is reported as impossible in practice.
DIRICHLET_RETRIES = 100


class Partition(NamedTuple):
    """The workers' example indices.

    Attributes:
      indices: int32 ``[n, max_size]``; row ``i`` lists worker ``i``'s dataset indices in its
        first ``sizes[i]`` entries, then repeats them cyclically up to ``max_size`` (so the
        padding holds only the row's own examples).
      sizes: int32 ``[n]``, every entry ``>= 1``.
    """

    indices: np.ndarray
    sizes: np.ndarray


# ------------------------------------------------------------------------------------------------
# Partitioners (host side).

def _fail(scheme: str, message: str):
    raise ValueError(f"partition(scheme={scheme!r}): {message}")


def _pack(parts: list[np.ndarray]) -> Partition:
    sizes = np.array([len(p) for p in parts], dtype=np.int32)
    width = int(sizes.max())
    return Partition(np.stack([np.resize(p, width) for p in parts]).astype(np.int32), sizes)


def _iid(labels, n, rng):
    return np.array_split(rng.permutation(len(labels)), n)


def _sorted_order(labels, candidates):
    """``candidates`` ordered by label, ties by index (ByzFL's and the epfml code's order)."""
    return candidates[np.lexsort((candidates, labels[candidates]))]


def _sorted(labels, n, rng):
    return np.array_split(_sorted_order(labels, np.arange(len(labels))), n)


def _dirichlet(labels, n, rng, alpha):
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(DIRICHLET_RETRIES):
        shares = rng.dirichlet(np.full(n, alpha), size=len(classes))      # [classes, n]
        if not np.isfinite(shares).all():
            continue
        pieces = [[] for _ in range(n)]
        for share, idx in zip(shares, members):
            idx = rng.permutation(idx)
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for worker, piece in enumerate(np.split(idx, cuts)):
                pieces[worker].append(piece)
        parts = [np.sort(np.concatenate(p)) for p in pieces]
        if min(len(p) for p in parts) >= 1:
            return parts
    _fail("dirichlet", f"with alpha={alpha} left a worker without data in each of "
          f"{DIRICHLET_RETRIES} draws (n={n} workers, {len(labels)} examples, {len(classes)} "
          "classes). Use a larger alpha, fewer workers or more examples.")


def _classes(labels, n, rng, per_worker):
    classes = np.unique(labels)
    if per_worker > len(classes):
        _fail("classes", f"classes_per_worker={per_worker} exceeds the {len(classes)} classes "
              f"in the labels. Use classes_per_worker <= {len(classes)}.")
    # Worker i holds the classes i*k, ..., i*k + k - 1 (mod C): disjoint when n*k <= C; beyond
    # that each class is shared by the workers holding it, and they split it disjointly.
    held = (np.arange(n)[:, None] * per_worker + np.arange(per_worker)[None, :]) % len(classes)
    pieces = [[] for _ in range(n)]
    for c, label in enumerate(classes):
        holders = np.flatnonzero((held == c).any(axis=1))
        if holders.size == 0:
            continue
        idx = rng.permutation(np.flatnonzero(labels == label))
        for worker, piece in zip(holders, np.array_split(idx, holders.size)):
            pieces[worker].append(piece)
    parts = [np.sort(np.concatenate(p)) for p in pieces]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        _fail("classes", f"with classes_per_worker={per_worker} and n={n} workers, worker(s) "
              f"{empty[:5]} get no examples: a class has fewer examples than the workers sharing "
              "it. Use fewer workers, more classes per worker or more examples.")
    return parts


def _gamma(labels, n, rng, gamma):
    order = rng.permutation(len(labels))
    m = int(len(labels) * gamma)                 # ByzFL: int(len(idx) * gamma) examples iid
    iid = np.array_split(order[:m], n)
    rest = _sorted_order(labels, order[m:])
    # Every worker ends with the iid scheme's size (balanced within one example): the sorted
    # shards make up what the iid piece lacks. gamma=1 is then "iid" and gamma=0 "sorted".
    total = np.array([len(p) for p in np.array_split(np.arange(len(labels)), n)])
    shard = total - np.array([len(p) for p in iid])
    cuts = np.cumsum(shard)[:-1]
    return [np.concatenate([a, b]) for a, b in zip(iid, np.split(rest, cuts))]


def partition(labels: np.ndarray, n: int, scheme: str = "iid", *, seed: int = 0,
              alpha: float = 1.0, classes_per_worker: int = 1, gamma: float = 0.5) -> Partition:
    """Splits a dataset's examples over ``n`` workers: disjoint, every worker non-empty.

    - ``"iid"``: a random permutation cut into ``n`` pieces of sizes within one of each other.
    - ``"dirichlet"``: for each class ``c``, proportions ``p_c ~ Dir(alpha * 1_n)`` over the
      workers; the class's shuffled examples are cut at ``cumsum(p_c) * |c|``. This is the
      per-class form of the Dirichlet scheme used by Yurochkin et al. 2019, Wang et al. 2020,
      NIID-Bench and ByzFL (Hsu et al. 2019 draw the same heterogeneity per worker over the
      classes). Draws that leave a worker empty are redrawn, up to :data:`DIRICHLET_RETRIES`
      times (NIID-Bench redraws until every worker has 10 examples; here 1), so for small
      ``alpha`` the split is conditioned on that event.
    - ``"classes"``: worker ``i`` holds the classes ``i*k .. i*k + k - 1`` (mod the ``C``
      classes present; ``k = classes_per_worker``), as in Chen et al. 2020's exclusive-classes
      experiments. With ``n * k <= C`` the class sets are disjoint (classes beyond ``n * k`` are
      left out); with more, a class is shared by the workers holding it and its shuffled
      examples are split evenly between them.
    - ``"gamma"``: ByzFL's gamma-similarity (``DataDistributor.gamma_niid_idx``): ``int(N *
      gamma)`` examples are spread iid, the rest are sorted by label (ties by index) and cut into
      contiguous shards, one per worker. Two documented departures from ByzFL: the iid part is a
      random subset (ByzFL takes the first examples in file order, which is non-iid for a file
      sorted by label), and the shards are sized so that every worker gets the iid scheme's size
      (ByzFL sizes both parts independently, which can leave a worker empty when N is near n).
      ``gamma=1`` gives exactly ``"iid"``, ``gamma=0`` exactly ``"sorted"``.
    - ``"sorted"``: examples sorted by label (ties by index) and cut into ``n`` contiguous
      shards (ByzFL's "extreme_niid"; the epfml "noniid" setting of Karimireddy et al., which
      sorts over the honest workers only: pass the honest count as ``n`` for that).

    Args:
      labels: integer labels ``[N]`` (any non-negative values; the classes are those present).
      n: the number of workers (or of groups / partitions for the coding schemes), ``1 <= n <=
        N``.
      scheme: one of :data:`SCHEMES`.
      seed: the NumPy seed (``np.random.default_rng(seed)``); ``"sorted"`` uses none.
      alpha: Dirichlet concentration, ``> 0`` (``"dirichlet"`` only).
      classes_per_worker: classes per worker, ``1 <= k <= C`` (``"classes"`` only).
      gamma: the iid fraction, in ``[0, 1]`` (``"gamma"`` only).

    Returns:
      A :class:`Partition`.

    Raises:
      ValueError: an unknown scheme, bad labels or values, or a setting that leaves a worker
        without data; the message names the scheme and its values and how to fix it.

    Example:
      >>> labels = np.repeat(np.arange(4), 5)
      >>> part = partition(labels, 2, "classes", classes_per_worker=2, seed=0)
      >>> [sorted(set(labels[row[:s]].tolist())) for row, s in zip(part.indices, part.sizes)]
      [[0, 1], [2, 3]]

    References:
      Hsu, Qi, Brown, `Measuring the Effects of Non-Identical Data Distribution for Federated
      Visual Classification`, arXiv:1909.06335, 2019.
      Chen, Chen, Sun, Wu, Hong, `Distributed Training with Heterogeneous Data: Bridging Median-
      and Mean-Based Algorithms`, NeurIPS 2020.
      Karimireddy, He, Jaggi, `Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing`, ICLR 2022.
      ByzFL, ``byzfl/fed_framework/data_distributor.py`` (github.com/LPD-EPFL/byzfl):
      gamma-similarity, the construction of the "similarity" in Karimireddy, Kale, Mohri,
      Reddi, Stich, Suresh, `SCAFFOLD: Stochastic Controlled Averaging for Federated Learning`,
      ICML 2020.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"partition: unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)}.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        _fail(scheme, f"labels must be a 1-D integer array; got shape {labels.shape} and dtype "
              f"{labels.dtype}.")
    if labels.size and labels.min() < 0:
        _fail(scheme, f"labels must be >= 0; got min {labels.min()}.")
    n = checks.static_int(n, f"partition(scheme={scheme!r})", "n", minimum=1)
    if n > labels.size:
        _fail(scheme, f"n={n} workers but only {labels.size} examples: some worker would get no "
              "data. Use fewer workers or more examples.")
    if scheme == "dirichlet" and not (np.isfinite(alpha) and alpha > 0):
        _fail(scheme, f"alpha must be a finite number > 0; got alpha={alpha!r}.")
    if scheme == "gamma" and not (0.0 <= gamma <= 1.0):
        _fail(scheme, f"gamma must be in [0, 1] (1: iid, 0: label-sorted); got gamma={gamma!r}.")
    if scheme == "classes":
        classes_per_worker = checks.static_int(
            classes_per_worker, "partition(scheme='classes')", "classes_per_worker", minimum=1)

    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(labels, n, rng)
    elif scheme == "sorted":
        parts = _sorted(labels, n, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, n, rng, float(alpha))
    elif scheme == "classes":
        parts = _classes(labels, n, rng, classes_per_worker)
    else:
        parts = _gamma(labels, n, rng, float(gamma))
    return _pack(parts)


def heterogeneity_label(scheme: str, alpha: float = 1.0, classes_per_worker: int = 1,
                        gamma: float = 0.5) -> str:
    """A short label of a partition setting for result tables, e.g. ``"dirichlet(0.1)"``.

    Example:
      >>> heterogeneity_label("iid"), heterogeneity_label("dirichlet", alpha=0.1)
      ('iid', 'dirichlet(0.1)')
      >>> heterogeneity_label("classes", classes_per_worker=2), heterogeneity_label("gamma", gamma=0.5)
      ('classes(2)', 'gamma(0.5)')
    """
    if scheme not in SCHEMES:
        raise ValueError(f"heterogeneity_label: unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)}.")
    value = {"dirichlet": alpha, "classes": classes_per_worker, "gamma": gamma}.get(scheme)
    return scheme if value is None else f"{scheme}({value:g})"


# ------------------------------------------------------------------------------------------------
# Samplers (traced).

def _check_part(indices, sizes, rule: str):
    indices, sizes = jnp.asarray(indices), jnp.asarray(sizes)
    checks.require(indices.ndim == 2, rule, f"needs indices [n, max_size]; got shape "
                   f"{indices.shape}. Pass Partition.indices.")
    checks.require(sizes.shape == indices.shape[:1], rule, f"needs sizes [n] matching indices "
                   f"{indices.shape}; got shape {sizes.shape}. Pass Partition.sizes.")
    checks.require(jnp.issubdtype(indices.dtype, jnp.integer)
                   and jnp.issubdtype(sizes.dtype, jnp.integer), rule,
                   f"needs integer indices and sizes; got {indices.dtype} and {sizes.dtype}.")
    return indices, sizes


def sample(key, indices, sizes, batch_size: int) -> jax.Array:
    """Every worker's batch of dataset indices, drawn uniformly from its own set, in one op.

    ``pos[i, j] ~ U{0, ..., sizes[i] - 1}`` independently (with replacement, as the
    per-step sampling of SGD analyses assumes), then ``indices[i, pos[i, j]]``. The per-partition
    sampling of Election Coding is this function over the partitions' index sets.

    Args:
      key: a PRNG key (typed or raw) or an int seed.
      indices: int ``[n, max_size]`` (:attr:`Partition.indices`).
      sizes: int ``[n]`` (:attr:`Partition.sizes`), every entry ``>= 1``.
      batch_size: examples per worker (static, ``>= 1``).

    Returns:
      int32 ``[n, batch_size]`` dataset indices; row ``i`` holds only worker ``i``'s examples.

    Example:
      >>> part = partition(np.arange(10) % 2, 2, "sorted")
      >>> idx = sample(jax.random.key(0), part.indices, part.sizes, 3)
      >>> idx.shape, bool((idx[0] % 2 == 0).all()), bool((idx[1] % 2 == 1).all())
      ((2, 3), True, True)
    """
    indices, sizes = _check_part(indices, sizes, "sample")
    batch_size = checks.static_int(batch_size, "sample", "batch_size", minimum=1)
    key = checks.as_key(key, "sample")
    positions = jax.random.randint(key, (indices.shape[0], batch_size), 0,
                                   sizes.astype(jnp.int32)[:, None], dtype=jnp.int32)
    return jnp.take_along_axis(indices, positions, axis=1).astype(jnp.int32)


def sample_grouped(key, group_indices, group_sizes, batch_size: int, r: int) -> jax.Array:
    """Batches for a group code (DETOX, DRACO): the ``r`` members of a group draw the same batch.

    One batch per group is drawn with :func:`sample`, then repeated ``r`` times, so workers
    ``g*r, ..., g*r + r - 1`` (the consecutive groups of :func:`rbyz.coding.group_assignment`)
    get bit-identical rows and honest members send bit-identical gradients.

    Args:
      key: a PRNG key (typed or raw) or an int seed.
      group_indices: int ``[groups, max_size]``, the groups' index sets (a partition over
        ``n // r`` units).
      group_sizes: int ``[groups]``.
      batch_size: examples per worker (static, ``>= 1``).
      r: the group size (static, ``>= 1``).

    Returns:
      int32 ``[groups * r, batch_size]``.

    Example:
      >>> part = partition(np.arange(12), 2, "iid")
      >>> idx = sample_grouped(0, part.indices, part.sizes, 4, 3)
      >>> idx.shape, bool((idx[0] == idx[2]).all()), bool((idx[3] == idx[5]).all())
      ((6, 4), True, True)
    """
    r = checks.static_int(r, "sample_grouped", "r", minimum=1)
    rows = sample(key, group_indices, group_sizes, batch_size)
    return jnp.repeat(rows, r, axis=0, total_repeat_length=rows.shape[0] * r)


def flip_labels(labels, byzantine, num_classes: int) -> jax.Array:
    """Label flipping on the Byzantine workers' batches only (:func:`rbyz.attacks.data.label_flip`).

    Args:
      labels: int ``[n, batch]`` (any trailing shape), the workers' labels.
      byzantine: bool ``[n]``, ``True`` for a Byzantine worker (NumPy or traced).
      num_classes: the number of classes (static).

    Returns:
      ``labels`` with ``y -> num_classes - 1 - y`` in the Byzantine rows, same shape and dtype.

    Example:
      >>> flip_labels(jnp.array([[0, 1], [2, 3]]), np.array([False, True]), 10)
      Array([[0, 1],
             [7, 6]], dtype=int32)
    """
    labels = jnp.asarray(labels)
    byzantine = jnp.asarray(byzantine)
    checks.require(labels.ndim >= 1 and byzantine.shape == labels.shape[:1], "flip_labels",
                   f"needs a mask [n] for labels [n, ...]; got mask shape {byzantine.shape} and "
                   f"labels shape {labels.shape}.")
    checks.require(byzantine.dtype == jnp.bool_, "flip_labels",
                   f"needs a boolean mask; got dtype {byzantine.dtype}. Build one with "
                   "jnp.zeros(n, bool).at[positions].set(True).")
    mask = byzantine.reshape(byzantine.shape + (1,) * (labels.ndim - 1))
    return jnp.where(mask, label_flip(labels, num_classes=num_classes), labels)
