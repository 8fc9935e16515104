"""Bucketing: random groups of workers averaged before a robust aggregator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.preaggregators.clipping import per_row


def bucket_count(n: int, hparams) -> int:
    """Rows after bucketing: ``ceil(n / s)``."""
    return -(-n // hparams.get("s", 2))


@_spec.declare(
    "preaggregator", key=True, constraint=_spec.ANY, coordinate_slices=True, cost="O(n d)",
    rows_out=bucket_count,
    reference=_spec.Reference("Karimireddy, He, Jaggi",
                              "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
                              "ICLR", 2022))
def bucketing(updates, *, key=None, s: int = 2):
    """Bucketing: randomly permutes the rows and averages them in buckets of ``s``.

    With a uniformly random permutation ``pi`` of the ``n`` rows and ``T = ceil(n / s)``,
    ``y_b = mean(x_pi(b s), ..., x_pi(min(b s + s, n) - 1))`` for ``b = 0, ..., T - 1``: ``T - 1``
    buckets of ``s`` consecutive permuted rows and a last one of ``n - (T - 1) s`` rows, as in the
    paper's code (ByzFL instead makes ``floor(n/s)`` full buckets plus one of the remainder, which
    is the same partition). The aggregator after it sees only ``T`` rows: its own constraints
    apply to ``n = T`` (e.g. Krum then needs ``T >= 2f + 3``; :func:`compose` checks it), and one
    Byzantine row spoils its whole bucket, so with ``f`` Byzantine workers up to ``f`` buckets are
    Byzantine. A NaN/Inf row makes its bucket's mean non-finite, which robust aggregators rank
    last. Any ``n >= 1``.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      key: a JAX PRNG key or an int seed (required; the same key gives the same buckets).
      s: the bucket size, a Python int ``>= 1`` (``s = 1`` only permutes the rows).

    Returns:
      A stacked pytree with ``T = ceil(n / s)`` rows per leaf, in the dtypes of ``updates``.

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import preaggregators
      >>> x = {"w": jnp.arange(10.0).reshape(5, 2)}
      >>> out = preaggregators.bucketing(x, key=0, s=2)
      >>> out["w"].shape, float(out["w"][:2].sum() * 2 + out["w"][2].sum())  # total preserved
      ((3, 2), 45.0)

    References:
      Karimireddy, He, Jaggi, `Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing`, ICLR 2022.
    """
    n = tree_util.num_workers(updates, "bucketing")
    s = checks.static_int(s, "bucketing", "s", minimum=1)
    key = checks.as_key(key, "bucketing")
    num_buckets = bucket_count(n, {"s": s})
    # Slot r of bucket b holds permuted row b*s + r; index n (out of range) marks an empty slot.
    slots = jnp.concatenate([
        jax.random.permutation(key, n),
        jnp.full((num_buckets * s - n,), n, jnp.int32),
    ]).reshape(num_buckets, s)
    sizes = jnp.array([s] * (num_buckets - 1) + [n - (num_buckets - 1) * s])

    def average(leaf):
        acc = tree_util.accumulation_dtype(leaf.dtype)
        members = [
            jnp.take(leaf, slots[:, r], axis=0, mode="fill", fill_value=0).astype(acc)
            for r in range(s)
        ]
        total = tree_util.sum_rows(members)
        return (total / per_row(sizes.astype(acc), leaf.ndim)).astype(leaf.dtype)

    return jax.tree.map(average, updates)
