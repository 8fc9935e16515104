"""The simulated training run: one jit-compiled step, steps inside ``lax.scan``, evaluations.

One step, as data flows (``DESIGN.md`` §1)::

    params -> per-worker batches [n, b, ...] (iid / grouped / per-partition sampler)
           -> vmap(grad) -> worker momentum -> attack (on the momenta, or on the gradients)
           -> pre-aggregators -> aggregator -> server optimizer -> new params

The defence is an optax chain built from the declarations (:func:`defence`):
:func:`rbyz.transforms.robust` for every aggregator of the registry (with pre-aggregators, worker
momentum and the attack in the only right order), and, for the algorithms that change what the
workers compute or send (:data:`ALGORITHMS`), the same worker side followed by their own server
rule: signSGD with majority vote, noisy sign / median SGD (Chen et al. 2020), DETOX and DRACO
(grouped sampling: the ``r`` members of a group draw the same batch) and Election Coding (one
gradient per data partition; a worker's message is the majority of the signs of the partitions
its row of ``G`` names).

:func:`train` runs ``steps`` steps in chunks of ``eval_every`` (one compiled ``lax.scan`` per
chunk), evaluates the test accuracy after each chunk, and, given a run directory, checkpoints and
writes ``results.csv`` after each, so that a killed run resumes (:mod:`rbyz.sim.checkpoint`) to
bit-identical numbers. All randomness derives from ``seed``: the model's initialisation, the
workers' data, and the step keys ``fold_in(key, step)``. Same seed, same numbers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rbyz import aggregators, attacks, coding, preaggregators, transforms
from rbyz._src.spec import REQUIRED
from rbyz.sim import data as data_lib
from rbyz.sim import diagnostics as diagnostics_lib
from rbyz.sim import grads as grads_lib
from rbyz.sim import models as models_lib
from rbyz.sim import partition as partition_lib
from rbyz.sim.config import Experiment

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


def _keys(exp: Experiment):
    """Independent streams from the one seed: model init, data split, defence, sampling."""
    base = jax.random.key(exp.seed)
    return dict(zip(("model", "data", "defence", "sample"), jax.random.split(base, 4)))


def _int_seed(key) -> int:
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


def _algorithm_hparams(exp: Experiment) -> dict:
    rule, given = exp.defence.rule, exp.defence.hparams
    accepted = ALGORITHMS[rule]
    for key in given:
        if key not in accepted:
            _fail("defence.hparams", f"{rule} has no hyperparameter {key!r}; it accepts "
                                     f"{', '.join(accepted) or 'none'}.")
    return {**accepted, **given}


def _worker_side(exp: Experiment, attack_fn, key, send: tuple = ()) -> list:
    """Worker momentum, what every honest worker does to its message before sending it
    (``send``: the per-worker noise of noisy sign / median SGD), and the attack, in the order
    ``attack.on`` says: the attack replaces the messages (``"momentum"``, so the Byzantine rows
    are exactly what the attack makes), or the gradients before the rest (``"gradients"``)."""
    n, f, beta = exp.workers.n, exp.workers.f, exp.workers.momentum
    honest = ([transforms.per_worker(optax.trace(beta), n=n)] if beta > 0 else []) + list(send)
    attack = ([transforms.byzantine(attack_fn, f=f, key=key, positions=exp.attack.positions)]
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


def defence(exp: Experiment) -> Defence:
    """The server side of ``exp`` as an optax chain, every setting checked before any compute.

    Raises:
      ValueError: an unknown rule, pre-aggregator or attack, a hyperparameter the rule does not
        declare, ``f`` too large for the rule, or a combination that cannot run (naming the
        field and how to fix it).
    """
    _check_common(exp)
    n, f = exp.workers.n, exp.workers.f
    rule = exp.defence.rule
    attack_fn = _attack_fn(exp)
    flip = exp.attack.name in DATA_ATTACKS
    keys = jax.random.split(_keys(exp)["defence"], 2)
    attack_key, rule_key = keys[0], keys[1]
    optimizer = server_optimizer(exp)

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
        stages = transforms.robust_stages(
            rule, optimizer=optimizer, f=f, pre=pre, attack=attack_fn, attack_on=exp.attack.on,
            momentum=exp.workers.momentum, n=n, key=_int_seed(attack_key),
            positions=exp.attack.positions, **exp.defence.hparams)
        return Defence(optax.chain(*stages.transforms), "workers", n, 1, flip, stages)

    if rule not in ALGORITHMS:
        _fail("defence.rule", f"unknown rule {rule!r}; use an aggregator "
                              f"({', '.join(aggregators.names())}) or an algorithm "
                              f"({', '.join(ALGORITHMS)}).")
    if exp.defence.pre:
        _fail("defence.pre", f"{rule} is a whole algorithm and takes no pre-aggregators; got "
                             f"{list(exp.defence.pre)}.")
    hp = _algorithm_hparams(exp)
    seed = _int_seed(rule_key)

    if rule == "election_coding":
        return _election(exp, hp, optimizer, seed, attack_fn)

    if rule == "signsgd_majority":
        front = _worker_side(exp, attack_fn, _int_seed(attack_key))
        return Defence(optax.chain(*front, transforms.majority_vote(), optimizer),
                       "workers", n, 1, flip)
    if rule in ("noisy_sign_sgd", "noisy_median_sgd"):
        if not hp["b"] >= 0:
            _fail("defence.hparams.b", f"the noise scale must be >= 0; got {hp['b']}.")
        server = (transforms.majority_vote() if rule == "noisy_sign_sgd"
                  else transforms.aggregate("median"))
        # The honest workers perturb what they send; the Byzantine ones send the attack as is.
        noise = (transforms.add_worker_noise(hp["b"], key=seed),) if hp["b"] > 0 else ()
        front = _worker_side(exp, attack_fn, _int_seed(attack_key), send=noise)
        return Defence(optax.chain(*front, server, optimizer), "workers", n, 1, flip)
    front = _worker_side(exp, attack_fn, _int_seed(attack_key))

    r = hp["r"] if hp["r"] is not None else 2 * f + 1
    if not (isinstance(r, int) and r >= 1 and n % r == 0):
        _fail("defence.hparams.r", f"{rule} groups the workers by r; n={n} must be a multiple "
                                   f"of r={r} (choose r dividing n, or n a multiple of r).")
    if rule == "detox":
        needs_key = coding.detox_needs_key(hp["stage2"])
        server = transforms.detox_aggregate(f=f, r=r, stage2=hp["stage2"], buckets=hp["buckets"],
                                            fallback=hp["fallback"],
                                            key=seed if needs_key else None)
    else:
        server = transforms.repetition_aggregate(f=f, r=r, fallback=hp["fallback"])
    tx = optax.chain(*front, server, optimizer)
    _probe(tx, n)
    return Defence(tx, "grouped", n, r, flip)


def _probe(tx, n: int) -> None:
    """Traces the chain on a one-coordinate stack, so that trace-time checks fail here."""
    params = jnp.zeros((1,), jnp.float32)
    jax.eval_shape(lambda g: tx.update(g, tx.init(params), params)[0],
                   jax.ShapeDtypeStruct((n, 1), jnp.float32))


def _election(exp: Experiment, hp: dict, optimizer, seed: int, attack_fn) -> Defence:
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
                                                        noise_std=float(noise_std)), optimizer)
    return Defence(tx, "partitions", int(G.shape[1]), 1, False)


# ------------------------------------------------------------------------------------------------
# The task: data, partitions and model, built once per run on the host.

class Task(NamedTuple):
    """What one run trains on (arrays on the device, index sets per sampling unit)."""

    dataset: data_lib.Dataset
    model: models_lib.Model
    indices: jax.Array       # [units, max_size] example indices per worker / group / partition
    sizes: jax.Array         # [units]
    defence: Defence


@functools.lru_cache(maxsize=4)
def _dataset(name: str, directory: str, test_size: int) -> data_lib.Dataset:
    return data_lib.load(name, data_dir=directory or None, test_size=test_size or None)


def dataset_of(exp: Experiment) -> data_lib.Dataset:
    """The dataset ``exp.data`` names, loaded once per process (a sweep's runs share it)."""
    if exp.data.dataset == "synthetic":
        return data_lib.synthetic(seed=0)
    return _dataset(exp.data.dataset, exp.data.dir, exp.data.test_size)


def task(exp: Experiment, *, model: models_lib.Model | None = None,
         dataset: data_lib.Dataset | None = None) -> Task:
    """Builds the defence (checking every setting first), then the data split and the model."""
    built = defence(exp)
    if dataset is None:
        dataset = dataset_of(exp)
    units = built.units // built.group_size
    if exp.data.train_size:
        count = len(dataset.y_train)
        if not units <= exp.data.train_size <= count:
            _fail("data.train_size", f"must be between the {units} data units (workers, groups "
                                     f"or partitions) and the {count} training examples of "
                                     f"{dataset.name} (or 0: all of them); got "
                                     f"{exp.data.train_size}.")
        subset_seed = _int_seed(jax.random.fold_in(_keys(exp)["data"], 1))
        dataset = data_lib.train_subset(dataset, exp.data.train_size, subset_seed)
    try:
        part = partition_lib.partition(
            dataset.y_train, units, exp.data.partition, seed=_int_seed(_keys(exp)["data"]),
            alpha=exp.data.alpha, classes_per_worker=exp.data.classes_per_worker,
            gamma=exp.data.gamma)
    except ValueError as err:
        _fail("data.partition", str(err))
    if model is None:
        if exp.model.name not in models_lib.NAMES:
            _fail("model.name", f"unknown model {exp.model.name!r}; use one of "
                                f"{', '.join(models_lib.NAMES)} (or pass your own with "
                                f"train(..., model=models.from_flax(module, input_shape))).")
        extra = {"hidden": exp.model.hidden} if exp.model.name == "mlp" else {}
        model = models_lib.build(exp.model.name, dataset.x_train.shape[1:], dataset.num_classes,
                                 **extra)
    return Task(dataset, model, jnp.asarray(part.indices), jnp.asarray(part.sizes), built)


# ------------------------------------------------------------------------------------------------
# The step.

class TrainState(NamedTuple):
    """Everything a run carries from step to step, as plain arrays (it checkpoints as it is,
    and runs that differ only in their seed stack along a new axis).

    Attributes:
      step: the number of steps done.
      key: the sampling key's raw data (``jax.random.key_data``); step ``t`` samples with
        ``fold_in(key, t)``.
      params: the model's parameters.
      opt_state: the defence's optax state (worker momenta, keys, the server optimizer's).
    """

    step: jax.Array
    key: jax.Array
    params: optax.Params
    opt_state: optax.OptState


def init_state(exp: Experiment, t: Task) -> TrainState:
    """The state before the first step: the model initialised from the seed."""
    params = t.model.init(_int_seed(_keys(exp)["model"]))
    return TrainState(jnp.zeros((), jnp.int32), jax.random.key_data(_keys(exp)["sample"]),
                      params, t.defence.tx.init(params))


class Arrays(NamedTuple):
    """The data a compiled chunk reads, passed as arguments (closed-over arrays would be baked
    into the program as constants)."""

    x: jax.Array
    y: jax.Array
    indices: jax.Array
    sizes: jax.Array


def arrays(t: Task) -> tuple[Arrays, Arrays]:
    """The training arrays and the test arrays of a task, on the device."""
    ds = t.dataset
    train = Arrays(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), t.indices, t.sizes)
    test = Arrays(jnp.asarray(ds.x_test), jnp.asarray(ds.y_test), t.indices, t.sizes)
    return train, test


