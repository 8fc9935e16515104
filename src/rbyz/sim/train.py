"""The simulated training run: one jit-compiled step, steps inside ``lax.scan``, evaluations.

One step, as data flows (``DESIGN.md`` §1)::

    params -> per-worker batches [n, b, ...] (iid / grouped / per-partition sampler)
           -> vmap(grad) -> worker momentum -> attack (on the momenta, or on the gradients)
           -> pre-aggregators -> aggregator -> server optimizer -> new params

The defence is an optax chain built from the declarations (:mod:`rbyz.sim.defences`). With
``parallel.devices > 1`` the same step runs under ``jax.shard_map`` over a ``workers`` mesh
(:mod:`rbyz.sim.parallel`): each device draws the batches of its own ``n / D`` workers,
computes their gradients, keeps their momenta, and the defence's transforms, in collective
mode, gather (``layout = "gather"``) or scatter by coordinates (``"coordinates"``) what the rule
needs; the state's per-worker leaves are split over the devices
(:func:`rbyz.distributed.state_specs`), the rest replicated. The numbers are those of the
single-device step, and the state has the same shapes, so a checkpoint is one pytree either way.

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
from jax.sharding import PartitionSpec

from rbyz import attacks, distributed, privacy
from rbyz.sim import data as data_lib
from rbyz.sim import defences as defences_lib
from rbyz.sim import diagnostics as diagnostics_lib
from rbyz.sim import grads as grads_lib
from rbyz.sim import models as models_lib
from rbyz.sim import parallel
from rbyz.sim import partition as partition_lib
from rbyz.sim import private
from rbyz.sim.config import Experiment
from rbyz.sim.defences import ALGORITHMS, DATA_ATTACKS, Defence, defence, server_optimizer

P = PartitionSpec
_fail = defences_lib._fail
_streams, _int_seed = defences_lib.streams, defences_lib.int_seed

# ------------------------------------------------------------------------------------------------
# The task: data, partitions and model, built once per run on the host.

class Task(NamedTuple):
    """What one run trains on (arrays on the device, index sets per sampling unit)."""

    dataset: data_lib.Dataset
    model: models_lib.Model
    indices: jax.Array       # [units, max_size] example indices per worker / group / partition
    sizes: jax.Array         # [units]
    defence: Defence
    where: parallel.Placement = parallel.STACKED
    privacy: privacy.PrivacyPlan | None = None  # with privacy.enabled


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
    """Builds the defence (checking every setting first) where the workers run, then the data
    split, the privacy plan (``privacy.enabled``: its noise sets the defence's) and the model."""
    built = defence(exp)
    where = parallel.placement(exp, built.units)
    if where.sharded:
        built = defences_lib.collective(exp, built, where)
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
        subset_seed = _int_seed(jax.random.fold_in(_streams(exp)["data"], 1))
        dataset = data_lib.train_subset(dataset, exp.data.train_size, subset_seed)
    try:
        part = partition_lib.partition(
            dataset.y_train, units, exp.data.partition, seed=_int_seed(_streams(exp)["data"]),
            alpha=exp.data.alpha, classes_per_worker=exp.data.classes_per_worker,
            gamma=exp.data.gamma)
    except ValueError as err:
        _fail("data.partition", str(err))
    plan = None
    if exp.privacy.enabled:
        plan = private.plan(exp, part.sizes)
        built = defence(exp, plan=plan)
        if where.sharded:
            built = defences_lib.collective(exp, built, where, plan)
    if model is None:
        if exp.model.name not in models_lib.NAMES:
            _fail("model.name", f"unknown model {exp.model.name!r}; use one of "
                                f"{', '.join(models_lib.NAMES)} (or pass your own with "
                                f"train(..., model=models.from_flax(module, input_shape))).")
        extra = {"hidden": exp.model.hidden} if exp.model.name == "mlp" else {}
        model = models_lib.build(exp.model.name, dataset.x_train.shape[1:], dataset.num_classes,
                                 **extra)
    return Task(dataset, model, jnp.asarray(part.indices), jnp.asarray(part.sizes), built, where,
                plan)


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
    """The state before the first step: the model initialised from the seed (on more than one
    device: placed as :func:`state_specs` says, each device initialising its workers' rows)."""
    params = t.model.init(_int_seed(_streams(exp)["model"]))
    step, key = jnp.zeros((), jnp.int32), jax.random.key_data(_streams(exp)["sample"])
    if not t.where.sharded:
        return TrainState(step, key, params, t.defence.tx.init(params))
    mesh = t.where.mesh()
    opt_state = distributed.init_sharded(t.defence.tx, params, mesh, state_specs(t).opt_state)
    return TrainState(*distributed.put((step, key, params), mesh), opt_state)


def state_specs(t: Task) -> TrainState:
    """How a sharded run's :class:`TrainState` lies on the mesh: the workers' own leaves of the
    defence's state (momenta) split over ``workers``, everything else replicated
    (:func:`rbyz.distributed.state_specs`)."""
    params = jax.eval_shape(t.model.init, 0)
    opt_state = distributed.state_specs(t.defence.tx, params, t.where.mesh(),
                                        num_workers=t.defence.units)
    return TrainState(P(), P(), jax.tree.map(lambda _: P(), params), opt_state)


class Arrays(NamedTuple):
    """The data a compiled chunk reads, passed as arguments (closed-over arrays would be baked
    into the program as constants)."""

    x: jax.Array
    y: jax.Array
    indices: jax.Array
    sizes: jax.Array


def arrays(t: Task) -> tuple[Arrays, Arrays]:
    """The training arrays and the test arrays of a task, on the device (replicated on every
    device of a sharded run: each device reads its own workers' batches from them)."""
    ds = t.dataset
    train = Arrays(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), t.indices, t.sizes)
    test = Arrays(jnp.asarray(ds.x_test), jnp.asarray(ds.y_test), t.indices, t.sizes)
    if t.where.sharded:
        mesh = t.where.mesh()
        return distributed.put(train, mesh), distributed.put(test, mesh)
    return train, test


