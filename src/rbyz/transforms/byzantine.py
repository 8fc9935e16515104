"""The Byzantine workers: a transform that replaces ``f`` workers' updates by an attack."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from rbyz import attacks
from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz.transforms import _modes


class ByzantineState(NamedTuple):
    """State of :func:`byzantine`: the step count and raw key data (``None`` when the attack
    and the positions are deterministic)."""

    count: jax.Array
    key: jax.Array | None


def byzantine(
    attack: Callable | str,
    *,
    f: int,
    key=None,
    positions: str | Sequence[int] = "last",
    omniscient: bool | None = None,
    axis_name: str | None = None,
    tiled: bool = False,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """Replaces ``f`` workers' updates by an attack: ``u_B = attack(u_H; f, key)``.

    Every step runs :func:`rbyz.attacks.inject`, the one injection path of rbyz: ``B`` are the
    Byzantine rows (``positions``: by default the last ``f``, fixed across steps, so that a
    Byzantine worker keeps its identity, as worker momentum and stateful attacks need), ``H`` the
    others. An omniscient attack sees the honest rows ``u_H``; otherwise only the Byzantine
    workers' own honest updates ``u_B`` (by default: what the attack declares). What the attack needs is read from its declaration: a
    key if it declares one (fresh each step, split from ``key``), the total worker count ``n`` if
    it declares ``takes_n``. Its hyperparameters are validated here. Needs ``0 <= f < n``.

    Warning: comes before the aggregation in a chain (a ``byzantine`` with no aggregation after
    it leaves a worker axis on the updates); :func:`rbyz.transforms.robust` builds the chain in
    the right order.

    Args:
      attack: a declared attack, a ``functools.partial`` of one, a plain function
        ``attack(honest, *, f, **hparams) -> [f, ...]``, or a registry name in ``rbyz.attacks``.
      f: number of Byzantine workers (static Python int).
      key: int seed or jax key; required when the attack declares a key or positions are
        ``"random"`` (no shared default seed).
      positions: ``"last"`` (default), ``"first"``, ``"random"`` (redrawn every step) or ``f``
        distinct worker indices.
      omniscient: whether the attack sees the honest workers' updates; by default what the
        attack declares it is defined on (``spec.knowledge``; ``"own"`` for the reversed
        gradient and bit flips).
      axis_name: ``None`` for stacked updates, else the named worker axis: the updates are
        gathered, attacked as in stacked mode, and each shard keeps its own row(s).
      tiled: collective mode only: each shard holds a stack of its own workers.
      **hparams: the attack's hyperparameters (e.g. ``z=1.0``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ByzantineState`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = byzantine("reverse", f=1, scale=2.0)  # its own row, reversed (declared "own")
      >>> g = jnp.array([[1.0], [3.0], [5.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0][:, 0]
      Array([  1.,   3., -10.], dtype=float32)

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
      Learning`, NeurIPS 2019.
    """
    declared, bound = _spec.resolve(attack, "attack", "byzantine")
    hparams = declared.check_hparams({**bound, **hparams}, "byzantine")
    hparams.pop("f", None)
    f = checks.static_int(f, "byzantine", "f", minimum=0)
    needs_key = declared.key or (isinstance(positions, str) and positions == "random")
    if needs_key and key is None:
        why = "draws random rows" if declared.key else "redraws its positions (positions='random')"
        raise ValueError(
            f"byzantine: {declared.name} {why} and needs a random key; pass key=<int seed> or "
            "key=jax.random.key(...), a different one per experiment."
        )
    key_data = _modes.key_data(key, "byzantine") if key is not None else None
    shapes = _modes.ParamShapes()

    def init_fn(params):
        shapes.record(params)
        return ByzantineState(jnp.zeros([], jnp.int32), key_data)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        stacked = _modes.gathered(updates, shapes.of(params), axis_name, tiled, "byzantine")
        next_key, step_key = (None, None) if state.key is None else _modes.split(state.key)
        injected = attacks.inject(stacked, declared.fn, f=f, key=step_key, positions=positions,
                                  omniscient=omniscient, **hparams)
        out = _modes.own_rows(injected.updates, axis_name, tiled, "byzantine")
        return out, ByzantineState(optax.safe_increment(state.count), next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
