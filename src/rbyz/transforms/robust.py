"""``robust(...)``: the whole defended optimizer, its transforms in the only right order."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from rbyz import preaggregators
from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz.transforms.aggregate import aggregate
from rbyz.transforms.byzantine import byzantine
from rbyz.transforms.per_worker import per_worker

ATTACK_TARGETS = ("momentum", "gradients")


class Stages(NamedTuple):
    """The parts of a :func:`robust` chain, for code that runs them one by one to look inside
    a step (:mod:`rbyz.sim.diagnostics`: which rows the attack replaced, each row's weight in
    the aggregate).

    Attributes:
      transforms: the chain's transforms in order; ``optax.chain(*transforms)`` is
        :func:`robust`'s result, and its state is the tuple of their states.
      attack: the index of the :func:`rbyz.transforms.byzantine` transform (``None``: no attack).
      aggregate: the index of the :func:`rbyz.transforms.aggregate` transform.
    """

    transforms: tuple
    attack: int | None
    aggregate: int


def _rule_with_f(rule, f: int | None, hparams: dict):
    """The rule with ``f`` (when it declares one and it is not bound) and ``hparams`` bound."""
    declared, bound = _spec.resolve(rule, "aggregator", "robust")
    takes_f = declared.hparams is None or "f" in declared.hparams
    extra = dict(hparams)
    if f is not None and takes_f and "f" not in bound and "f" not in extra:
        extra["f"] = f
    fn = declared.fn if declared.declared else rule
    return functools.partial(fn, **bound, **extra) if (bound or extra) else fn


def _check_before_compute(rule, attack_kwargs, n: int, f: int | None) -> None:
    """With ``n`` known, checks the rule's declared constraint, then traces the rule (and the
    attack) on a one-coordinate stack, so that every trace-time check (ALIE's z, MDA's subset
    count, Multi-Krum's m) fails at build."""
    declared, bound = _spec.resolve(rule, "aggregator", "robust")
    declared.check(n, bound.get("f", f or 0))
    probe = jax.ShapeDtypeStruct((n, 1), jnp.float32)
    kwargs = {"key": jax.random.key(0)} if declared.key else {}
    jax.eval_shape(lambda x: rule(x, **kwargs), probe)
    if attack_kwargs is not None:
        tx = byzantine(**attack_kwargs)
        jax.eval_shape(lambda x: tx.update(x, tx.init(jnp.zeros((1,))))[0], probe)


def robust(
    rule: Callable | str,
    *,
    optimizer: optax.GradientTransformation,
    f: int | None = None,
    pre: Sequence[Callable | str] = (),
    attack: Callable | str | None = None,
    attack_on: str = "momentum",
    momentum: float = 0.0,
    worker_noise: optax.GradientTransformation | None = None,
    n: int | None = None,
    key=None,
    positions: str | Sequence[int] = "last",
    omniscient: bool | None = None,
    axis_name: str | None = None,
    tiled: bool = False,
    layout: str = "gather",
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """A Byzantine-robust optimizer, built so that its transforms cannot be out of order.

    Per step, with ``g_i`` the workers' gradients (stacked ``[n, ...]``, or per shard):

    0. ``worker_noise``, when given: what every worker adds to its gradient before anything
       else, so that the momentum and everything after it are post-processing of a noised
       release (the privacy noise of :mod:`rbyz.privacy`, e.g.
       :func:`rbyz.privacy.worker_noise`);
    1. worker momentum ``m_i <- beta m_i + g_i`` (``momentum = beta``; no dampening, as
       Karimireddy et al. 2021), when ``beta > 0``;
    2. the attack replaces the Byzantine rows (``attack_on="momentum"``: of the momenta, what
       the workers send, the default, as in Karimireddy et al. and the epfml code; or
       ``"gradients"``: of the gradients, before the momentum, as in attacks that model faulty
       gradient computations);
    3. the pre-aggregators ``pre`` and the aggregation ``rule`` (one
       :func:`rbyz.preaggregators.compose`);
    4. the server ``optimizer`` (model-shaped, e.g. ``optax.sgd(0.1)``).

    Built the usual way, ``optax.chain`` accepts any order: ``optax.chain(optax.adam(...),
    aggregate(...))`` runs Adam on ``[n, ...]`` moments and ``optax.chain(byzantine(...),
    optax.sgd(...))`` gives the params a worker axis, without an error. Here the order is fixed.
    Everything is validated here: the rule's, the stages' and the attack's hyperparameters, keys
    (required when anything is random: one ``key`` is split between the attack and the rule),
    and, when ``n`` is given, the constraints on ``n`` and ``f`` (by tracing rule and attack on
    a one-coordinate stack: ALIE's ``z <= 0``, Krum's ``n >= 2f + 3`` after bucketing, ...).

    Args:
      rule: an aggregator, a partial of one, or a registry name.
      optimizer: the server's optax optimizer.
      f: the number of Byzantine workers; given to the attack and to the rule and stages that
        declare an ``f`` and have none bound.
      pre: pre-aggregators run before the rule (partials or names), in order.
      attack: an attack (name, declared function or partial), or ``None`` for no attack.
      attack_on: ``"momentum"`` (default) or ``"gradients"``.
      momentum: worker momentum ``beta`` in ``[0, 1)``.
      worker_noise: a stacked transform applied to the workers' gradients first (after the
        attack on the gradients, which replaces what a worker computes), e.g.
        :func:`rbyz.transforms.add_worker_noise`.
      n: number of workers (stacked mode; per shard with ``tiled``): needed for momentum, and
        lets every constraint be checked here.
      key: int seed or jax key; required when the attack, its positions, a stage or the rule is
        random.
      positions: the Byzantine rows (see :func:`rbyz.transforms.byzantine`).
      omniscient: whether the attack sees the honest rows (default: the attack's declared
        knowledge).
      axis_name, tiled, layout: collective mode, as in :func:`rbyz.transforms.aggregate`.
      **hparams: the rule's hyperparameters.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = robust("trimmed_mean", f=1, attack="sign_flip", optimizer=optax.sgd(1.0))
      >>> g = jnp.array([[1.0], [2.0], [3.0], [4.0]])
      >>> tx.update(g, tx.init(jnp.zeros(1)))[0]  # rows 1, 2, 3 and -2: trimmed to 1 and 2
      Array([-1.5], dtype=float32)
      >>> robust("krum", f=2, n=6, optimizer=optax.sgd(1.0))
      Traceback (most recent call last):
      ...
      ValueError: krum: needs n >= 2f + 3; got n=6, f=2. Use more workers or assume fewer Byzantine ones.

    References:
      Karimireddy, He, Jaggi, `Learning from History for Byzantine Robust Optimization`,
      ICML 2021 (worker momentum against attacks on the momenta).
    """
    stages = robust_stages(rule, optimizer=optimizer, f=f, pre=pre, attack=attack,
                           attack_on=attack_on, momentum=momentum, worker_noise=worker_noise,
                           n=n, key=key,
                           positions=positions, omniscient=omniscient, axis_name=axis_name,
                           tiled=tiled, layout=layout, **hparams)
    return optax.chain(*stages.transforms)


def robust_stages(
    rule: Callable | str,
    *,
    optimizer: optax.GradientTransformation,
    f: int | None = None,
    pre: Sequence[Callable | str] = (),
    attack: Callable | str | None = None,
    attack_on: str = "momentum",
    momentum: float = 0.0,
    worker_noise: optax.GradientTransformation | None = None,
    n: int | None = None,
    key=None,
    positions: str | Sequence[int] = "last",
    omniscient: bool | None = None,
    axis_name: str | None = None,
    tiled: bool = False,
    layout: str = "gather",
    report: bool = False,
    num_workers: int | None = None,
    **hparams,
) -> Stages:
    """The transforms of :func:`robust` in their order, with where the attack and the
    aggregation sit (:class:`Stages`). Same arguments and checks as :func:`robust`, and
    ``report`` / ``num_workers`` for :func:`aggregate` (keep the rule's selection in its state).

    Example:
      >>> import optax
      >>> stages = robust_stages("median", f=1, attack="sign_flip", momentum=0.9, n=5,
      ...                        optimizer=optax.sgd(0.1))
      >>> len(stages.transforms), stages.attack, stages.aggregate
      (4, 1, 2)
    """
    checks.require(attack_on in ATTACK_TARGETS, "robust",
                   f"attack_on must be 'momentum' or 'gradients'; got {attack_on!r}.")
    checks.require(isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0, "robust",
                   f"momentum must be in [0, 1); got {momentum!r}.")
    checks.require(attack is None or f is not None, "robust",
                   "an attack needs f=<number of Byzantine workers>.")
    if momentum > 0 and (axis_name is None or tiled):
        checks.require(n is not None, "robust",
                       "worker momentum keeps one state per worker: pass n=<number of workers>.")
    final = _rule_with_f(rule, f, hparams)
    stages = [_rule_with_f(stage, f, {}) for stage in pre]
    combined = preaggregators.compose(*stages, final) if stages else final
    combined_spec, _ = _spec.resolve(combined, "aggregator", "robust")

    keys = iter(())
    if key is not None:
        keys = iter(jax.random.split(checks.as_key(key, "robust"), 2))
    attack_key = next(keys, None) if attack is not None else None
    rule_key = next(keys, None) if combined_spec.key else None
    checks.require(not (combined_spec.key and rule_key is None), "robust",
                   f"{combined_spec.name} needs a random key; pass key=<int seed>.")

    attack_kwargs = None
    if attack is not None:
        attack_kwargs = dict(attack=attack, f=f, key=attack_key, positions=positions,
                             omniscient=omniscient)
    if n is not None and axis_name is None:
        _check_before_compute(combined, attack_kwargs, n, f)

    parts = []
    momentum_tx = (per_worker(optax.trace(momentum), n=n, axis_name=axis_name, tiled=tiled)
                   if momentum > 0 else None)
    attack_tx = None
    if attack_kwargs is not None:
        attack_tx = byzantine(**attack_kwargs, axis_name=axis_name, tiled=tiled)
    order = ((worker_noise, momentum_tx, attack_tx) if attack_on == "momentum" else
             (attack_tx, worker_noise, momentum_tx))
    parts += [tx for tx in order if tx is not None]
    attack_at = parts.index(attack_tx) if attack_tx is not None else None
    parts.append(aggregate(combined, axis_name=axis_name, tiled=tiled, layout=layout,
                           key=rule_key, report=report, num_workers=num_workers))
    parts.append(optimizer)
    return Stages(tuple(parts), attack_at, len(parts) - 2)
