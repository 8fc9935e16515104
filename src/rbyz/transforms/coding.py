"""The coding defences as optax transforms: DETOX, DRACO's repetition code, Election Coding.

Each transform consumes stacked updates (worker or partition axis first) and returns the
aggregate, so it must come first in a chain; ``MultiSteps`` and ``apply_every`` do not compose
with it. Each hands :func:`rbyz.transforms.aggregate` a declared rule (``rule.spec``) that takes
a key exactly when it draws at random, so the key (kept in the state, split every step) is
required then and refused otherwise.

References:
  Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
  More Robust Gradient Aggregation`, NeurIPS 2019.
  Chen, Wang, Charles, Papailiopoulos, `DRACO: Byzantine-resilient Distributed Training via
  Redundant Gradients`, ICML 2018.
  Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD against
  Byzantine Attacks`, NeurIPS 2020.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import optax

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz.coding import election
from rbyz.coding import groups
from rbyz.transforms.aggregate import aggregate

_declare = functools.partial(_spec.declare, "aggregator", register=False)


def _check_key(where: str, keyed: bool, key, subject: str, fix: str) -> None:
    """A key exactly when the rule draws at random, else ``ValueError`` before any compute."""
    if keyed and key is None:
        raise ValueError(f"{where}: {subject} draws at random and needs key=... (an int seed "
                         f"or a jax key; the transform splits it every step); or {fix}.")
    if not keyed and key is not None:
        raise ValueError(f"{where}: {subject} draws nothing at random; drop key={key!r}.")


def detox_aggregate(*, f: int, r: int, stage2: str | groups.Stage2 = "median_of_means",
                    buckets: int | None = None, fallback: str = "median",
                    shuffle: bool | None = None, key=None, axis_name: str | None = None,
                    tiled: bool = False) -> optax.GradientTransformationExtraArgs:
    """:func:`rbyz.coding.detox` as an optax transform over stacked worker updates.

    It consumes updates with the worker axis first (``[n, ...]``, grouped as
    :func:`rbyz.coding.group_assignment` says). As the DETOX reference does every step, the
    ``"median_of_means"`` and ``"multi_krum"`` presets permute the group winners at random before
    bucketing, with a fresh key each step (split from ``key``, kept in the state): ``key`` is
    then required. ``shuffle=False`` keeps the group order and takes no key
    (:func:`rbyz.coding.detox_needs_key` says which).

    Args:
      f: number of Byzantine workers.
      r: group size.
      stage2: see :func:`rbyz.coding.detox`.
      buckets: see :func:`rbyz.coding.detox`.
      fallback: see :func:`rbyz.coding.group_vote`.
      shuffle: see :func:`rbyz.coding.detox`.
      key: PRNG key or int seed, required exactly when stage 2 shuffles.
      axis_name: ``None`` for stacked updates, or the worker axis to gather over (collective
        mode, see ``rbyz.transforms.aggregate``).
      tiled: collective mode only: each shard holds a stack of its own workers.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (state
      ``rbyz.transforms.AggregateState``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(detox_aggregate(f=1, r=3, key=0), optax.sgd(1.0))
      >>> grads = jnp.repeat(jnp.array([[1.0], [2.0], [3.0]]), 3, axis=0).at[4].set(-50.0)
      >>> params = jnp.zeros(1)
      >>> tx.update(grads, tx.init(params), params)[0]
      Array([-2.], dtype=float32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    f = checks.static_int(f, "detox_aggregate", "f", minimum=0)
    r = checks.static_int(r, "detox_aggregate", "r", minimum=1)
    checks.require(fallback in groups.FALLBACKS, "detox_aggregate",
                   f"unknown fallback {fallback!r}; use one of {groups.FALLBACKS}.")
    keyed = groups.detox_needs_key(stage2, shuffle=shuffle)
    preset = isinstance(stage2, str)
    _check_key("detox_aggregate", keyed, key,
               f"stage 2 (stage2={stage2!r}, shuffle={shuffle})" if preset else "stage 2",
               "pass shuffle=False to keep the group order" if preset
               else "build stage2 with hierarchical(..., shuffle=False)")
    detox = functools.partial(groups.detox, r=r, stage2=stage2, buckets=buckets,
                              fallback=fallback, shuffle=shuffle)
    if keyed:
        def rule(updates, *, f: int, key):
            return detox(updates, f=f, key=key)
    else:
        def rule(updates, *, f: int):
            return detox(updates, f=f)

    rule.__name__ = "detox"
    rule = _declare(key=keyed, reference=groups.DETOX, cost="O(r n d) + stage 2 on n/r rows")(rule)
    return aggregate(rule, axis_name=axis_name, tiled=tiled, key=key, f=f)


def repetition_aggregate(*, f: int, r: int | None = None, fallback: str = "median",
                         axis_name: str | None = None,
                         tiled: bool = False) -> optax.GradientTransformationExtraArgs:
    """:func:`rbyz.coding.repetition_code` (DRACO) as an optax transform; first in a chain.

    Args:
      f: number of Byzantine workers.
      r: group size (default ``2f + 1``).
      fallback: see :func:`rbyz.coding.group_vote`.
      axis_name: ``None`` for stacked updates, or the worker axis to gather over.
      tiled: collective mode only: each shard holds a stack of its own workers.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = repetition_aggregate(f=1)
      >>> tx.update(jnp.array([[1.0], [7.0], [1.0]]), tx.init(None))[0]
      Array([1.], dtype=float32)

    References:
      Chen, Wang, Charles, Papailiopoulos, `DRACO: Byzantine-resilient Distributed Training via
      Redundant Gradients`, ICML 2018.
    """
    f = checks.static_int(f, "repetition_aggregate", "f", minimum=0)
    if r is not None:
        r = checks.static_int(r, "repetition_aggregate", "r", minimum=2 * f + 1)
    checks.require(fallback in groups.FALLBACKS, "repetition_aggregate",
                   f"unknown fallback {fallback!r}; use one of {groups.FALLBACKS}.")
    return aggregate(groups.repetition_code, axis_name=axis_name, tiled=tiled, f=f, r=r,
                     fallback=fallback)


def _attack_needs_key(attack: Callable, key) -> bool:
    """Whether a sign attack draws at random: its declaration says so; an undeclared attack is
    taken at its caller's word (a key given or not)."""
    declared = _spec.spec_of(attack, "attack")
    return declared.key if declared.declared else key is not None


def election_vote_aggregate(G, *, byzantine: Sequence[int] = (),
                            attack: str | Callable | None = "sign_reverse", key=None,
                            noise_std: float = 0.0, axis_name: str | None = None,
                            tiled: bool = False) -> optax.GradientTransformationExtraArgs:
    """:func:`rbyz.coding.election_vote` as an optax transform, in place of a plain majority vote.

    It consumes per-partition gradients (``[k, ...]``, partition axis first) and returns the
    master's vote in ``{-1, 0, 1}``, so it comes first in a ``signsgd_majority``-style chain,
    e.g. ``optax.chain(election_vote_aggregate(G), optax.sgd(lr, momentum=0.9))`` as in the
    paper's runs. A random attack (declared ``key=True``, e.g. ``"sign_random"``) or Gaussian
    noise before the signs (``noise_std > 0``, the rebuttal's noisy-gradient runs) needs a key,
    kept in the state and split every step; otherwise it takes none.

    Args:
      G: allocation matrix ``[n, k]`` (concrete).
      byzantine: static Byzantine worker indices.
      attack: see :func:`rbyz.coding.election_vote`.
      key: PRNG key or int seed, for a random attack or ``noise_std > 0`` only.
      noise_std: std of the Gaussian noise every worker adds to each partition gradient before
        its sign (see :func:`rbyz.coding.local_majorities`); ``0``: none.
      axis_name: ``None`` for stacked partition gradients, or the axis to gather them over.
      tiled: collective mode only: each shard holds a stack of its own partitions' gradients.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz.coding import deterministic_code
      >>> tx = election_vote_aggregate(deterministic_code(5, 1), byzantine=(2,))
      >>> g = jnp.array([[1.0], [2.0], [-1.0], [5.0], [-3.0]])
      >>> tx.update(g, tx.init(None))[0]
      Array([1.], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    G = election.check_code(G, "election_vote_aggregate")
    byzantine = election.check_byzantine(byzantine, G.shape[0], "election_vote_aggregate")
    attack = election.resolve_attack(attack)
    attacked = bool(byzantine) and attack is not None
    noise_std = election.check_noise(noise_std, 0, "election_vote_aggregate")
    keyed = (attacked and _attack_needs_key(attack, key)) or noise_std > 0
    subject = (f"the attack {getattr(attack, '__name__', attack)!r}" if attacked
               else "the vote with no attack")
    if noise_std > 0:
        subject = f"the noise (noise_std={noise_std})"
    _check_key("election_vote_aggregate", keyed, key, subject,
               "choose a deterministic attack and noise_std=0")
    vote = functools.partial(election.election_vote, G=G, byzantine=byzantine, attack=attack,
                             noise_std=noise_std)
    if keyed:
        def rule(partition_grads, *, key):
            return vote(partition_grads, key=key)
    else:
        def rule(partition_grads):
            return vote(partition_grads)

    rule.__name__ = "election_vote"
    rule = _declare(key=keyed, reference=election.ELECTION_CODING, cost="O(n k d)")(rule)
    return aggregate(rule, axis_name=axis_name, tiled=tiled, key=key)


__all__ = ("detox_aggregate", "election_vote_aggregate", "repetition_aggregate")
