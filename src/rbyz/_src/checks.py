"""Validation of static settings: every rule raises ``ValueError`` before any compute."""

from __future__ import annotations

import operator


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
