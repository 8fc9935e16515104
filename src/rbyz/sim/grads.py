"""Every worker's loss and gradient in one call: the hot spot of a simulated training step.

:func:`per_worker_grads` evaluates ``loss_fn(params, x[i], y[i])`` and its gradient for each
worker ``i`` at the same parameters, stacked ``[n, ...]`` as the aggregators expect.

Why ``vmap(value_and_grad)``: measured with ``benchmarks/training.py`` (the 784-100-10 MLP,
``n = 25`` workers, ``b = 32`` examples each, 0.26 GFLOP per step; 2 AMD EPYC cores, jax 0.10.2,
where a 2048x2048 float32 matmul runs at 300-440 GFLOP/s), in the same runs:

=================================================  ===========  ==============================
formulation                                        ms (median)  vs vmap
=================================================  ===========  ==============================
one gradient of the mean loss over all n*b                 1.3  0.85-0.95 (a floor: the same
examples (not per worker)                                       FLOPs as one unbatched matmul)
``vmap(value_and_grad)``, params unbatched                 1.4  1
``vmap`` over params broadcast to ``[n, ...]``             2.0  1.4
grad of ``sum_i L_i(P_i)``, ``P`` broadcast params         2.1  1.4
``lax.map`` (one worker at a time)                         3.3  1.8-2.4
``lax.map(batch_size=5)``                                  2.6  1.4-1.8
batched weight-gradient dots rewritten with the            1.4  1 (XLA folds the transposes
contraction dim last (jaxpr rewrite)                            back into the dot)
=================================================  ===========  ==============================

With the parameters unbatched, ``vmap`` turns every layer's forward pass into one matmul over
the ``n*b`` examples and leaves per worker only the weight gradients, a batched matmul
``[n, in, b] x [n, b, out]`` contracting over the small per-worker batch; it runs within 10-15%
of the single mean gradient, which no per-worker formulation can beat (same FLOPs, and the
unbatched matmul is the faster kernel). Broadcasting the parameters makes the forward pass a
batched matmul too; ``lax.map`` gives up the merged forward pass and pays a loop step per
worker. On the CNN (convolutions) ``lax.map`` is 5-6x slower than ``vmap``, which is there
within 0.9-1.2x of the mean gradient. On GPU ``vmap`` is the standard choice as well, so
``method="auto"`` is ``"vmap"`` on every backend; ``method`` stays a parameter so that a
backend-specific formulation can be added where one is measured faster.

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
