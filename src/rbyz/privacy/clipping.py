"""Per-example clipping inside each worker: the bound on one record's influence that privacy needs.

For one worker with batch ``x_1, ..., x_k`` (``mask_j`` marks the real examples of a padded,
sampled batch) the clipped gradient is

    g = (1 / B) * sum_j mask_j * clip_C(grad l(theta; x_j)),
    clip_C(v) = v * min(1, C / ||v||),

with ``B`` the *expected* batch size, a public constant (not the realised ``sum_j mask_j``:
dividing by the realised size would make the divisor itself depend on the records). One record
added or removed moves ``g`` by at most ``C / B`` (in the clipping's norm); one record replaced by
another, at most ``2 C / B``. :meth:`ClippedGrad.sensitivity` says which, so nobody computes it by
hand (jax_privacy's ``clipped_grad(...).sensitivity`` is the model).

Every example's gradient is taken separately (``jax.vmap`` of ``jax.grad`` over the batch, one
example at a time through the model, so a batch statistic such as batch norm cannot leak across
examples); a gradient with a NaN or an infinity is dropped (counts as zero), so that the bound
holds for every input. With ``microbatch`` the batch is cut into chunks summed in a
``lax.map`` (a full-batch step over thousands of examples keeps one chunk of per-example
gradients in memory at a time).

Example:
  >>> import jax.numpy as jnp
  >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
  >>> grad_fn = clipped_grad(loss, clip=1.0, normalize_by=2)
  >>> x, y = jnp.array([[1.0, 0.0], [0.0, 100.0]]), jnp.zeros(2)
  >>> loss_value, g = grad_fn(jnp.ones(2), x, y)
  >>> g  # (2 * [1, 0] clipped to [1, 0], and [0, 20000] clipped to [0, 1]) / 2
  Array([0.5, 0.5], dtype=float32)
  >>> grad_fn.sensitivity("add_or_remove_one"), grad_fn.sensitivity("replace_one")
  (0.5, 1.0)

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, `Deep Learning with Differential
  Privacy`, CCS 2016.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

NORMS = ("l2", "l1")
RELATIONS = ("add_or_remove_one", "replace_one")


def _norm(tree, norm: str) -> jax.Array:
    leaves = [leaf.astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
    if norm == "l1":
        return sum(jnp.sum(jnp.abs(leaf)) for leaf in leaves)
    return jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in leaves))


def clip_tree(tree, clip: float, norm: str = "l2"):
    """``tree * min(1, clip / ||tree||)`` in the ``norm`` over all leaves; a tree holding a NaN
    or an infinity becomes zeros (its norm is not finite, so no scale bounds it).

    Example:
      >>> clip_tree({"w": jnp.array([3.0, 4.0])}, 1.0)["w"]
      Array([0.6, 0.8], dtype=float32)
      >>> clip_tree(jnp.array([jnp.nan, 1.0]), 1.0)
      Array([0., 0.], dtype=float32)
    """
    size = _norm(tree, norm)
    scale = jnp.where(jnp.isfinite(size), jnp.minimum(1.0, clip / jnp.maximum(size, 1e-30)), 0.0)
    return jax.tree.map(lambda leaf: jnp.where(scale > 0, leaf * scale.astype(leaf.dtype),
                                               jnp.zeros_like(leaf)), tree)


@dataclasses.dataclass(frozen=True)
class ClippedGrad:
    """``(params, x, y, mask=None) -> (loss, g)``: one worker's per-example clipped gradient.

    ``loss`` is the mean unclipped loss over the real examples (a metric, not private); ``g`` is
    the clipped sum divided by :attr:`normalize_by`. Build it with :func:`clipped_grad`.

    Attributes:
      loss_fn: ``(params, xb, yb) -> scalar`` on a batch; called on batches of one example.
      clip: the bound ``C`` on each example's gradient norm.
      normalize_by: the public divisor ``B`` (the expected batch size).
      norm: ``"l2"`` (Gaussian noise) or ``"l1"`` (Laplace noise needs an L1 bound).
      microbatch: examples per chunk of per-example gradients (``0``: the whole batch at once).
    """

    loss_fn: Callable[[Any, Any, Any], jax.Array]
    clip: float
    normalize_by: float
    norm: str = "l2"
    microbatch: int = 0

    def sensitivity(self, relation: str = "add_or_remove_one") -> float:
        """How far one record moves ``g``, in :attr:`norm`: ``C / B`` when a record is added
        or removed, ``2 C / B`` when one is replaced by another."""
        if relation not in RELATIONS:
            raise ValueError(f"ClippedGrad.sensitivity: relation must be one of "
                             f"{', '.join(RELATIONS)}; got {relation!r}.")
        factor = 2.0 if relation == "replace_one" else 1.0
        return factor * self.clip / self.normalize_by

    def __call__(self, params, x, y, mask=None, normalize_by=None):
        """``(loss, g)`` for one worker's batch ``x [k, ...]``, ``y [k]``; ``mask [k]`` marks
        its real examples (default: all); ``normalize_by`` (a traced scalar allowed) replaces
        :attr:`normalize_by` for this call (a full batch divides by each worker's own count)."""
        divisor = self.normalize_by if normalize_by is None else normalize_by
        count = jax.tree.leaves(x)[0].shape[0]
        if mask is None:
            mask = jnp.ones((count,), jnp.bool_)

        def one(xj, yj, keep):
            add_batch = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731
            value, grad = jax.value_and_grad(self.loss_fn)(params, add_batch(xj), add_batch(yj))
            grad = clip_tree(grad, self.clip, self.norm)
            grad = jax.tree.map(lambda g: jnp.where(keep, g, jnp.zeros_like(g)), grad)
            return jnp.where(keep, value, 0.0), grad

        def chunk_sum(xs, ys, ms):
            values, grads = jax.vmap(one)(xs, ys, ms)
            return jnp.sum(values), jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)

        size = self.microbatch if 0 < self.microbatch < count else count
        if size == count:
            total_loss, total = chunk_sum(x, y, mask)
        else:
            chunks = -(-count // size)
            pad = chunks * size - count

            def split(t, fill=0):
                return jax.tree.map(lambda a: jnp.concatenate(
                    [a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)]).reshape(
                        chunks, size, *a.shape[1:]), t)

            # lax.map, not a scan with a carry: the chunk sums stay [chunks, ...] (small beside
            # one chunk of per-example gradients), and under shard_map no carry has to match
            # the varying axes of the batch.
            values, grads = jax.lax.map(lambda batch: chunk_sum(*batch),
                                        (split(x), split(y), split(mask, False)))
            total_loss, total = jnp.sum(values), jax.tree.map(lambda g: jnp.sum(g, 0), grads)
        real = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
        grad = jax.tree.map(lambda g, p: (g / divisor).astype(p.dtype), total, params)
        return total_loss / real, grad