def make_step(exp: Experiment, t: Task) -> Callable:
    """``step(data, state) -> (state, metrics)``: one training step of every worker.

    ``metrics["train_loss"]`` is the mean loss of the workers that train on true labels; with
    ``diagnostics.enabled`` the metrics also hold ``below_z`` (``[len(z)]`` counts) and
    ``byzantine_share`` (:mod:`rbyz.sim.diagnostics`). ``data`` is
    the :class:`Arrays` of the training set. On more than one device (``t.where``) it is the
    per-device step of :func:`make_chunk`'s ``shard_map``: the batches of every worker are drawn
    from the step's key (so they are the single-device ones), each device keeps its own rows.
    """
    where = t.where
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

    plan = t.privacy
    if plan is not None:  # per-example clipping, over the plan's batches (module docstring)
        def example_loss(params, x, y):
            return models_lib.cross_entropy(apply(params, x), y)
        clipped = jax.vmap(plan.grad_fn(example_loss, microbatch=exp.privacy.microbatch),
                           in_axes=(None, 0, 0, 0, 0))

    def step(data: Arrays, state: TrainState):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        k_batch, k_positions = jax.random.split(key)
        if plan is not None:
            idx, mask = plan.sample(k_batch, data.indices, data.sizes)
            divisors = (data.sizes.astype(jnp.float32) if plan.sampling == "full"
                        else jnp.full(data.sizes.shape, float(plan.batch_size)))
            mask, divisors = where.own(mask), where.own(divisors)
        elif batch == 0:  # every unit's whole shard, padded to max_size (a group shares its own)
            idx = jnp.repeat(data.indices, d.group_size, axis=0)
            sizes = jnp.repeat(data.sizes, d.group_size)
            valid = jnp.arange(idx.shape[1])[None, :] < sizes[:, None]
        elif d.sampling == "grouped":
            idx = partition_lib.sample_grouped(k_batch, data.indices, data.sizes, batch,
                                               d.group_size)
        else:
            idx = partition_lib.sample(k_batch, data.indices, data.sizes, batch)
        idx = where.own(idx)
        x, y = data.x[idx], data.y[idx]
        honest = jnp.ones((d.units,), jnp.bool_)
        if d.flip_labels:
            positions = attacks.byzantine_positions(n, f, exp.attack.positions, key=k_positions)
            honest = where.own(honest.at[positions].set(False))
            y = partition_lib.flip_labels(y, ~honest, num_classes)
        else:
            honest = where.own(honest)
        if plan is not None:
            losses, grads = clipped(where.local(state.params), x, y, mask, divisors)
        else:
            if batch == 0:
                y = jnp.where(where.own(valid), y, -1)
            losses, grads = grads_lib.per_worker_grads(loss_fn, where.local(state.params), x, y)
        metrics = {}
        if inspect and d.stages is not None:
            updates, opt_state, detection = diagnostics_lib.inspected_update(
                d.stages, grads, state.opt_state, state.params)
            metrics.update(detection)
        else:
            updates, opt_state = d.tx.update(grads, state.opt_state, state.params)
            if inspect:
                metrics.update(byzantine_share=jnp.float32(np.nan),
                               byzantine_kept=jnp.int32(-1), rejected=jnp.int32(-1))
        if inspect:
            metrics["below_z"] = diagnostics_lib.coordinates_below(grads, exp.diagnostics.z)
        params = optax.apply_updates(state.params, updates)
        weights = honest.astype(losses.dtype)
        metrics["train_loss"] = (where.total(jnp.sum(losses * weights))
                                 / where.total(jnp.sum(weights)))
        return TrainState(state.step + 1, state.key, params, opt_state), metrics

    return step


