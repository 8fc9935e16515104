"""Validation of static settings: every rule raises ``ValueError`` before any compute."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np


def require(condition: bool, rule: str, message: str) -> None:
    """Raises ``ValueError("<rule>: <message>")`` unless ``condition`` holds.

    Args:
      condition: a Python bool evaluated at trace time (static values only).
      rule: the public name of the rule that was misconfigured, e.g. ``"bulyan"``.
      message: what was required, the values received and how to fix it, e.g.
        ``"needs n >= 4f + 3; got n=10, f=2. Use fewer Byzantine workers or more workers."``.
    """
    if not condition:
        raise ValueError(f"{rule}: {message}")


def static_int(value, rule: str, name: str, *, minimum: int | None = None) -> int:
    """Returns ``value`` as a Python int, or raises a ``ValueError`` naming ``rule`` and ``name``.

    Counts such as ``f`` must be static: they decide shapes, network sizes and loop bounds.
    """
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{rule}: {name} must be a Python int (a static count); got {value!r} of type "
            f"{type(value).__name__}. Pass it as a keyword, e.g. {name}=2, or mark it static "
            f"with jax.jit(..., static_argnames='{name}')."
        ) from None
    if minimum is not None and as_int < minimum:
        raise ValueError(f"{rule}: {name} must be >= {minimum}; got {name}={as_int}.")
    return as_int


def byzantine_count(f, n: int, rule: str, bound: str, holds) -> int:
    """Checks the Byzantine count ``f`` against a rule's requirement on ``n``.

    Args:
      f: the number of Byzantine workers (Python int, >= 0).
      n: the number of workers (rows) received.
      rule: the rule's public name.
      bound: the requirement as text, e.g. ``"n >= 2f + 3"``.
      holds: ``holds(n, f) -> bool``, the requirement itself.

    Returns:
      ``f`` as a Python int.
    """
    f = static_int(f, rule, "f", minimum=0)
    require(
        holds(n, f),
        rule,
        f"needs {bound}; got n={n}, f={f}. Use more workers or assume fewer Byzantine ones.",
    )
    return f


def as_key(key, rule: str) -> jax.Array:
    """A typed JAX PRNG key from any accepted form, or a ``ValueError`` naming ``rule``.

    Accepted: a Python or NumPy int seed, a traced integer scalar (a seed inside jit), a typed key
    (``jax.random.key``) or raw ``uint32`` key data (``jax.random.PRNGKey``, or state stored by a
    transform).

    Example:
      >>> import jax
      >>> from rbyz._src import checks
      >>> jax.random.key_data(checks.as_key(0, "demo")).tolist() == (
      ...     jax.random.key_data(jax.random.key(0)).tolist())
      True
    """
    require(
        key is not None,
        rule,
        "needs a random key; got key=None. Pass key=0 (an int seed) or key=jax.random.key(0), "
        "and a fresh one each step.",
    )
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    dtype = jnp.result_type(key)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if jnp.ndim(key) == 0 and jnp.issubdtype(dtype, jnp.integer):
        return jax.random.key(key)
    require(
        dtype == jnp.uint32 and jnp.ndim(key) >= 1,
        rule,
        f"key must be an int seed or a jax key; got an array of dtype {dtype} and shape "
        f"{jnp.shape(key)}. Pass key=jax.random.key(0).",
    )
    return jax.random.wrap_key_data(key)