def clipped_grad(loss_fn: Callable[[Any, Any, Any], jax.Array], *, clip: float,
                 normalize_by: float, norm: str = "l2", microbatch: int = 0) -> ClippedGrad:
    """One worker's per-example clipped gradient, divided by the expected batch size.

    ``g = (1 / B) sum_j mask_j clip_C(grad l(theta; x_j))`` (module docstring); every setting
    checked here.

    Args:
      loss_fn: ``(params, xb, yb) -> scalar`` on a batch (the harness's loss; it is called on
        batches of one example, so it must not mix examples).
      clip: ``C > 0``.
      normalize_by: ``B > 0``, the expected batch size (Poisson sampling), the batch size
        (fixed batches) or the worker's record count (full batch).
      norm: ``"l2"`` or ``"l1"``.
      microbatch: examples per chunk (``0``: all at once).

    Returns:
      A :class:`ClippedGrad`; ``jax.vmap(grad_fn, in_axes=(None, 0, 0, 0))`` gives every
      worker's.

    Example:
      >>> clipped_grad(lambda w, x, y: 0.0, clip=0.0, normalize_by=32)
      Traceback (most recent call last):
      ...
      ValueError: clipped_grad: clip must be a finite number > 0 (the bound on each example's gradient norm, e.g. 1.0); got 0.0.
    """
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (
            math.isfinite(clip) and clip > 0):
        raise ValueError(f"clipped_grad: clip must be a finite number > 0 (the bound on each "
                         f"example's gradient norm, e.g. 1.0); got {clip!r}.")
    if isinstance(normalize_by, bool) or not isinstance(normalize_by, (int, float)) or not (
            math.isfinite(normalize_by) and normalize_by > 0):
        raise ValueError(f"clipped_grad: normalize_by must be a number > 0 (the expected batch "
                         f"size); got {normalize_by!r}.")
    if norm not in NORMS:
        raise ValueError(f"clipped_grad: norm must be one of {', '.join(NORMS)}; got {norm!r}.")
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 0:
        raise ValueError(f"clipped_grad: microbatch must be an integer >= 0 (0: the whole batch "
                         f"at once); got {microbatch!r}.")
    return ClippedGrad(loss_fn, float(clip), float(normalize_by), norm, microbatch)


__all__ = ("NORMS", "RELATIONS", "ClippedGrad", "clip_tree", "clipped_grad")
