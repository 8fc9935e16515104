"""The one injection path: where the Byzantine workers sit, and what their rows become.

:func:`attack_rows` runs one model attack from its declaration (the hyperparameters checked, the
key passed iff the attack is random, ``n`` iff it takes the worker count, the output checked
against the known rows), :func:`byzantine_positions` says which workers are Byzantine, and
:func:`inject` puts the two together on a full ``[n, ...]`` stack. ``rbyz.transforms.byzantine``,
the coding defences and the experiment harness all go through these.

Defaults: the Byzantine workers are the **last** ``f`` (``positions="last"``) and keep their
identity across steps, as in the papers' code and ByzFL, which worker momentum and stateful
attacks need; ``n`` is the number of rows of the stack; the attack is omniscient (it sees every
honest row).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.attacks import _common

POSITIONS = ("last", "first", "random")


class Injected(NamedTuple):
    """What :func:`inject` returns: the ``[n, ...]`` updates and the ``[n]`` Byzantine mask."""

    updates: Any
    byzantine: jax.Array


def _minority(n, f, where: str) -> tuple[int, int]:
    n = checks.static_int(n, where, "n", minimum=1)
    return n, checks.byzantine_count(f, n, where, "f < n", lambda n, f: f < n)


def attack_rows(attack: Callable | str, known, *, f: int, n: int, key=None,
                hparams: Mapping[str, Any] | None = None, where: str = "inject"):
    """The ``[f, ...]`` rows a model attack sends, given the rows it knows.

    ``attack`` is a registered name, a declared function, a ``functools.partial`` of one
    (keywords bound by the partial count as hyperparameters), or an undeclared plain function
    ``fn(known, *, f, **hparams)``, which counts as keyless. The hyperparameters are checked
    against the declaration (``ValueError`` naming the unknown or missing keyword and the
    accepted ones), the attack's constraint on ``(n, f)`` is checked, ``key=`` is passed iff the
    attack is declared random and ``n=`` iff it takes the worker count. With ``f = 0`` the attack
    is not called (the hyperparameters are still checked, the key is not needed).

    Args:
      attack: see above.
      known: stacked pytree ``[h, ...]`` of the honest rows the attacker knows.
      f: number of Byzantine workers (static, ``0 <= f < n``).
      n: total number of workers (static).
      key: a JAX key or int seed; required iff the attack is random.
      hparams: the attack's hyperparameters (not ``f``, ``n`` or ``key``).
      where: the caller's name, for error messages.

    Returns:
      Stacked pytree ``[f, ...]`` with the structure of ``known`` and its dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> attack_rows("alie", jnp.array([[0.0], [2.0]]), f=1, n=3, hparams={"z": 1.0})
      Array([[0.]], dtype=float32)
      >>> attack_rows("alie", jnp.zeros((2, 1)), f=1, n=3, hparams={"zz": 1.0})
      Traceback (most recent call last):
      ...
      ValueError: inject: alie has no hyperparameter 'zz'; it accepts f, z, variant, ddof, sign.
    """
    declared, bound = _spec.resolve(attack, "attack", where)
    tree_util.num_workers(known, where)
    n, f = _minority(n, f, where)
    merged = {**bound, **dict(hparams or {})}
    given_f = merged.pop("f", f)
    checks.require(given_f == f, where,
                   f"{declared.name} was given f={given_f!r}, but {f} workers are Byzantine; "
                   "drop the f=... hyperparameter (f comes from the injection).")
    kwargs = declared.check_hparams(merged, where)
    declared.check(n, f, where)
    if f == 0:
        return _common.empty(known)
    if declared.key:
        checks.require(key is not None, where,
                       f"{declared.name} is a random attack and needs a key; got key=None. "
                       "Pass key=... (an int seed or jax.random.key(0), a fresh one each step).")
        kwargs["key"] = key
    if declared.takes_n:
        kwargs["n"] = n
    rows = declared.fn(known, f=f, **kwargs)
    structure, expected = jax.tree.structure(known), jax.tree.structure(rows)
    checks.require(expected == structure, where,
                   f"{declared.name} must return rows with the structure of the known rows; "
                   f"got {expected}, expected {structure}.")
    got = [jnp.shape(r) for r in jax.tree.leaves(rows)]
    want = [(f,) + x.shape[1:] for x in jax.tree.leaves(known)]
    checks.require(got == want, where,
                   f"{declared.name} must return [f, ...] rows shaped like the known rows; got "
                   f"shapes {got}, expected {want}.")
    return jax.tree.map(lambda r, x: jnp.asarray(r).astype(x.dtype), rows, known)


def byzantine_positions(n: int, f: int, positions: str | Sequence[int] | jax.Array = "last",
                        key=None, where: str = "inject"):
    """The indices of the ``f`` Byzantine workers among ``n``.

    - ``"last"`` (default): ``n - f, ..., n - 1``. The Byzantine workers keep their identity
      across steps, as in the papers' code and ByzFL; worker momentum and stateful attacks need
      it.
    - ``"first"``: ``0, ..., f - 1``.
    - ``"random"``: ``f`` distinct workers drawn from ``key`` (sorted); a new key redraws them.
    - ``f`` explicit distinct indices in ``[0, n)``: static, in the order given (row ``i`` of the
      attack's output goes to ``positions[i]``).

    Args:
      n: number of workers (static).
      f: number of Byzantine workers (static, ``0 <= f < n``).
      positions: see above.
      key: a JAX key or int seed, needed for ``"random"`` only.
      where: the caller's name, for error messages.

    Returns:
      ``[f]`` int32 indices: a NumPy array for the static modes (usable as static indices), a
      ``jax.Array`` for ``"random"``.

    Example:
      >>> byzantine_positions(5, 2)
      array([3, 4], dtype=int32)
      >>> byzantine_positions(5, 2, (4, 0))
      array([4, 0], dtype=int32)
    """
    n, f = _minority(n, f, where)
    if isinstance(positions, str):
        checks.require(positions in POSITIONS, where,
                       f"positions must be 'last', 'first', 'random' or {f} distinct worker "
                       f"indices; got {positions!r}.")
        if positions == "last":
            return np.arange(n - f, n, dtype=np.int32)
        if positions == "first":
            return np.arange(f, dtype=np.int32)
        checks.require(key is not None, where,
                       "positions='random' needs a key; got key=None. Pass key=... (a new one "
                       "each step redraws the positions) or positions='last'.")
        drawn = jax.random.permutation(checks.as_key(key, where), n)[:f]
        return jnp.sort(drawn).astype(jnp.int32)
    if isinstance(positions, jax.core.Tracer):
        checks.require(positions.shape == (f,) and jnp.issubdtype(positions.dtype, jnp.integer),
                       where, f"explicit positions must be {f} integer indices (one per "
                       f"Byzantine worker); got shape {positions.shape}, dtype {positions.dtype}.")
        return positions.astype(jnp.int32)
    index = np.asarray(positions)
    checks.require(index.shape == (f,) and (f == 0 or np.issubdtype(index.dtype, np.integer)),
                   where, f"explicit positions must be {f} integer indices (one per Byzantine "
                   f"worker); got shape {index.shape}, dtype {index.dtype}.")
    index = index.astype(np.int32)
    checks.require(len(set(index.tolist())) == f and index.min(initial=0) >= 0
                   and index.max(initial=0) < n, where,
                   f"explicit positions must be distinct indices in [0, {n}); got "
                   f"{index.tolist()}.")
    return index


def inject(honest, attack: Callable | str, *, f: int, key=None,
           positions: str | Sequence[int] | jax.Array = "last", omniscient: bool | None = None,
           **hparams) -> Injected:
    """Replaces ``f`` of the ``n`` honest rows with the rows an attack produces.

    ``n`` is the number of rows of ``honest``; the Byzantine workers are
    :func:`byzantine_positions` (default the last ``f``); the attack runs through
    :func:`attack_rows`. It sees the ``n - f`` honest workers' rows when ``omniscient`` and only
    the Byzantine workers' own honest rows otherwise; by default (``None``) what the attack
    declares it is defined on (``spec.knowledge``: the reversed gradient and bit flips act on
    the worker's own gradient, ALIE, IPM and min-max on the honest ones). ``key`` is split into
    one key for the positions and one for the attack; it is needed only for
    ``positions="random"`` and random attacks. Everything has fixed shapes, so a jitted step
    compiles once. Needs ``0 <= f < n``.

    Args:
      honest: stacked pytree ``[n, ...]``: what every worker would send if honest.
      attack: an attack function (declared or not), a partial of one, or its registered name.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key.
      positions: ``"last"`` (default), ``"first"``, ``"random"`` or ``f`` indices.
      omniscient: whether the attack knows the honest workers' rows; ``None`` follows the
        attack's declared ``knowledge``.
      **hparams: the attack's hyperparameters (checked against its declaration).

    Returns:
      :class:`Injected` ``(updates, byzantine)``: the ``[n, ...]`` stack and the ``[n]`` mask.

    Example:
      >>> g = jnp.arange(8.0).reshape(4, 2)
      >>> out = inject(g, "constant", f=1, value=-1.0)
      >>> out.updates[3], out.byzantine
      (Array([-1., -1.], dtype=float32), Array([False, False, False,  True], dtype=bool))
      >>> g = jnp.arange(20.0).reshape(10, 2)
      >>> inject(g, "alie", f=2, key=0).updates[8:]  # n = 10 from the stack: z = 0.253 (v1)
      Array([[5.839018, 6.839018],
             [5.839018, 6.839018]], dtype=float32)
    """
    n = tree_util.num_workers(honest, "inject")
    n, f = _minority(n, f, "inject")
    position_key = attack_key = None
    if key is not None:
        position_key, attack_key = jax.random.split(checks.as_key(key, "inject"))
    index = byzantine_positions(n, f, positions, position_key, "inject")
    mask = jnp.zeros((n,), bool).at[index].set(True)
    if f == 0:
        attack_rows(attack, honest, f=0, n=n, hparams=hparams, where="inject")
        return Injected(honest, mask)
    if isinstance(index, np.ndarray):
        honest_index = np.setdiff1d(np.arange(n), index)
    else:  # a stable argsort of the mask lists the honest workers in index order
        honest_index = jnp.argsort(mask, stable=True)[: n - f]
    if omniscient is None:
        omniscient = _spec.resolve(attack, "attack", "inject")[0].knowledge != "own"
    known = tree_util.take_rows(honest, honest_index if omniscient else index)
    rows = attack_rows(attack, known, f=f, n=n, key=attack_key, hparams=hparams, where="inject")
    updates = jax.tree.map(lambda x, r: x.at[index].set(r), honest, rows)
    return Injected(updates, mask)
