"""Sign-domain attacks, for majority-vote training and Election Coding.

The honest rows are sign vectors (values in {-1, 0, 1}); the Byzantine workers send the negation
of their own, one fixed direction, or random signs (the three attacks of Election Coding's code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz.attacks import _common


@_common.declare_attack(knowledge="own", reference=(_common.SOHN,), cost="O(f d)")
def sign_reverse(honest, *, f: int):
    """Sign reverse: Byzantine worker ``i`` sends the negation of its own sign vector.

    Election Coding's default attack: negating every partition sign before the local vote sends
    ``-(honest local majority)``. Knowledge: its *own* sign vector (row ``i % h``).

    Args:
      honest: stacked pytree ``[h, ...]`` of sign vectors (values in {-1, 0, 1}).
      f: number of Byzantine workers (static).

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> sign_reverse(jnp.array([[1.0, -1.0, 0.0]]), f=1)
      Array([[-1.,  1., -0.]], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning`, NeurIPS 2020.
    """
    _, f = _common.prepare(honest, f, "sign_reverse")
    return jax.tree.map(jnp.negative, _common.cycle_rows(honest, f))


@_common.declare_attack(
    knowledge="shapes", reference=(_common.SOHN,), cost="O(f d)",
    note="direction=-1 as Election Coding's CIFAR code; its Amazon code sends +1.")
def sign_directional(honest, *, f: int, direction: int = -1):
    """Directional signs: every Byzantine entry is ``direction`` (-1 in the CIFAR code).

    Election Coding's Amazon code sends all ``+1``. Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]`` of sign vectors.
      f: number of Byzantine workers (static).
      direction: ``-1`` or ``+1``.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> sign_directional(jnp.ones((3, 2)), f=1, direction=1)
      Array([[1., 1.]], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning`, NeurIPS 2020.
    """
    checks.require(direction in (-1, 1), "sign_directional",
                   f"direction must be -1 or +1; got direction={direction!r}.")
    _, f = _common.prepare(honest, f, "sign_directional")
    return _common.full_like(honest, f, float(direction))


@_common.declare_attack(key=True, knowledge="shapes", reference=(_common.SOHN,),
                        cost="O(f d)")
def sign_random(honest, *, f: int, key=None):
    """Random signs: every Byzantine entry is an independent uniform draw from {-1, +1}.

    Knowledge: only the shapes.

    Args:
      honest: stacked pytree ``[h, ...]`` of sign vectors.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key (required: there is no default seed).

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> out = sign_random(jnp.ones((3, 100)), f=2, key=0)
      >>> bool(jnp.all(jnp.abs(out) == 1))
      True

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning`, NeurIPS 2020.
    """
    _, f = _common.prepare(honest, f, "sign_random")

    def draw(k, shape, dtype):
        return jnp.where(jax.random.bernoulli(k, 0.5, shape), 1, -1).astype(dtype)

    return _common.draw_leaves(honest, f, key, "sign_random", draw)
