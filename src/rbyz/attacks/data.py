"""Data attacks: what a Byzantine worker trains on, not what it sends.

These act on a worker's data (labels in, labels out) before its gradient is computed, so they
are not model attacks: they are not in the attack registry and do not go through
:func:`rbyz.attacks.inject`; the experiment harness applies them to the Byzantine workers'
batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import checks


def label_flip(labels: jax.Array, *, num_classes: int = 10) -> jax.Array:
    """Label flipping: a Byzantine worker trains on ``num_classes - 1 - y`` instead of ``y``.

    Args:
      labels: integer class labels in ``[0, num_classes)``, any shape.
      num_classes: the number of classes (static, >= 1).

    Returns:
      The flipped labels, same shape and dtype.

    Example:
      >>> label_flip(jnp.array([0, 3, 9]))
      Array([9, 6, 0], dtype=int32)

    References:
      Karimireddy, He, Jaggi, `Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing`, ICLR 2022.
    """
    num_classes = checks.static_int(num_classes, "label_flip", "num_classes", minimum=1)
    labels = jnp.asarray(labels)
    checks.require(jnp.issubdtype(labels.dtype, jnp.integer), "label_flip",
                   f"needs integer labels; got dtype {labels.dtype}.")
    return (num_classes - 1 - labels).astype(labels.dtype)