def make_chunk(step: Callable, length: int, t: Task | None = None) -> Callable:
    """``chunk(state, data) -> (state, metrics)``: ``length`` steps in one compiled
    ``lax.scan``; every metric of :func:`make_step` stacked over the steps (``[length, ...]``).

    With a task ``t`` spread over devices, the scan runs inside ``jax.shard_map`` over its mesh,
    the state in and out placed as :func:`state_specs` says, the data and metrics replicated.
    """
    def chunk(state, data):
        return jax.lax.scan(lambda s, _: step(data, s), state, length=length)
    if t is None or not t.where.sharded:
        return jax.jit(chunk)
    specs = state_specs(t)
    return jax.jit(jax.shard_map(chunk, mesh=t.where.mesh(), in_specs=(specs, P()),
                                 out_specs=(specs, P())))


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

    With ``privacy.enabled`` every row also holds ``epsilon``: the ε at ``privacy.delta`` after
    that row's steps, of the worker with the weakest guarantee (:mod:`rbyz.sim.private`).

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
            chunks[length] = make_chunk(step, length, t)
        state, metrics = chunks[length](state, train_data)
        accuracy, test_loss = evaluate(state.params, test_data)
        rows.append(row(exp, point, float(accuracy), float(test_loss),
                        float(jnp.mean(metrics["train_loss"])), time.perf_counter() - started,
                        run, t.dataset.name))
        if t.privacy is not None:  # the guarantee after `point` releases (the worst worker's)
            rows[-1]["epsilon"] = t.privacy.epsilon(point)
        if exp.diagnostics.enabled:
            diagnostic_rows += _diagnostic_rows(exp, previous, metrics, run, t)
            _fail_closed(exp, previous, metrics)
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
        base.update(coordinates=coordinates, byzantine_share=float(host["byzantine_share"][i]),
                    byzantine_kept=int(host["byzantine_kept"][i]),
                    rejected=int(host["rejected"][i]))
        out.append(base)
    return out


def _fail_closed(exp: Experiment, first: int, metrics: dict) -> None:
    """Raises :class:`rbyz.sim.diagnostics.FailClosed` at the chunk's first step whose rule
    rejected more rows than ``f``, when ``diagnostics.fail_closed``."""
    if not exp.diagnostics.fail_closed:
        return
    rejected = np.asarray(jax.device_get(metrics["rejected"]))
    over = np.flatnonzero(rejected > exp.workers.f)
    if over.size:
        i = int(over[0])
        raise diagnostics_lib.FailClosed(first + i + 1, int(rejected[i]), exp.workers.f,
                                         exp.defence.rule)


def _progress_bar(progress, exp: Experiment, done: int) -> Callable:
    """``advance(k)`` after each chunk, ``advance(None)`` at the end."""
    if callable(progress):
        total = [done]

        def advance(k):
            if k is not None:
                total[0] += k
                progress(total[0])
        return advance
    if not progress or jax.process_index() != 0:  # one bar for a run across processes
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
