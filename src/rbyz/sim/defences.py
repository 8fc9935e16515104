"""The server side of an experiment as an optax chain, built from the declarations.

:func:`defence` checks every setting of the experiment before any compute, then builds
:func:`rbyz.transforms.robust` for every aggregator of the registry (with pre-aggregators, worker
momentum and the attack in the only right order) or, for the algorithms that change what the
workers compute or send (:data:`ALGORITHMS`), the same worker side followed by their own server
rule: signSGD with majority vote, noisy sign / median SGD (Chen et al. 2020), DETOX and DRACO
(grouped sampling: the ``r`` members of a group draw the same batch) and Election Coding (one
gradient per data partition; a worker's message is the majority of the signs of the partitions
its row of ``G`` names).

Given a :class:`rbyz.sim.parallel.Placement` over several devices, the same chain is built in
collective mode (each device holding its own workers, ``tiled``), after the single-device chain
has been built and checked, from the same keys: the two give the same numbers.

Example:
  >>> from rbyz.sim import config
  >>> d = defence(config.from_dict({"workers": {"n": 10, "f": 2}, "attack": {"name": "alie"},
  ...                               "defence": {"rule": "krum"}}))
  >>> d.sampling, d.units, d.stages.attack, d.stages.aggregate
  ('workers', 10, 0, 1)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rbyz import aggregators, attacks, coding, preaggregators, transforms
from rbyz._src.spec import REQUIRED
from rbyz import privacy
from rbyz.sim import private
from rbyz.sim.config import Experiment
from rbyz.sim.parallel import STACKED, Placement

# Server rules that are whole algorithms rather than aggregators, with their hyperparameters.
ALGORITHMS = {
    "signsgd_majority": {},
    "noisy_sign_sgd": {"b": 1e-3},
    "noisy_median_sgd": {"b": 1e-3},
    "detox": {"r": 3, "stage2": "median_of_means", "buckets": None, "fallback": "median"},
    "draco": {"r": None, "fallback": "median"},
    "election_coding": {"code": "bernoulli", "r": 3.0, "b": None, "noise_std": 0.0},
}
DATA_ATTACKS = ("label_flip",)
ATTACK_TARGETS = ("momentum", "gradients")
POSITIONS = ("last", "first", "random")
OPTIMIZERS = ("sgd", "adam")


def _fail(field: str, message: str):
    raise ValueError(f"config: {field}: {message}")


class Defence(NamedTuple):
    """What the server runs and what it needs from the workers' side.

    Attributes:
      tx: the optax chain (stacked gradients in, the params' update out).
      sampling: ``"workers"`` (each worker its own batch), ``"grouped"`` (the ``r`` members of
        a group draw the same batch) or ``"partitions"`` (one batch per data partition).
      units: rows of gradients computed per step (``n``, or the number of partitions).
      group_size: ``r`` for grouped sampling, else 1.
      flip_labels: the Byzantine workers train on flipped labels (the data attack).
      stages: the parts of ``tx`` when it is a :func:`rbyz.transforms.robust` chain (an
        aggregator), for the diagnostics to look inside a step; else ``None``.
    """

    tx: optax.GradientTransformation
    sampling: str
    units: int
    group_size: int
    flip_labels: bool
    stages: transforms.Stages | None = None


def server_optimizer(exp: Experiment) -> optax.GradientTransformation:
    """The server's optimizer: SGD (heavy ball with ``server_momentum``) or Adam at ``lr``."""
    train = exp.train
    if train.optimizer not in OPTIMIZERS:
        _fail("train.optimizer", f"unknown optimizer {train.optimizer!r}; use one of "
                                 f"{', '.join(OPTIMIZERS)}.")
    if not train.lr > 0:
        _fail("train.lr", f"the learning rate must be > 0; got {train.lr}.")
    if train.optimizer == "adam":
        return optax.adam(train.lr)
    if not 0.0 <= train.server_momentum < 1.0:
        _fail("train.server_momentum", f"must be in [0, 1); got {train.server_momentum}.")
    return optax.sgd(train.lr, momentum=train.server_momentum or None)


def streams(exp: Experiment) -> dict:
    """Independent streams from the one seed: model init, data split, defence, sampling."""
    base = jax.random.key(exp.seed)
    return dict(zip(("model", "data", "defence", "sample"), jax.random.split(base, 4)))


def int_seed(key) -> int:
    """A Python int seed drawn from ``key``."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def _check_hparams(spec, hparams: dict, field: str) -> None:
    """Unknown hyperparameters, and required ones missing (``f`` and ``n`` come from the
    ``workers`` section), against the rule's declaration."""
    spec.check_hparams(hparams, f"config: {field}", complete=False)
    missing = [k for k, v in (spec.hparams or {}).items()
               if v is REQUIRED and k not in hparams and k not in ("f", "n")]
    if missing:
        _fail(field, f"{spec.name} needs {', '.join(f'{m}=...' for m in missing)}; e.g. "
                     f"{field} = {{{missing[0]} = ...}}.")


def _attack_fn(exp: Experiment):
    """The model attack as a partial of the registry's function (``None`` for none or a data
    attack), its hyperparameters checked against the declaration."""
    name = exp.attack.name
    if name == "none" or name in DATA_ATTACKS:
        if exp.attack.hparams:
            _fail("attack.hparams", f"{name!r} takes no hyperparameters; got "
                                    f"{exp.attack.hparams}.")
        return None
    if name not in attacks.names():
        _fail("attack.name", f"unknown attack {name!r}; use 'none', "
                             f"{', '.join(DATA_ATTACKS)} or one of {', '.join(attacks.names())}.")
    hparams = dict(exp.attack.hparams)
    spec = attacks.spec(name)
    if "aggregator" in (spec.hparams or {}):
        hparams["aggregator"] = _target(exp, hparams.get("aggregator"))
    _check_hparams(spec, hparams, "attack.hparams")
    return functools.partial(attacks.get(name), **hparams)


def _with_f(rule, f: int, hparams: dict):
    """A registry rule with ``f`` (when it declares one) and ``hparams`` bound."""
    declared = rule.spec
    bound = {"f": f} if "f" in (declared.hparams or {}) else {}
    return functools.partial(rule, **bound, **hparams)


def _target(exp: Experiment, name):
    """The aggregation an adaptive attack searches against: the one named in
    ``attack.hparams.aggregator``, else the defence's own (pre-aggregators included), as an
    omniscient attacker would."""
    f, rule = exp.workers.f, exp.defence.rule
    if name is None:
        if rule not in aggregators.names():
            _fail("attack.hparams.aggregator", f"{exp.attack.name} searches against an "
                                               f"aggregator; {rule} is not one, so name it, "
                                               f"e.g. aggregator = \"median\".")
        stages = [_with_f(preaggregators.get(p), f, exp.defence.pre_hparams.get(p, {}))
                  for p in exp.defence.pre]
        final = _with_f(aggregators.get(rule), f, exp.defence.hparams)
        return preaggregators.compose(*stages, final) if stages else final
    if not isinstance(name, str) or name not in aggregators.names():
        _fail("attack.hparams.aggregator", f"must name an aggregator "
                                           f"({', '.join(aggregators.names())}); got {name!r}.")
    return _with_f(aggregators.get(name), f, {})


def _rows_aggregated(exp: Experiment) -> int:
    """The rows the rule aggregates: ``workers.n``, or what the pre-aggregators leave of them
    (each stage's declared ``rows_out``, e.g. bucketing's ``ceil(n / s)``)."""
    rows = exp.workers.n
    for name in exp.defence.pre:
        declared = preaggregators.spec(name)
        given = dict(exp.defence.pre_hparams.get(name, {}))
        if "f" in (declared.hparams or {}):
            given.setdefault("f", exp.workers.f)
        rows = declared.output_rows(rows, declared.check_hparams(
            given, f"config: defence.pre_hparams.{name}", complete=False))
    return rows


def _rule_hparams(exp: Experiment) -> dict:
    """``defence.hparams``, with the hyperparameter that sizes a state kept one row per
    aggregated row (FoolsGold's ``num_clients``) set to those rows: given by hand, it must be
    that number."""
    hparams = dict(exp.defence.hparams)
    state = aggregators.spec(exp.defence.rule).state
    if state is None or state.rows is None:
        return hparams
    rows = _rows_aggregated(exp)
    given = hparams.setdefault(state.rows, rows)
    if isinstance(given, bool) or given != rows:
        after = (f" after defence.pre = {list(exp.defence.pre)}" if exp.defence.pre else "")
        _fail(f"defence.hparams.{state.rows}",
              f"{exp.defence.rule} keeps one state row per row it aggregates, {rows} here "
              f"(workers.n = {exp.workers.n}{after}); got {state.rows} = {given!r}. Drop it "
              f"(the harness sets it) or set it to {rows}.")
    return hparams


def _algorithm_hparams(exp: Experiment) -> dict:
    rule, given = exp.defence.rule, exp.defence.hparams
    accepted = ALGORITHMS[rule]
    for key in given:
        if key not in accepted:
            _fail("defence.hparams", f"{rule} has no hyperparameter {key!r}; it accepts "
                                     f"{', '.join(accepted) or 'none'}.")
    return {**accepted, **given}


def _worker_side(exp: Experiment, attack_fn, key, where: Placement, send: tuple = (),
                 first: tuple = ()) -> list:
    """What every honest worker does to its gradient first (``first``: the privacy noise, so
    that the momentum is post-processing), worker momentum, what it does to its message before
    sending it (``send``: the per-worker noise of noisy sign / median SGD), and the attack, in
    the order ``attack.on`` says: the attack replaces the messages (``"momentum"``, so the
    Byzantine rows are exactly what the attack makes), or the gradients before the rest
    (``"gradients"``)."""
    n, f, beta = exp.workers.n, exp.workers.f, exp.workers.momentum
    mode = where.collective()
    honest = list(first)
    honest += [transforms.per_worker(optax.trace(beta), n=where.per_device(n), **mode)
               ] if beta > 0 else []
    honest += list(send)
    attack = ([transforms.byzantine(attack_fn, f=f, key=key, positions=exp.attack.positions,
                                    **mode)]
              if attack_fn is not None and f > 0 else [])
    return honest + attack if exp.attack.on == "momentum" else attack + honest


def _check_common(exp: Experiment) -> None:
    n, f = exp.workers.n, exp.workers.f
    if not (isinstance(n, int) and n >= 1):
        _fail("workers.n", f"needs at least one worker; got {n}.")
    if not 0 <= f < n:
        _fail("workers.f", f"needs 0 <= f < n; got f={f}, n={n}.")
    if not 0.0 <= exp.workers.momentum < 1.0:
        _fail("workers.momentum", f"must be in [0, 1); got {exp.workers.momentum}.")
    if exp.attack.on not in ATTACK_TARGETS:
        _fail("attack.on", f"must be 'momentum' or 'gradients'; got {exp.attack.on!r}.")
    if exp.attack.positions not in POSITIONS:
        _fail("attack.positions", f"must be one of {', '.join(POSITIONS)}; got "
                                  f"{exp.attack.positions!r}.")
    if exp.attack.name != "none" and f == 0:
        _fail("attack.name", f"attack {exp.attack.name!r} needs Byzantine workers; got "
                             f"workers.f=0 (use attack.name='none').")
    train = exp.train
    if train.steps < 1 or train.eval_every < 1:
        _fail("train.steps", f"steps and eval_every must be >= 1; got steps={train.steps}, "
                             f"eval_every={train.eval_every}.")
    if train.checkpoint_every < 0:
        _fail("train.checkpoint_every", f"must be >= 0; got {train.checkpoint_every}.")
    if exp.data.batch_size < 0:
        _fail("data.batch_size", f"must be >= 1 (or 0: full batch, every worker's whole shard); "
                                 f"got {exp.data.batch_size}.")
    if exp.data.train_size < 0:
        _fail("data.train_size", f"must be >= 1 (or 0: the whole training set); got "
                                 f"{exp.data.train_size}.")
    z = exp.diagnostics.z
    if exp.diagnostics.enabled and not (z and all(v > 0 for v in z)):
        _fail("diagnostics.z", f"needs one or more multiples of the standard deviation > 0, "
                               f"e.g. z = [0.5, 1, 2]; got {list(z)}.")


def defence(exp: Experiment, where: Placement = STACKED,
            plan: privacy.PrivacyPlan | None = None) -> Defence:
    """The server side of ``exp`` as an optax chain, every setting checked before any compute.

    A rule whose state keeps one row per aggregated row (its declaration's ``state.rows``,
    FoolsGold's ``num_clients``) has that hyperparameter set to the rows it aggregates
    (``workers.n``, or what ``defence.pre`` leaves of them) unless the config gives it.

    Args:
      exp: the experiment.
      where: the devices the workers are spread over (:func:`rbyz.sim.parallel.placement`);
        on more than one, the chain is in collective mode, each device holding its own
        workers' rows, the single-device chain having been built and checked first.
      plan: with ``privacy.enabled``, the run's :class:`rbyz.privacy.PrivacyPlan` (its noise);
        without it the chain is built with noiseless privacy transforms, for the checks only.

    Raises:
      ValueError: an unknown rule, pre-aggregator or attack, a hyperparameter the rule does not
        declare, ``f`` too large for the rule, a row count (``num_clients``) that is not the
        rows the rule aggregates, or a combination that cannot run (naming the field and how
        to fix it).
    """
    stacked = _build(exp, STACKED, plan)
    return collective(exp, stacked, where, plan) if where.sharded else stacked


def collective(exp: Experiment, stacked: Defence, where: Placement,
               plan: privacy.PrivacyPlan | None = None) -> Defence:
    """``stacked`` (``defence(exp)``, every setting checked) with its chain rebuilt in
    collective mode for ``where``, from the same keys."""
    try:
        return stacked._replace(tx=_build(exp, where, plan).tx, stages=None)
    except ValueError as err:  # every other setting passed on one device
        _fail("parallel", f"{exp.rule_label} cannot run this way over {where.devices} "
                          f"devices: {err}")


def _privacy_noise(exp: Experiment, where: Placement, plan: privacy.PrivacyPlan | None):
    """The privacy noise every worker adds first (a tuple of 0 or 1 transforms), and the
    server's optimizer wrapper for central noise (``at = "server"``)."""
    cfg = exp.privacy
    if not cfg.enabled:
        return (), lambda optimizer: optimizer
    private.check(exp)
    stddev = plan.stddev if plan is not None else 0.0
    # Its own stream (fold_in keeps the other streams, and every run without privacy, as they
    # were).
    seed = int_seed(jax.random.fold_in(streams(exp)["defence"], 1_000))
    if cfg.at == "server":
        noise = privacy.central_noise(exp.defence.rule, stddev=stddev, key=seed)
        return (), lambda optimizer: optax.chain(noise, optimizer)
    return ((transforms.add_worker_noise(stddev, key=seed if stddev > 0 else None,
                                         distribution=cfg.noise, **where.collective()),),
            lambda optimizer: optimizer)


def _build(exp: Experiment, where: Placement, plan: privacy.PrivacyPlan | None = None
           ) -> Defence:
    _check_common(exp)
    n, f = exp.workers.n, exp.workers.f
    rule = exp.defence.rule
    attack_fn = _attack_fn(exp)
    flip = exp.attack.name in DATA_ATTACKS
    keys = jax.random.split(streams(exp)["defence"], 2)
    attack_key, rule_key = keys[0], keys[1]
    private_noise, with_server_noise = _privacy_noise(exp, where, plan)
    optimizer = with_server_noise(server_optimizer(exp))

    if rule in aggregators.names():
        unknown = [p for p in exp.defence.pre if p not in preaggregators.names()]
        if unknown:
            _fail("defence.pre", f"unknown pre-aggregator {unknown[0]!r}; use any of "
                                 f"{', '.join(preaggregators.names())}.")
        stray = sorted(set(exp.defence.pre_hparams) - set(exp.defence.pre))
        if stray:
            _fail("defence.pre_hparams", f"{stray[0]!r} is not in defence.pre "
                                         f"{list(exp.defence.pre)}.")
        pre = []
        for name in exp.defence.pre:
            hparams = exp.defence.pre_hparams.get(name, {})
            _check_hparams(preaggregators.spec(name), hparams, f"defence.pre_hparams.{name}")
            pre.append(functools.partial(preaggregators.get(name), **hparams))
        _check_hparams(aggregators.spec(rule), exp.defence.hparams, "defence.hparams")
        rule_hparams = _rule_hparams(exp)
        report = _reports(exp)
        stages = transforms.robust_stages(
            rule, optimizer=optimizer, f=f, pre=pre, attack=attack_fn, attack_on=exp.attack.on,
            momentum=exp.workers.momentum, worker_noise=private_noise[0] if private_noise else None,
            n=where.per_device(n), key=int_seed(attack_key),
            positions=exp.attack.positions, report=report, num_workers=n if report else None,
            **where.aggregation(), **rule_hparams)
        return Defence(optax.chain(*stages.transforms), "workers", n, 1, flip, stages)

    if exp.diagnostics.fail_closed:
        _fail("diagnostics.fail_closed", f"{rule} is a whole algorithm: it reports no selection "
                                         "to fail closed on; use an aggregator that reports "
                                         f"({', '.join(_reporting())}).")
    if rule not in ALGORITHMS:
        _fail("defence.rule", f"unknown rule {rule!r}; use an aggregator "
                              f"({', '.join(aggregators.names())}) or an algorithm "
                              f"({', '.join(ALGORITHMS)}).")
    if exp.defence.pre:
        _fail("defence.pre", f"{rule} is a whole algorithm and takes no pre-aggregators; got "
                             f"{list(exp.defence.pre)}.")
    hp = _algorithm_hparams(exp)
    seed = int_seed(rule_key)

    if rule in ("detox", "draco", "election_coding") and where.layout == "coordinates":
        _fail("parallel.layout", f"{rule} votes over whole updates of its groups or partitions; "
                                 f"use layout = 'gather'.")
    if rule == "election_coding":
        return _election(exp, hp, optimizer, seed, attack_fn, where)

    if rule == "signsgd_majority":
        front = _worker_side(exp, attack_fn, int_seed(attack_key), where, first=private_noise)
        return Defence(optax.chain(*front, transforms.majority_vote(**where.aggregation()),
                                   optimizer), "workers", n, 1, flip)
    if rule in ("noisy_sign_sgd", "noisy_median_sgd"):
        if not hp["b"] >= 0:
            _fail("defence.hparams.b", f"the noise scale must be >= 0; got {hp['b']}.")
        server = (transforms.majority_vote(**where.aggregation()) if rule == "noisy_sign_sgd"
                  else transforms.aggregate("median", **where.aggregation()))
        # The honest workers perturb what they send; the Byzantine ones send the attack as is.
        noise = ((transforms.add_worker_noise(hp["b"], key=seed, **where.collective()),)
                 if hp["b"] > 0 and not exp.privacy.enabled else ())
        front = _worker_side(exp, attack_fn, int_seed(attack_key), where, send=noise,
                             first=private_noise)
        return Defence(optax.chain(*front, server, optimizer), "workers", n, 1, flip)
    front = _worker_side(exp, attack_fn, int_seed(attack_key), where)

    r = hp["r"] if hp["r"] is not None else 2 * f + 1
    if not (isinstance(r, int) and r >= 1 and n % r == 0):
        _fail("defence.hparams.r", f"{rule} groups the workers by r; n={n} must be a multiple "
                                   f"of r={r} (choose r dividing n, or n a multiple of r).")
    if rule == "detox":
        needs_key = coding.detox_needs_key(hp["stage2"])
        server = transforms.detox_aggregate(f=f, r=r, stage2=hp["stage2"], buckets=hp["buckets"],
                                            fallback=hp["fallback"],
                                            key=seed if needs_key else None,
                                            **where.collective())
    else:
        server = transforms.repetition_aggregate(f=f, r=r, fallback=hp["fallback"],
                                                 **where.collective())
    tx = optax.chain(*front, server, optimizer)
    if not where.sharded:
        _probe(tx, n)
    return Defence(tx, "grouped", n, r, flip)


def _reporting() -> list[str]:
    return [s.name for s in aggregators.specs() if s.reports]


def _reports(exp: Experiment) -> bool:
    """Whether the aggregation keeps its selection (diagnostics on, a reporting rule, no
    pre-aggregators: those mix or regroup rows, so the rule's rows are no longer the workers);
    ``diagnostics.fail_closed`` needs it."""
    rule, pre = exp.defence.rule, exp.defence.pre
    reports = exp.diagnostics.enabled and not pre and aggregators.spec(rule).reports
    if exp.diagnostics.fail_closed and not reports:
        why = ("needs diagnostics.enabled = true" if not exp.diagnostics.enabled else
               f"needs a rule without pre-aggregators (got {list(pre)}: they mix or regroup "
               "rows, so the rule's rows are no longer the workers)" if pre else
               f"needs a rule that reports its selection; {rule} does not (one of "
               f"{', '.join(_reporting())})")
        _fail("diagnostics.fail_closed", f"{why}.")
    if exp.diagnostics.fail_closed and rule == "krum" and exp.workers.n - 1 > exp.workers.f:
        _fail("diagnostics.fail_closed", "krum keeps one row by construction, so it rejects "
                                         f"n - 1 = {exp.workers.n - 1} > f = {exp.workers.f} "
                                         "rows at every step; fail closed on a rule that keeps "
                                         "n - f rows, e.g. multi_krum.")
    return reports


def _probe(tx, n: int) -> None:
    """Traces the chain on a one-coordinate stack, so that trace-time checks fail here."""
    params = jnp.zeros((1,), jnp.float32)
    jax.eval_shape(lambda g: tx.update(g, tx.init(params), params)[0],
                   jax.ShapeDtypeStruct((n, 1), jnp.float32))


def _election(exp: Experiment, hp: dict, optimizer, seed: int, attack_fn,
              where: Placement) -> Defence:
    """Election Coding: the code ``G`` (``b`` Byzantine workers tolerated, default ``f``), one
    gradient per partition, the Byzantine workers' sign attack inside the vote; ``noise_std``:
    the Gaussian noise each worker adds to its partition gradients before the signs (the
    rebuttal's noisy-gradient runs; key-derived from the seed)."""
    n, f = exp.workers.n, exp.workers.f
    noise_std = hp["noise_std"]
    if (isinstance(noise_std, bool) or not isinstance(noise_std, (int, float))
            or not np.isfinite(noise_std) or noise_std < 0):
        _fail("defence.hparams.noise_std", f"the std of the noise before the signs must be a "
                                           f"finite number >= 0 (e.g. 1e-4); got {noise_std!r}.")
    if exp.workers.momentum > 0:
        _fail("workers.momentum", "election_coding votes on signs of partition gradients; "
                                  "use the server's momentum (train.server_momentum) instead.")
    if exp.attack.name in DATA_ATTACKS:
        _fail("attack.name", "election_coding's workers share partitions; a data attack does "
                             "not apply. Use a sign attack (sign_reverse, sign_random, ...).")
    if hp["code"] == "deterministic":
        G = coding.deterministic_code(n, f if hp["b"] is None else hp["b"])
    elif hp["code"] == "bernoulli":
        G = coding.bernoulli_code(n, hp["r"], key=seed)
    else:
        _fail("defence.hparams.code", f"must be 'deterministic' or 'bernoulli'; got "
                                      f"{hp['code']!r}.")
    byzantine = ()
    if f > 0 and exp.attack.name != "none":
        if exp.attack.positions == "random":
            _fail("attack.positions", "election_coding fixes its Byzantine workers; use "
                                      "'last' or 'first'.")
        byzantine = tuple(int(i) for i in attacks.byzantine_positions(n, f,
                                                                      exp.attack.positions))
    attack = attack_fn if byzantine else None
    keyed = (attack is not None and attacks.spec(exp.attack.name).key) or noise_std > 0
    tx = optax.chain(transforms.election_vote_aggregate(G, byzantine=byzantine, attack=attack,
                                                        key=seed if keyed else None,
                                                        noise_std=float(noise_std),
                                                        **where.collective()), optimizer)
    return Defence(tx, "partitions", int(G.shape[1]), 1, False)


__all__ = ("ALGORITHMS", "ATTACK_TARGETS", "DATA_ATTACKS", "OPTIMIZERS", "POSITIONS", "Defence",
           "collective", "defence", "int_seed", "server_optimizer", "streams")
