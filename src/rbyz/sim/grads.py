"""Every worker's loss and gradient in one call: the hot spot of a simulated training step.

:func:`per_worker_grads` evaluates ``loss_fn(params, x[i], y[i])`` and its gradient for each
worker ``i`` at the same parameters, stacked ``[n, ...]`` as the aggregators expect.

Why ``vmap(value_and_grad)``: measured with ``python benchmarks/training.py`` (the 784-100-10
MLP, ``n = 25`` workers, ``b = 32`` examples each, 0.256 GFLOP per call by XLA's cost analysis;
2 shared AMD EPYC cores, jax 0.10.2, a 2048x2048 float32 matmul at 360-380 GFLOP/s, so a FLOP
floor of 0.7 ms), every formulation timed in the same rounds; three runs:

=====================================================  ============  =======================
formulation                                            ms            time / vmap
=====================================================  ============  =======================
``vmap(value_and_grad)``, params unbatched (this)      1.7-1.9       1
one gradient of the mean loss over all n*b examples    1.4-2.1       0.8-1.2 (not per worker)
``vmap`` over params broadcast to ``[n, ...]``         2.1-3.0       1.3-1.6
grad of ``sum_i L_i(P_i)``, ``P`` broadcast params     1.8-2.6       1.1-1.4
``lax.map`` (one worker per loop step)                 2.9-3.8       1.7-2.0
``lax.map(batch_size=5)``                              2.0-3.3       1.2-1.8
batched dots rewritten contraction-last (jaxpr pass)   1.5-2.1       0.9-1.15 (same program)
=====================================================  ============  =======================

With the parameters unbatched, ``vmap`` turns every layer's forward pass into one matmul over
the ``n*b`` examples and leaves per worker only the weight gradients, a batched matmul
``[n, b, in] x [n, b, out] -> [n, in, out]`` contracting over the small per-worker batch (alone:
0.6-0.9 ms, 140-220 GFLOP/s). The whole call runs as fast as the single gradient of the mean
loss over the same examples, which no per-worker formulation can beat (same FLOPs, and one
unbatched matmul is the faster kernel); 2.6x the FLOP floor, because matmuls of these shapes do
not reach the large-matmul rate. Broadcasting the parameters makes the forward pass a batched
matmul too; ``lax.map`` gives up the merged forward pass and pays a loop step per worker.
Rewriting the batched dots with explicit transposes (contraction dim last, which XLA's CPU
backend would send to its YNNPACK kernel) changes nothing: XLA folds the transposes back and
compiles the same program (the gradients are bitwise equal). On the CNN (convolutions, 8x8 and
28x28 inputs) ``lax.map`` is 5-6x slower than ``vmap``, which is within 0.9-1.2x of the mean
gradient there too. On GPU ``vmap`` is the standard formulation as well, so ``method="auto"``
is ``"vmap"`` on every backend; ``method`` stays a parameter so that a backend-specific
formulation can be added where one is measured faster.

Example:
  >>> import jax.numpy as jnp
  >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
  >>> x = jnp.arange(12.0).reshape(3, 2, 2)      # 3 workers, 2 examples of 2 features
  >>> losses, grads = per_worker_grads(loss, jnp.zeros(2), x, jnp.ones((3, 2)))
  >>> losses.shape, grads.shape
  ((3,), (3, 2))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

METHODS = ("auto", "vmap")

# What "auto" resolves to per backend (see the module docstring for the measurements).
AUTO = {"cpu": "vmap", "gpu": "vmap", "cuda": "vmap", "rocm": "vmap", "tpu": "vmap"}


def resolve_method(method: str = "auto", backend: str | None = None) -> str:
    """The formulation ``method`` stands for on ``backend`` (default: ``jax.default_backend()``).

    Example:
      >>> resolve_method("auto", "cpu")
      'vmap'
    """
    if method not in METHODS:
        raise ValueError(f"per_worker_grads: method must be one of {', '.join(METHODS)}; got "
                         f"{method!r}.")
    if method != "auto":
        return method
    return AUTO.get(backend or jax.default_backend(), "vmap")


def _num_workers(tree, name: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"per_worker_grads: {name} is empty; expected arrays [n, b, ...].")
    sizes = {jax.numpy.shape(leaf)[0] if jax.numpy.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(jax.numpy.shape(leaf)) for leaf in leaves]
        raise ValueError(f"per_worker_grads: every leaf of {name} needs the same leading worker "
                         f"axis [n, b, ...]; got shapes {shapes}.")
    return sizes.pop()


def per_worker_grads(loss_fn: Callable[[Any, Any, Any], jax.Array], params, x, y, *,
                     method: str = "auto") -> tuple[jax.Array, Any]:
    """Each worker's loss and gradient at the same ``params``, stacked over workers.

    ``losses[i] = loss_fn(params, x[i], y[i])`` and ``grads[i] = d losses[i] / d params``,
    computed as ``jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))`` (the fastest
    formulation measured on CPU; see the module docstring). Any ``loss_fn`` and parameter pytree
    work, e.g. a user's own flax model wrapped with :func:`rbyz.sim.models.from_flax`.

    Args:
      loss_fn: ``(params, xb, yb) -> scalar`` on one worker's batch ``xb [b, ...]``.
      params: the model's parameters (any pytree), shared by all workers.
      x: the workers' inputs, ``[n, b, ...]`` (or a pytree of such arrays).
      y: the workers' targets, ``[n, b]`` (or a pytree with the same leading ``n``).
      method: ``"auto"`` (the fastest measured on ``jax.default_backend()``) or ``"vmap"``.

    Returns:
      ``(losses [n], grads)``, ``grads`` shaped like ``params`` with a leading worker axis.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda w, x, y: jnp.mean(x @ w * y)
      >>> x, y = jnp.ones((2, 3, 2)), jnp.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
      >>> losses, grads = per_worker_grads(loss, jnp.array([1.0, 1.0]), x, y)
      >>> losses, grads
      (Array([2., 4.], dtype=float32), Array([[1., 1.],
             [2., 2.]], dtype=float32))
    """
    method = resolve_method(method)
    n = _num_workers(x, "x")
    if _num_workers(y, "y") != n:
        raise ValueError(f"per_worker_grads: x and y must have the same number of workers; got "
                         f"{n} and {_num_workers(y, 'y')}.")
    return jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))(params, x, y)