def make_step(exp: Experiment, t: Task) -> Callable:
    """``step(data, state) -> (state, metrics)``: one training step of every worker.

    ``metrics["train_loss"]`` is the mean loss of the workers that train on true labels; with
    ``diagnostics.enabled`` the metrics also hold ``below_z`` (``[len(z)]`` counts) and
    ``byzantine_share`` (:mod:`rbyz.sim.diagnostics`). ``data`` is
    the :class:`Arrays` of the training set.
    """
    inspect = exp.diagnostics.enabled
    num_classes = t.dataset.num_classes
    d, batch = t.defence, exp.data.batch_size
    n, f = exp.workers.n, exp.workers.f
    apply = t.model.apply

    def loss_fn(params, x, y):
        if batch == 0:  # full batch: the padding of a shorter shard has label -1, left out
            nll = optax.softmax_cross_entropy_with_integer_labels(apply(params, x),
                                                                  jnp.maximum(y, 0))
            valid = (y >= 0).astype(nll.dtype)
            return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return models_lib.cross_entropy(apply(params, x), y)

    def step(data: Arrays, state: TrainState):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        k_batch, k_positions = jax.random.split(key)
        if batch == 0:  # every unit's whole shard, padded to max_size (a group shares its own)
            idx = jnp.repeat(data.indices, d.group_size, axis=0)
            sizes = jnp.repeat(data.sizes, d.group_size)
            valid = jnp.arange(idx.shape[1])[None, :] < sizes[:, None]
        elif d.sampling == "grouped":
            idx = partition_lib.sample_grouped(k_batch, data.indices, data.sizes, batch,
                                               d.group_size)
        else:
            idx = partition_lib.sample(k_batch, data.indices, data.sizes, batch)
        x, y = data.x[idx], data.y[idx]
        honest = jnp.ones((d.units,), jnp.bool_)
        if d.flip_labels:
            positions = attacks.byzantine_positions(n, f, exp.attack.positions, key=k_positions)
            honest = honest.at[positions].set(False)
            y = partition_lib.flip_labels(y, ~honest, num_classes)
        if batch == 0:
            y = jnp.where(valid, y, -1)
        losses, grads = grads_lib.per_worker_grads(loss_fn, state.params, x, y)
        metrics = {}
        if inspect and d.stages is not None:
            updates, opt_state, metrics["byzantine_share"] = diagnostics_lib.inspected_update(
                d.stages, grads, state.opt_state, state.params)
        else:
            updates, opt_state = d.tx.update(grads, state.opt_state, state.params)
            if inspect:
                metrics["byzantine_share"] = jnp.float32(np.nan)
        if inspect:
            metrics["below_z"] = diagnostics_lib.coordinates_below(grads, exp.diagnostics.z)
        params = optax.apply_updates(state.params, updates)
        weights = honest.astype(losses.dtype)
        metrics["train_loss"] = jnp.sum(losses * weights) / jnp.sum(weights)
        return TrainState(state.step + 1, state.key, params, opt_state), metrics

    return step


