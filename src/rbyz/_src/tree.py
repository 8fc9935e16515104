"""Helpers for stacked pytrees: every leaf carries the worker axis first.

XLA on the CPU reduces over a short leading axis very slowly (``x.sum(0)`` on ``[25, 1e6]``
float32 took 100 ms here, the same sum written as 24 row additions 2 ms), so the row reductions
below are unrolled over the rows for the worker counts met in practice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# Above this many rows an unrolled reduction makes graphs too large; XLA's reduce is used instead.
UNROLL_MAX_ROWS = 128


def num_workers(tree, rule: str) -> int:
    """Returns the worker count ``n`` shared by every leaf, or raises ``ValueError``.

    Args:
      tree: a stacked pytree, each leaf of shape ``[n, ...]``.
      rule: the public name of the calling rule, used in error messages.
    """
    flat, _ = jax.tree.flatten_with_path(tree)
    if not flat:
        raise ValueError(
            f"{rule}: got an empty pytree; pass stacked updates with at least one array leaf "
            "of shape [n, ...] (worker axis first)."
        )
    counts = {}
    for path, leaf in flat:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{rule}: leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every leaf "
                "needs the worker axis first (shape [n, ...]). Stack per-worker values with "
                "jax.tree.map(lambda *xs: jnp.stack(xs), *per_worker)."
            )
        counts.setdefault(shape[0], jax.tree_util.keystr(path) or "<root>")
    if len(counts) > 1:
        found = ", ".join(f"{leaf} has {n}" for n, leaf in counts.items())
        raise ValueError(
            f"{rule}: leaves disagree on the worker count (first axis): {found}. Every leaf of "
            "the stacked updates must have the same number of workers."
        )
    (n,) = counts
    if n == 0:
        raise ValueError(f"{rule}: got n=0 workers; pass at least one worker's update.")
    return n


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for 16-bit floats (sums of bf16/f16 lose digits), the dtype itself otherwise."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return dtype


def rows(x: jax.Array) -> list[jax.Array]:
    """Splits ``x`` of shape ``[n, ...]`` into a list of its ``n`` rows (static slices)."""
    return [x[i] for i in range(x.shape[0])]


def sum_rows(xs: list[jax.Array] | jax.Array) -> jax.Array:
    """Sum over the worker axis: unrolled additions for ``n <= UNROLL_MAX_ROWS``."""
    if isinstance(xs, (list, tuple)):
        if len(xs) <= UNROLL_MAX_ROWS:
            return functools.reduce(jnp.add, xs)
        xs = jnp.stack(xs)
    if xs.shape[0] <= UNROLL_MAX_ROWS:
        return functools.reduce(jnp.add, rows(xs))
    return jnp.sum(xs, axis=0)


def weighted_sum_rows(x: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_i weights[i] * x[i]`` in the accumulation dtype, rows of weight 0 ignored exactly.

    A row of weight 0 contributes 0 even when it holds NaN or Inf (``0 * inf`` would be NaN):
    this is how a rule that excludes a Byzantine row keeps it out of the output.

    Args:
      x: ``[n, ...]``.
      weights: ``[n]`` (traced values allowed).
    """
    acc = accumulation_dtype(x.dtype)
    weights = weights.astype(acc)
    if x.shape[0] <= UNROLL_MAX_ROWS:
        return sum_rows([
            jnp.where(weights[i] != 0, weights[i] * xi.astype(acc), 0)
            for i, xi in enumerate(rows(x))
        ])
    w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(jnp.where(w != 0, w * x.astype(acc), 0), axis=0)


def mean_rows(x: jax.Array) -> jax.Array:
    """Mean over the worker axis, accumulated in float32 for 16-bit inputs; input dtype out."""
    acc = accumulation_dtype(x.dtype)
    total = sum_rows(x.astype(acc))
    return (total / x.shape[0]).astype(x.dtype)


def take_row(tree, index):
    """Worker ``index``'s update (traced index allowed), with the worker axis removed."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def take_rows(tree, indices):
    """The rows ``indices`` of every leaf, stacked (traced indices allowed)."""
    return jax.tree.map(lambda leaf: jnp.take(leaf, indices, axis=0), tree)
