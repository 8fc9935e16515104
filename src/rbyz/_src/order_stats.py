"""Coordinate-wise order statistics over the worker axis.

For ``n <= NETWORK_MAX_ROWS`` rows the values are ordered by Batcher's odd-even merge sorting
network: a static list of compare-exchanges, each one ``jnp.minimum``/``jnp.maximum`` of two
rows. XLA fuses the whole network into one elementwise loop and drops the comparators that do not
feed the ranks asked for, so a median costs a few passes over memory instead of a sort
(``jnp.median`` on ``[25, 1e6]`` float32: 1.6 s on 2 CPU cores; the network: ~15 ms). Beyond
that size ``lax.sort`` over axis 0 is used.

Non-finite values are Byzantine by assumption: NaN is mapped to ``+inf`` first, so it sorts last
and is trimmed like the largest value (``jnp.minimum``/``maximum`` would propagate it).

References:
  Batcher, `Sorting networks and their applications`, AFIPS 1968.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rbyz._src import tree as tree_util

NETWORK_MAX_ROWS = 64


@functools.cache
def batcher_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort on ``n`` inputs.

    Built for the next power of two and pruned to the first ``n`` wires, which is still a
    sorting network (the missing wires act as ``+inf``).
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def sanitize(x: jax.Array) -> jax.Array:
    """Maps NaN to ``+inf`` so that it orders after every number."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return jnp.where(jnp.isnan(x), jnp.array(jnp.inf, x.dtype), x)


def sorted_rows(x: jax.Array) -> list[jax.Array]:
    """The ``n`` rows of ``x`` ordered coordinate-wise, ascending, NaN last.

    Args:
      x: ``[n, ...]``.

    Returns:
      A list ``s`` of ``n`` arrays of shape ``x.shape[1:]`` with ``s[0] <= s[1] <= ...``
      coordinate by coordinate. Ranks that the caller does not use cost nothing under jit.
    """
    n = x.shape[0]
    if n > NETWORK_MAX_ROWS:
        return tree_util.rows(jnp.sort(sanitize(x), axis=0))
    # Sanitising row by row lets XLA fuse it into the network; sanitising the whole array first
    # made XLA write a sanitised copy and split the network (10x slower here).
    wires = [sanitize(row) for row in tree_util.rows(x)]
    for a, b in batcher_pairs(n):
        wires[a], wires[b] = jnp.minimum(wires[a], wires[b]), jnp.maximum(wires[a], wires[b])
    return wires


def median(x: jax.Array, even: str = "midpoint") -> jax.Array:
    """Coordinate-wise median over axis 0, NaN treated as ``+inf``; output dtype = input dtype.

    Args:
      x: ``[n, ...]``.
      even: for even ``n``: ``"midpoint"`` (mean of the two middle values, as numpy),
        ``"lower"`` (as ``torch.median``) or ``"upper"``.
    """
    n = x.shape[0]
    s = sorted_rows(x)
    lo, hi = (n - 1) // 2, n // 2
    if lo == hi or even == "lower":
        return s[lo]
    if even == "upper":
        return s[hi]
    acc = tree_util.accumulation_dtype(x.dtype)
    return ((s[lo].astype(acc) + s[hi].astype(acc)) / 2).astype(x.dtype)


def mean_of_ranks(x: jax.Array, start: int, stop: int) -> jax.Array:
    """Coordinate-wise mean of the order statistics of ranks ``start, ..., stop - 1``."""
    s = sorted_rows(x)
    acc = tree_util.accumulation_dtype(x.dtype)
    total = tree_util.sum_rows([s[r].astype(acc) for r in range(start, stop)])
    return (total / (stop - start)).astype(x.dtype)


def mean_around_median(x: jax.Array, k: int) -> jax.Array:
    """Coordinate-wise mean of the ``k`` values closest to the coordinate's median.

    Used by MeaMed and by Bulyan's second stage; :func:`mean_around` with the median as centre.

    Args:
      x: ``[n, ...]``.
      k: how many values to keep, ``1 <= k <= n``.
    """
    return mean_around(x, k)


def mean_around(x: jax.Array, k: int, trim: int | None = None) -> jax.Array:
    """Coordinate-wise mean of the ``k`` values closest to a centre of the coordinate.

    The centre ``c`` is the median (``trim=None``, MeaMed, Bulyan) or the trimmed mean without
    the ``trim`` smallest and ``trim`` largest values (Phocas). The ``k`` values nearest ``c``
    form a run ``s[a], ..., s[a + k - 1]`` of the sorted values, and sliding the run one rank
    up is better exactly while the value it drops is farther than the value it takes,
    ``c - s[r] > s[r + k] - c``; that test is true for a prefix of the ranks ``r`` (the left
    distance falls and the right one grows with ``r``), so the run starts at
    ``a = #{r < n - k : c - s[r] > s[r + k] - c}``. Equal distances keep the lower value. This
    is the ``k`` nearest values even when values repeat (comparing runs by their largest
    distance alone is not: ``0, 0, 2, 3, 5, 6, 8`` around ``10/3`` would keep both zeros
    rather than ``6``).

    Args:
      x: ``[n, ...]``.
      k: how many values to keep, ``1 <= k <= n``.
      trim: ``None`` for the median, else values trimmed from each side, ``2 trim < n``.
    """
    n = x.shape[0]
    s = sorted_rows(x)
    acc = tree_util.accumulation_dtype(x.dtype)
    sa = [v.astype(acc) for v in s]
    lo, hi = (n - 1) // 2, n // 2
    if trim is None:
        center = (sa[lo] + sa[hi]) / 2
    else:
        center = tree_util.sum_rows(sa[trim:n - trim]) / (n - 2 * trim)
    start = jnp.zeros(center.shape, jnp.int32)
    for r in range(n - k):
        start = start + (center - sa[r] > sa[r + k] - center).astype(jnp.int32)
    zero = jnp.zeros((), acc)
    total = tree_util.sum_rows(
        [jnp.where((start <= r) & (r < start + k), sa[r], zero) for r in range(n)])
    return (total / k).astype(x.dtype)


def materialized(fn, x: jax.Array) -> jax.Array:
    """``fn(x)``, computed once and stored, even when its consumers broadcast it.

    XLA's fusion pass copies a cheap-looking producer (a network of minimum/maximum) into each
    consumer; when the consumer broadcasts the result over the ``n`` rows, for instance to centre
    them, the whole network is recomputed ``n`` times (measured 20x slower on ``[25, 1e6]``).
    ``optimization_barrier`` does not stop this on the CPU; a conditional with a runtime
    predicate is a boundary XLA keeps. Both branches are ``fn``, so the result is ``fn(x)``.
    """
    unknown_until_run = jnp.isnan(x.reshape(-1)[0])
    return jax.lax.cond(unknown_until_run, fn, fn, x)