def make_chunk(step: Callable, length: int) -> Callable:
    """``chunk(state, data) -> (state, metrics)``: ``length`` steps in one compiled
    ``lax.scan``; every metric of :func:`make_step` stacked over the steps (``[length, ...]``)."""
    def chunk(state, data):
        return jax.lax.scan(lambda s, _: step(data, s), state, length=length)
    return jax.jit(chunk)


def make_evaluate(t: Task, *, batch: int = 1000) -> Callable:
    """``evaluate(params, test) -> (test_accuracy, test_loss)`` over the test :class:`Arrays`,
    in batches of ``batch`` (``lax.map``) so that a CNN's activations stay small."""
    count = t.dataset.x_test.shape[0]
    chunks = -(-count // batch)
    pad = chunks * batch - count

    def evaluate(params, test: Arrays):
        x = jnp.concatenate([test.x, jnp.zeros((pad, *test.x.shape[1:]), test.x.dtype)])
        y = jnp.concatenate([test.y, jnp.zeros((pad,), test.y.dtype)])
        valid = jnp.arange(chunks * batch) < count
        xs = x.reshape(chunks, batch, *x.shape[1:])

        def one(args):
            xb, yb, vb = args
            logits = t.model.apply(params, xb)
            right = (jnp.argmax(logits, -1) == yb) & vb
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            return jnp.sum(right.astype(jnp.float32)), jnp.sum(jnp.where(vb, nll, 0.0))

        right, nll = jax.lax.map(one, (xs, y.reshape(chunks, batch),
                                       valid.reshape(chunks, batch)))
        return jnp.sum(right) / count, jnp.sum(nll) / count

    return jax.jit(evaluate)


class History(NamedTuple):
    """A finished run: its final state, its evaluation rows (one per evaluation step) and, with
    ``diagnostics.enabled``, its diagnostic rows (one per training step)."""

    state: TrainState
    rows: list
    diagnostics: list = []


def row(exp: Experiment, step: int, accuracy: float, test_loss: float, train_loss: float,
        wall_s: float, run: str = "", dataset: str = "") -> dict:
    """One tidy results row (the columns of :data:`rbyz.sim.report.COLUMNS` and extras)."""
    return {
        "run": run or exp.name, "rule": exp.rule_label, "attack": exp.attack_label,
        "f": exp.workers.f, "n": exp.workers.n,
        "heterogeneity": partition_lib.heterogeneity_label(
            exp.data.partition, alpha=exp.data.alpha,
            classes_per_worker=exp.data.classes_per_worker, gamma=exp.data.gamma),
        "seed": exp.seed, "step": step, "test_accuracy": accuracy, "train_loss": train_loss,
        "test_loss": test_loss, "dataset": dataset, "wall_s": wall_s,
    }


def schedule(exp: Experiment) -> list[int]:
    """The steps at which the run evaluates: every ``eval_every`` steps, and the last step."""
    points = list(range(exp.train.eval_every, exp.train.steps, exp.train.eval_every))
    return points + [exp.train.steps]


def train(exp: Experiment, *, model: models_lib.Model | None = None,
          dataset: data_lib.Dataset | None = None, run_dir: str | Path | None = None,
          run: str = "", progress: bool | Callable = False) -> History:
    """Trains ``exp`` and returns its final state and evaluation rows.

    With ``run_dir``, the run checkpoints after every ``train.checkpoint_every`` evaluations and
    rewrites ``results.csv`` (atomically) after each, and a run found half-done there resumes
    from its last checkpoint, to the same numbers as an uninterrupted run
    (:mod:`rbyz.sim.checkpoint`).

    Args:
      exp: the experiment.
      model: a model to use instead of ``exp.model`` (e.g. ``models.from_flax(my_module, ...)``).
      dataset: a dataset to use instead of ``exp.data.dataset``.
      run_dir: where to checkpoint and write results (``None``: in memory only).
      run: the run's name in the results (default ``exp.name``).
      progress: ``True`` for a progress bar over the steps, or a callable
        ``progress(steps_done)`` called after each chunk.

    Returns:
      A :class:`History`.

    Example:
      >>> from rbyz.sim import config
      >>> exp = config.from_dict({"data": {"dataset": "synthetic"}, "model": {"name": "logistic"},
      ...                         "workers": {"n": 5, "f": 1}, "defence": {"rule": "median"},
      ...                         "attack": {"name": "sign_flip"},
      ...                         "train": {"steps": 40, "eval_every": 20}})
      >>> history = train(exp)
      >>> [r["step"] for r in history.rows], history.rows[-1]["test_accuracy"] > 0.5
      ([20, 40], True)
    """
    from rbyz.sim import checkpoint as checkpoint_lib  # orbax: only needed with a run dir

    t = task(exp, model=model, dataset=dataset)
    train_data, test_data = arrays(t)
    state = init_state(exp, t)
    step = make_step(exp, t)
    evaluate = make_evaluate(t)
    rows: list[dict] = []
    diagnostic_rows: list[dict] = []
    store = checkpoint_lib.Store(run_dir, exp) if run_dir is not None else None
    if store is not None:
        restored = store.restore(state)
        if restored is not None:
            state, rows, diagnostic_rows = restored
    done = int(state.step)
    bar = _progress_bar(progress, exp, done)
    started = time.perf_counter() - (rows[-1]["wall_s"] if rows else 0.0)
    chunks: dict[int, Callable] = {}
    previous = done
    for evaluations, point in enumerate(schedule(exp), start=1):
        if point <= done:
            continue
        length = point - previous
        if length not in chunks:
            chunks[length] = make_chunk(step, length)
        state, metrics = chunks[length](state, train_data)
        accuracy, test_loss = evaluate(state.params, test_data)
        rows.append(row(exp, point, float(accuracy), float(test_loss),
                        float(jnp.mean(metrics["train_loss"])), time.perf_counter() - started,
                        run, t.dataset.name))
        if exp.diagnostics.enabled:
            diagnostic_rows += _diagnostic_rows(exp, previous, metrics, run, t)
        if store is not None:
            store.save(state, rows, diagnostics=diagnostic_rows, final=point == exp.train.steps,
                       checkpoint=(exp.train.checkpoint_every > 0
                                   and evaluations % exp.train.checkpoint_every == 0))
        bar(length)
        previous = point
    bar(None)
    return History(state, rows, diagnostic_rows)


def _diagnostic_rows(exp: Experiment, first: int, metrics: dict, run: str, t: Task) -> list:
    """One row per step of a chunk that started after step ``first``: the run's key columns,
    ``test_accuracy`` ``nan`` (evaluations are in ``results.csv``), the step's train loss and
    the diagnostics (:func:`rbyz.sim.diagnostics.columns`)."""
    host = jax.device_get(metrics)
    coordinates = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(
        jax.eval_shape(t.model.init, 0)))
    z_columns = [diagnostics_lib.column(z) for z in exp.diagnostics.z]
    out = []
    for i, loss in enumerate(host["train_loss"]):
        base = row(exp, first + i + 1, float("nan"), float("nan"), float(loss), 0.0, run,
                   t.dataset.name)
        for key in ("test_loss", "wall_s"):
            del base[key]
        base.update({c: int(v) for c, v in zip(z_columns, host["below_z"][i])})
        base.update(coordinates=coordinates, byzantine_share=float(host["byzantine_share"][i]))
        out.append(base)
    return out


def _progress_bar(progress, exp: Experiment, done: int) -> Callable:
    """``advance(k)`` after each chunk, ``advance(None)`` at the end."""
    if callable(progress):
        total = [done]

        def advance(k):
            if k is not None:
                total[0] += k
                progress(total[0])
        return advance
    if not progress:
        return lambda k: None
    from tqdm.auto import tqdm

    bar = tqdm(total=exp.train.steps, initial=done, unit="step", leave=False,
               desc=f"{exp.rule_label} / {exp.attack_label}")

    def advance(k):
        if k is None:
            bar.close()
        else:
            bar.update(k)
    return advance


__all__ = ("ALGORITHMS", "DATA_ATTACKS", "Arrays", "Defence", "History", "Task", "TrainState",
           "arrays", "dataset_of", "defence", "init_state", "make_chunk", "make_evaluate",
           "make_step", "row", "schedule", "server_optimizer", "task", "train")
