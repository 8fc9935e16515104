"""Speed of a simulated training step: per-worker gradients, the defended step, ByzFL, scale.

In one run, on the default JAX device (named in the header):

(a) the machine's float32 matmul rate (one large square matmul), which sets the FLOP floor;
(b) formulations of the per-worker gradients of the 784-100-10 MLP ("A Little Is Enough"),
    ``n = 25`` workers, ``b = 32`` examples each: time, GFLOP/s, multiple of the FLOP floor and
    of ``vmap``; and the weight-gradient batched matmul alone, in its layouts;
(c) the defended step ``per_worker_grads`` + worker momentum 0.9 + ALIE (fixed z, on the
    momenta) + trimmed mean (f = 5) + server SGD, built with ``rbyz.transforms.robust``, timed per
    step inside a jitted ``lax.scan``, with a breakdown (sampling, gradients, momentum, attack,
    aggregation) and the undefended step (mean, no attack) beside it;
(c') the same step as ``rbyz.sim.train`` builds it (sampler included), its time per step and
    whether batching runs that differ only in their seed into one ``vmap``-ed program pays;
(d) ByzFL's own framework (its ``Client``/``ByzantineClient``/``Server`` classes on torch, the
    loop body of ``byzfl.benchmark.train`` for DSGD) at the same settings, when torch and ByzFL
    import, and rbyz's speedup;
(f) privacy: the per-example clipped gradients of (b)'s MLP (``n = 25``, ``B = 32``; and the
    Poisson capacity ``B + 5 sqrt(B)`` of ``rbyz.privacy.PrivacyPlan``) beside the unclipped
    per-worker gradients, the overhead of per-example gradients; and the accountant
    (``rbyz.privacy.accounting``) for ``T = 10^4`` steps, RDP and PLD;
(e) scale on one device: n in {10, 25, 100, 400, 1000} workers, time per step and peak memory
    (XLA's compiled memory; and the peak RSS of a fresh process per point, unless ``--quick``),
    for mean, trimmed mean, median and Krum, with the growth exponent in n (``--quick``: n in
    {10, 50}).

Usage::

    python benchmarks/training.py                  # everything (several minutes on 2 cores)
    python benchmarks/training.py --quick          # a smoke run (< 1 min on 2 cores)
    python benchmarks/training.py --only grads step --repeats 30
    python benchmarks/training.py --scale-n 10 100 1000 --out /tmp/training.md

Each table's caption says what its columns are; ``x floor`` is the time divided by the FLOP
floor (the computation's FLOPs at the matmul rate of (a)), ``x vmap`` / ``x mean agg`` the time
divided by that row's time in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tabulate import tabulate

from rbyz import aggregators as agg
from rbyz import attacks
from rbyz._src import order_stats
from rbyz.sim import grads as grads_lib
from rbyz.sim import models
from rbyz.transforms import robust
from rbyz.transforms.byzantine import byzantine
from rbyz.transforms.per_worker import per_worker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aggregators import load_byzfl, machine, time_together

N, F, BATCH, Z, LR, BETA = 25, 5, 32, 1.0, 0.1, 0.9
SCALE_RULES = ("mean", "trimmed_mean", "median", "krum")
SECTIONS = ("matmul", "grads", "step", "byzfl", "privacy", "scale")


def _median_seconds(call, repeats: int) -> float:
    return time_together({"x": call}, repeats=repeats)["x"][0]


def _flops(fn, *args) -> float:
    """FLOPs of ``jit(fn)(*args)`` from XLA's cost analysis (0 when the backend gives none)."""
    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001  (backends without a cost model)
        return 0.0
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- (a) matmul


def matmul_rate(repeats: int) -> tuple[int, float]:
    """``(size, GFLOP/s)`` of one float32 ``size x size`` matmul (2048 on CPU, 8192 else)."""
    size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda u: u @ u)
    seconds = _median_seconds(functools.partial(matmul, a), repeats)
    return size, 2 * size**3 / seconds / 1e9


# ----------------------------------------------------------------------------- (b) gradients


def mlp_problem(n: int, b: int, key: int = 0):
    """The 784-100-10 MLP, its loss and one step's batches ``x [n, b, 784], y [n, b]``."""
    model = models.mlp((784,), 10)
    params = model.init(0)

    def loss_fn(p, xb, yb):
        return models.cross_entropy(model.apply(p, xb), yb)

    kx, ky = jax.random.split(jax.random.key(key))
    x = jax.random.normal(kx, (n, b, 784), jnp.float32)
    y = jax.random.randint(ky, (n, b), 0, 10)
    return model, params, loss_fn, x, y


def _contraction_last(fn):
    """``fn`` re-evaluated from its jaxpr with every batched ``dot_general`` given explicit
    operand transposes (batch, free, contraction last | batch, contraction, free), kept apart
    from the dot by an optimization barrier: a candidate layout for the weight gradients."""
    from jax.extend import core as jcore

    def dot(lhs, rhs, dimension_numbers, **params):
        (lc, rc), (lb, rb) = (tuple(map(tuple, d)) for d in dimension_numbers)
        lfree = tuple(d for d in range(lhs.ndim) if d not in lc + lb)
        rfree = tuple(d for d in range(rhs.ndim) if d not in rc + rb)
        nb, nf, nc = len(lb), len(lfree), len(lc)
        lhs, rhs = lax.optimization_barrier(
            (lax.transpose(lhs, lb + lfree + lc), lax.transpose(rhs, rb + rc + rfree)))
        dims = ((tuple(range(nb + nf, nb + nf + nc)), tuple(range(nb, nb + nc))),
                (tuple(range(nb)), tuple(range(nb))))
        return lax.dot_general_p.bind(lhs, rhs, dimension_numbers=dims, **params)

    def evaluate(jaxpr, consts, *args):
        env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if eqn.primitive is lax.dot_general_p and eqn.params["dimension_numbers"][1][0]:
                params = dict(eqn.params)
                outs = [dot(*ins, params.pop("dimension_numbers"), **params)]
            elif eqn.primitive.name in ("jit", "pjit", "closed_call") and "jaxpr" in eqn.params:
                outs = evaluate(eqn.params["jaxpr"].jaxpr, eqn.params["jaxpr"].consts, *ins)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shape), out)

    return wrapped


def grad_formulations(loss_fn, n: int) -> dict:
    """Per-worker ``(losses [n], grads [n, ...])`` formulations, and the mean gradient."""
    value_and_grad = jax.value_and_grad(loss_fn)

    def broadcast(p):
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), p)

    def summed(p, x, y):
        def total(stacked):
            losses = jax.vmap(loss_fn)(stacked, x, y)
            return jnp.sum(losses), losses
        (_, losses), g = jax.value_and_grad(total, has_aux=True)(broadcast(p))
        return losses, g

    vmap = functools.partial(grads_lib.per_worker_grads, loss_fn)
    return {
        "mean gradient over n*b (not per worker)": lambda p, x, y: value_and_grad(
            p, x.reshape(-1, *x.shape[2:]), y.reshape(-1)),
        "per_worker_grads = vmap(value_and_grad)": vmap,
        "vmap over params broadcast [n, ...]": lambda p, x, y: jax.vmap(value_and_grad)(
            broadcast(p), x, y),
        "grad of sum_i L_i(P_i), P broadcast": summed,
        "lax.map (one worker per step)": lambda p, x, y: lax.map(
            lambda xy: value_and_grad(p, *xy), (x, y)),
        "lax.map(batch_size=5)": lambda p, x, y: lax.map(
            lambda xy: value_and_grad(p, *xy), (x, y), batch_size=5),
        "vmap, batched dots contraction-last": _contraction_last(vmap),
    }


def bench_grads(repeats: int, rate: float) -> tuple[str, float]:
    _, params, loss_fn, x, y = mlp_problem(N, BATCH)
    forms = grad_formulations(loss_fn, N)
    reference_name = "per_worker_grads = vmap(value_and_grad)"
    flops = _flops(forms[reference_name], params, x, y)
    jitted = {name: jax.jit(fn) for name, fn in forms.items()}
    reference = jitted[reference_name](params, x, y)
    timed = time_together({name: functools.partial(fn, params, x, y)
                           for name, fn in jitted.items()}, repeats=repeats)
    floor = flops / (rate * 1e9)
    body = []
    for name, (seconds, _) in timed.items():
        diff = "" if name.startswith("mean") else f"{_max_diff(jitted[name](params, x, y), reference):.1e}"
        body.append([name, f"{seconds * 1e3:.2f}", f"{flops / seconds / 1e9:.0f}",
                     f"{seconds / floor:.1f}", f"{seconds / timed[reference_name][0]:.2f}", diff])
    table = tabulate(body, headers=["formulation", "ms", "GFLOP/s", "x floor", "x vmap",
                                    "max |diff| vs vmap"], tablefmt="github")

    # The per-worker weight gradient of layer 1 alone: [n, b, 784] x [n, b, 100] -> [n, 784, 100].
    k1, k2 = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(k1, (N, BATCH, 784), jnp.float32)
    ds = jax.random.normal(k2, (N, BATCH, 100), jnp.float32)
    bmm = {
        "einsum nbi,nbj->nij (as in the gradient)": lambda a, c: jnp.einsum("nbi,nbj->nij", a, c),
        "einsum nbi,nbj->nji (output transposed)": lambda a, c: jnp.einsum("nbi,nbj->nji", a, c),
        "lhs transposed first (contraction last)": lambda a, c: jnp.einsum(
            "nib,nbj->nij", lax.optimization_barrier(jnp.swapaxes(a, 1, 2)), c),
        "lax.map of per-worker matmuls": lambda a, c: lax.map(lambda u: u[0].T @ u[1], (a, c)),
    }
    bmm_flops = 2 * N * BATCH * 784 * 100
    timed = time_together({k: functools.partial(jax.jit(f), xs, ds) for k, f in bmm.items()},
                          repeats=repeats)
    bmm_table = tabulate(
        [[k, f"{s * 1e3:.3f}", f"{bmm_flops / s / 1e9:.0f}", f"{s / (bmm_flops / rate / 1e9):.1f}"]
         for k, (s, _) in timed.items()],
        headers=["weight-gradient batched matmul alone", "ms", "GFLOP/s", "x floor"],
        tablefmt="github")
    text = "\n".join([
        (f"MLP 784-100-10, n={N}, b={BATCH}: {flops / 1e9:.3f} GFLOP per call (XLA cost "
         f"analysis of the vmap formulation), floor {floor * 1e3:.2f} ms at {rate:.0f} GFLOP/s."),
        "",
        table, "", bmm_table])
    return text, flops


# ----------------------------------------------------------------------------- (c) the step


def make_run(model, tx, data_x, data_y, n: int, b: int, steps: int):
    """A jitted ``run(params, state, key)`` of ``steps`` training steps in one ``lax.scan``."""

    def loss_fn(p, xb, yb):
        return models.cross_entropy(model.apply(p, xb), yb)

    def step(carry, key):
        params, state = carry
        index = jax.random.randint(key, (n, b), 0, data_x.shape[0])
        losses, g = grads_lib.per_worker_grads(loss_fn, params, data_x[index], data_y[index])
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), jnp.mean(losses)

    @jax.jit
    def run(params, state, key):
        return lax.scan(step, (params, state), jax.random.split(key, steps))

    return run


def defended(rule: str, n: int, f: int):
    """The defended optimizer of the benchmark: momentum 0.9, ALIE (z=Z) on the momenta."""
    return robust(rule, f=f, n=n, momentum=BETA, attack=functools.partial(attacks.alie, z=Z),
                  attack_on="momentum", optimizer=optax.sgd(LR), key=0)


def synthetic_data(size: int = 8192, key: int = 2):
    kx, ky = jax.random.split(jax.random.key(key))
    return (jax.random.normal(kx, (size, 784), jnp.float32),
            jax.random.randint(ky, (size,), 0, 10))


def bench_step(repeats: int, steps: int, rate: float, grad_flops: float) -> tuple[str, float]:
    model, params, loss_fn, x, y = mlp_problem(N, BATCH)
    data_x, data_y = synthetic_data()
    tx = defended("trimmed_mean", N, F)
    plain_tx = robust("mean", optimizer=optax.sgd(LR))
    run = make_run(model, tx, data_x, data_y, N, BATCH, steps)
    run_plain = make_run(model, plain_tx, data_x, data_y, N, BATCH, steps)
    state, plain_state = tx.init(params), plain_tx.init(params)
    key = jax.random.key(3)
    _, g = grads_lib.per_worker_grads(loss_fn, params, x, y)
    d = sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(g))
    honest = jax.tree.map(lambda a: a[: N - F], g)
    momentum_tx = per_worker(optax.trace(BETA), n=N)
    attack_tx = byzantine(functools.partial(attacks.alie, z=Z), f=F, key=0)
    m_state, a_state = momentum_tx.init(params), attack_tx.init(params)
    parts = {
        "whole defended step (per step, scan)": functools.partial(run, params, state, key),
        "undefended step: mean, no attack (scan)": functools.partial(
            run_plain, params, plain_state, key),
        "sampling: index + gather [n, b, 784]": functools.partial(jax.jit(
            lambda k: data_x[jax.random.randint(k, (N, BATCH), 0, data_x.shape[0])]), key),
        "per_worker_grads": functools.partial(jax.jit(
            functools.partial(grads_lib.per_worker_grads, loss_fn)), params, x, y),
        "worker momentum (per_worker(trace))": functools.partial(
            jax.jit(lambda u, s: momentum_tx.update(u, s)[0]), g, m_state),
        "attack: byzantine(alie) injection": functools.partial(
            jax.jit(lambda u, s: attack_tx.update(u, s)[0]), g, a_state),
        "attack: alie alone on 20 honest rows": functools.partial(
            jax.jit(lambda h: attacks.alie(h, f=F, z=Z)), honest),
        "aggregation: trimmed_mean (f=5)": functools.partial(
            jax.jit(functools.partial(agg.trimmed_mean, f=F)), g),
        "aggregation: mean": functools.partial(jax.jit(agg.mean), g),
    }
    timed = time_together(parts, repeats=repeats)
    per_step = {k: s / steps if "scan)" in k else s for k, (s, _) in timed.items()}
    floor = grad_flops / (rate * 1e9)
    memory_floor = 4 * N * d / 1e9  # GB read once by the mean
    body = []
    for k, s in per_step.items():
        body.append([k, f"{s * 1e3:.2f}", f"{s / floor:.1f}",
                     f"{s / per_step['aggregation: mean']:.1f}",
                     f"{s / per_step['whole defended step (per step, scan)']:.2f}"])
    table = tabulate(body, headers=["part", "ms", "x FLOP floor", "x mean agg", "of step"],
                     tablefmt="github")
    total = sum(per_step[k] for k in per_step if not k.startswith(("whole", "undefended",
                                                                    "aggregation: mean",
                                                                    "attack: alie alone")))
    text = "\n".join([
        (f"Defended step: robust('trimmed_mean', f={F}, n={N}, momentum={BETA}, "
         f"attack=alie(z={Z}), attack_on='momentum', optimizer=sgd({LR})); MLP 784-100-10, "
         f"b={BATCH}, d={d} coordinates per worker; {steps} steps per jitted lax.scan, time per "
         f"step. FLOP floor {floor * 1e3:.2f} ms (the gradients' FLOPs at the matmul rate); the "
         f"stack [n, d] is {memory_floor * 1e3:.1f} MB."),
        "", table, "",
        (f"Sum of the parts (sampling, grads, momentum, injection, trimmed mean): "
         f"{total * 1e3:.2f} ms; the scan runs them fused at "
         f"{per_step['whole defended step (per step, scan)'] * 1e3:.2f} ms.")])
    return text, per_step["whole defended step (per step, scan)"]


def harness_experiment(seed: int = 0):
    """The same settings as rbyz.sim experiment: MLP 784-100-10, n=25, f=5, b=32, momentum 0.9,
    ALIE (z=Z) on the momenta, trimmed mean, SGD."""
    from rbyz.sim import config

    return config.from_dict({
        "seed": seed, "model": {"name": "mlp", "hidden": 100}, "data": {"batch_size": BATCH},
        "workers": {"n": N, "f": F, "momentum": BETA},
        "attack": {"name": "alie", "hparams": {"z": Z}}, "defence": {"rule": "trimmed_mean"},
        "train": {"lr": LR}})


def harness_dataset():
    from rbyz.sim import data as data_lib

    x, y = synthetic_data()
    x, y = np.asarray(x), np.asarray(y).astype(np.int32)
    return data_lib.Dataset("synthetic-784", "benchmark", x, y, x[:1000], y[:1000], 10)


def bench_harness(repeats: int, steps: int, seeds: int = 4) -> tuple[str, float]:
    """rbyz.sim.train's own step (sampler, grads, momentum, attack, rule, SGD) in its scanned
    chunk, and ``seeds`` runs batched with ``vmap`` against the same runs one after the other."""
    from rbyz.sim import train

    dataset = harness_dataset()
    exps = [harness_experiment(s) for s in range(seeds)]
    tasks = [train.task(e, dataset=dataset) for e in exps]
    states = [train.init_state(e, t) for e, t in zip(exps, tasks)]
    data = [train.arrays(t)[0] for t in tasks]
    step = train.make_step(exps[0], tasks[0])
    chunk = train.make_chunk(step, steps)

    def sequential():
        return [chunk(st, d) for st, d in zip(states, data)]

    # The tx's keys live in the state, so seed 0's update function serves every seed.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    indices = jnp.stack([d.indices for d in data])
    sizes = jnp.stack([d.sizes for d in data])

    def one(state, idx, size):
        arrays = train.Arrays(data[0].x, data[0].y, idx, size)
        return lax.scan(lambda st, _: step(arrays, st), state, length=steps)

    batched = jax.jit(jax.vmap(one))
    timed = time_together({
        "harness step (one run)": functools.partial(chunk, states[0], data[0]),
        f"{seeds} seeds one after the other": sequential,
        f"{seeds} seeds batched with vmap": functools.partial(batched, stacked, indices, sizes),
    }, repeats=repeats)
    one_run = timed["harness step (one run)"][0] / steps
    seq = timed[f"{seeds} seeds one after the other"][0] / (steps * seeds)
    vm = timed[f"{seeds} seeds batched with vmap"][0] / (steps * seeds)
    table = tabulate([["rbyz.sim.train step, one run", f"{one_run * 1e3:.2f}", "-"],
                      [f"{seeds} seeds, one after the other", f"{seq * 1e3:.2f}", "1.00"],
                      [f"{seeds} seeds, one vmapped program", f"{vm * 1e3:.2f}",
                       f"{seq / vm:.2f}"]],
                     headers=["", "ms per step per run", "speedup of vmap"], tablefmt="github")
    text = (f"The harness's own step (rbyz.sim.train.make_step: the iid sampler, per-worker "
            f"gradients, momentum {BETA}, ALIE z={Z} on the momenta, trimmed mean, SGD), "
            f"{steps} steps per scanned chunk; and {seeds} runs that differ only in their seed, "
            f"batched into one compiled program with vmap.\n\n{table}")
    return text, one_run


# ----------------------------------------------------------------------------- (d) ByzFL


def byzfl_step(repeats: int, steps: int) -> tuple[str, float | None]:
    """Seconds per DSGD round of ByzFL's framework at the benchmark's settings, and a note."""
    try:
        import torch
    except ModuleNotFoundError as error:
        return f"ByzFL skipped: {error} (pip install torch==2.13.0; pip install --no-deps byzfl)", None
    modules, note = load_byzfl()
    if modules is None:
        return note, None
    # After a failed `import byzfl` (no torchvision), load_byzfl leaves a bare package in
    # which the framework's modules import alone (they need torch, numpy and scipy).
    import torch
    from byzfl.fed_framework import ByzantineClient, Client, Server
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data_x, data_y = (np.asarray(a) for a in synthetic_data())
    honest = N - F
    shards = np.array_split(np.arange(len(data_x)), honest)
    loaders = [DataLoader(TensorDataset(torch.from_numpy(data_x[s]), torch.from_numpy(
        data_y[s].astype(np.int64))), batch_size=BATCH, shuffle=True) for s in shards]
    common = {"model_name": "fc_mnist", "device": "cpu", "optimizer_name": "SGD",
              "learning_rate": LR, "weight_decay": 0.0, "milestones": [10**9],
              "learning_rate_decay": 1.0}
    clients = [Client({**common, "loss_name": "CrossEntropyLoss", "LabelFlipping": False,
                       "training_dataloader": loader, "momentum": BETA, "nb_labels": 10,
                       "store_per_client_metrics": False}) for loader in loaders]
    test = DataLoader(TensorDataset(torch.zeros(1, 784), torch.zeros(1, dtype=torch.int64)))
    server = Server({**common, "test_loader": test,
                     "aggregator_info": {"name": "TrMean", "parameters": {"f": F}},
                     "pre_agg_list": []})
    byz = ByzantineClient({"name": "ALittleIsEnough", "f": F, "parameters": {"tau": Z}})
    model = server.get_dict_parameters()
    for client in clients:
        client.set_model_state(model)

    def round_():  # the DSGD loop body of byzfl.benchmark.train
        for client in clients:
            client.compute_gradients()
        gradients = [client.get_flat_gradients_with_momentum() for client in clients]
        server.update_model_with_gradients(gradients + byz.apply_attack(gradients))
        new_model = server.get_dict_parameters()
        for client in clients:
            client.set_model_state(new_model)

    def rounds():
        for _ in range(steps):
            round_()

    seconds = _median_seconds(rounds, max(3, repeats // 3)) / steps
    if note.startswith("byzfl.aggregators only"):
        note = "import byzfl failed (no torchvision, needed by byzfl.benchmark only); " \
            "byzfl.fed_framework loaded without it"
    description = (
        f"{note}; torch {torch.__version__}, {torch.get_num_threads()} threads: "
        f"{honest} honest Client(fc_mnist, momentum {BETA}, DataLoader batch {BATCH}), "
        f"ByzantineClient(ALittleIsEnough, tau={Z}, f={F}), Server(TrMean f={F}, SGD lr "
        f"{LR}); one round = the DSGD loop body of byzfl.benchmark.train (gradients, "
        "momentum, attack, aggregation, server step, model sent back to the clients)")
    return description, seconds


# ----------------------------------------------------------------------------- (e) scale


def scale_point(n: int, rule: str, steps: int, repeats: int) -> dict:
    """Time per step and compiled memory of the defended step at ``n`` workers (f = n // 5)."""
    f = n // 5
    model, params, _, _, _ = mlp_problem(1, 1)
    data_x, data_y = synthetic_data()
    tx = defended(rule, n, f)
    run = make_run(model, tx, data_x, data_y, n, BATCH, steps)
    state, key = tx.init(params), jax.random.key(4)
    start = time.perf_counter()
    compiled = run.lower(params, state, key).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = None
    if memory is not None:
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    first = time.perf_counter()
    jax.block_until_ready(run(params, state, key))
    once = time.perf_counter() - first
    seconds = once if once > 5.0 else _median_seconds(
        functools.partial(run, params, state, key), repeats)
    return {"n": n, "rule": rule, "f": f, "step_s": seconds / steps, "compile_s": compile_s,
            "xla_bytes": peak, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * 1024}


def bench_scale(ns, steps: int, repeats: int, fresh: bool) -> str:
    points = []
    for n in ns:
        for rule in SCALE_RULES:
            if fresh:
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", str(n), rule,
                     "--steps", str(steps), "--repeats", str(repeats)],
                    capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                point = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                point = scale_point(n, rule, steps, repeats)
                point["rss_bytes"] = None
            points.append(point)
            print(f"  scale n={n:<5} {rule:<13} {point['step_s'] * 1e3:9.2f} ms/step", flush=True)
    body = []
    for p in points:
        prev = [q for q in points if q["rule"] == p["rule"] and q["n"] < p["n"]]
        exponent = ""
        if prev:
            q = prev[-1]
            exponent = f"{math.log(p['step_s'] / q['step_s']) / math.log(p['n'] / q['n']):.2f}"
        body.append([p["n"], p["f"], p["rule"], f"{p['step_s'] * 1e3:.2f}",
                     f"{p['step_s'] / p['n'] * 1e6:.0f}", exponent,
                     f"{p['xla_bytes'] / 2**20:.0f}" if p["xla_bytes"] else "",
                     f"{p['rss_bytes'] / 2**20:.0f}" if p["rss_bytes"] else "",
                     f"{p['compile_s']:.1f}"])
    table = tabulate(body, headers=["n", "f", "rule", "ms/step", "us/step/worker",
                                    "growth exp.", "XLA MiB", "RSS MiB", "compile s"],
                     tablefmt="github")
    # Beyond the sorting network's size the order statistics are one lax.sort over the workers.
    d = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(models.mlp((784,), 10).init(0)))
    sorts = []
    for n in (n for n in ns if n > order_stats.NETWORK_MAX_ROWS):
        x = jax.random.normal(jax.random.key(n), (n, d), jnp.float32)
        seconds = time_together({"sort": functools.partial(
            jax.jit(lambda u: jnp.sort(u, axis=0)), x)}, repeats=1)["sort"][0]
        sorts.append(f"lax.sort of [{n}, {d}] over the workers alone: {seconds * 1e3:.0f} ms "
                     f"({seconds / (n * d) * 1e9:.0f} ns per element).")
    return "\n".join([
        (f"Defended step (momentum {BETA}, ALIE z={Z} on the momenta, f = n // 5, server SGD), "
         f"MLP 784-100-10, b={BATCH}, {steps} steps per scan. 'growth exp.': log(t2/t1) / "
         "log(n2/n1) from the previous n (1 = linear). XLA MiB: arguments + outputs + "
         "temporaries of the compiled scan; RSS: peak resident memory of a fresh process for the "
         "point (jax, the data and the compiled program included)."),
        "", table, "",
        *sorts, *([""] if sorts else []),
        ("Reading the table: the gradients, momentum, ALIE and the mean are linear in n, up to "
         "caches (the [n, d] stack fits in cache at n = 25, 8 MB, not from n = 100, 32 MB). "
         f"The trimmed mean and the median order the workers by a sorting network up to n = "
         f"{order_stats.NETWORK_MAX_ROWS} (O(n log^2 n) compare-exchanges per coordinate, fused "
         "into one pass) and by lax.sort beyond, which XLA's CPU backend runs at tens of ns per "
         "element: the step jumps by an order of magnitude per worker past that n, and Krum "
         "with them, because its distances are centred on the coordinate-wise median. Krum's "
         "own [n, d] x [d, n] Gram matrix, O(n^2 d), is 159 GFLOP at n = 1000, under a second "
         "at the matmul rate: the sort dominates. At small n fixed costs (launch, server "
         "update, sampling) make growth sub-linear.")])


# ----------------------------------------------------------------------------- (f) privacy


def bench_privacy(repeats: int, rate: float, grad_flops: float) -> str:
    from rbyz import privacy

    _, params, loss_fn, x, y = mlp_problem(N, BATCH)
    capacity = privacy.PrivacyPlan(clip=1.0, batch_size=BATCH, dataset_sizes=(2400,) * N,
                                   steps=1).capacity
    _, _, _, x_cap, y_cap = mlp_problem(N, capacity, key=1)
    clipped = jax.vmap(privacy.clipped_grad(loss_fn, clip=1.0, normalize_by=BATCH),
                       in_axes=(None, 0, 0, 0))
    calls = {
        "per_worker_grads (unclipped)": (jax.jit(functools.partial(
            grads_lib.per_worker_grads, loss_fn)), (params, x, y)),
        f"per-example clipped, {BATCH} slots": (jax.jit(clipped), (
            params, x, y, jnp.ones((N, BATCH), bool))),
        f"per-example clipped, {capacity} slots (Poisson capacity)": (jax.jit(clipped), (
            params, x_cap, y_cap,
            jnp.broadcast_to(jnp.arange(capacity) < BATCH, (N, capacity)))),
    }
    timed = time_together({k: functools.partial(f, *a) for k, (f, a) in calls.items()},
                          repeats=repeats)
    base = timed["per_worker_grads (unclipped)"][0]
    floor = grad_flops / (rate * 1e9)
    body = [[k, f"{t * 1e3:.2f}", f"{t / floor:.1f}", f"{t / base:.2f}"]
            for k, (t, _) in timed.items()]
    table = tabulate(body, headers=["gradients (MLP 784-100-10, n=25)", "ms", "x floor",
                                    "x unclipped"], tablefmt="github")
    accounting = privacy.accounting
    events = {
        "RDP, Poisson": ("rdp", 0),
        "PLD, Poisson": ("pld", 0),
        f"PLD, Poisson truncated at {capacity}": ("pld", capacity),
    }
    rows = []
    for name, (accountant, cap) in events.items():
        m = accounting.Mechanism("gaussian", 1.0, 10_000, "poisson", 2400, BATCH, cap)
        times, eps = [], None
        for _ in range(3):
            started = time.perf_counter()
            eps = accounting.epsilon(m, 1e-5, accountant)
            times.append(time.perf_counter() - started)
        rows.append([name, f"{eps:.3f}", f"{np.median(times) * 1e3:.0f}"])
    acc_table = tabulate(rows, headers=["accountant, T = 10^4, q = 32/2400, z = 1", "epsilon",
                                        "ms"], tablefmt="github")
    return "\n".join([
        ("Per-example clipping (rbyz.privacy.clipped_grad, vmap of grad over each worker's "
         "examples inside the vmap over workers) beside the per-worker gradients of (b); "
         f"floor {floor * 1e3:.2f} ms (the unclipped gradients' FLOPs)."), "", table, "",
        acc_table])


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 repeats, 5 steps, scale n in {10, 50} in-process")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help="run only these sections")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (20; quick 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per scan (20; quick 5)")
    parser.add_argument("--scale-n", type=int, nargs="+", default=None,
                        help="worker counts of the scale table (10 25 100 400 1000)")
    parser.add_argument("--no-byzfl", action="store_true", help="do not time ByzFL")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--child", nargs=2, metavar=("N", "RULE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    steps = args.steps or (5 if args.quick else 20)

    if args.child:
        point = scale_point(int(args.child[0]), args.child[1], steps, max(3, repeats // 4))
        print(json.dumps(point))
        return

    sections = args.only or list(SECTIONS)
    print(machine(), flush=True)
    size, rate = matmul_rate(repeats)
    report = ["# rbyz training-step benchmark", "", f"Machine: {machine()}", "",
              "## (a) matmul rate", "",
              (f"float32 {size}x{size} matmul: {rate:.0f} GFLOP/s (median of {repeats}); the "
               "FLOP floor of a computation is its FLOPs at this rate."), ""]
    print(f"matmul {size}: {rate:.0f} GFLOP/s", flush=True)
    grad_flops, rbyz_step = None, None
    if "grads" in sections or "step" in sections or "byzfl" in sections:
        text, grad_flops = bench_grads(repeats, rate)
        if "grads" in sections:
            report += ["## (b) per-worker gradients", "", text, ""]
            print(text, flush=True)
    if "step" in sections or "byzfl" in sections:
        text, _ = bench_step(repeats, steps, rate, grad_flops)
        report += ["## (c) the defended step", "", text, ""]
        print(text, flush=True)
        text, rbyz_step = bench_harness(repeats, steps)
        report += ["## (c') the harness's step, and seeds batched with vmap", "", text, ""]
        print(text, flush=True)
    if "byzfl" in sections:
        if args.no_byzfl:
            note, seconds = "ByzFL skipped (--no-byzfl)", None
        else:
            note, seconds = byzfl_step(repeats, max(2, steps // 4))
        lines = [f"ByzFL: {note}."]
        if seconds is not None:
            lines.append(f"ByzFL {seconds * 1e3:.1f} ms per round; rbyz {rbyz_step * 1e3:.2f} ms "
                         f"per step (25 gradients, the 5 Byzantine rows replaced; ByzFL computes "
                         f"20): rbyz is {seconds / rbyz_step:.1f}x faster.")
        report += ["## (d) ByzFL's framework step", "", *lines, ""]
        print("\n".join(lines), flush=True)
    if "privacy" in sections:
        if grad_flops is None:
            _, grad_flops = bench_grads(max(2, repeats // 4), rate)
        text = bench_privacy(repeats, rate, grad_flops)
        report += ["## (f) privacy: per-example clipping and the accountant", "", text, ""]
        print(text, flush=True)
    if "scale" in sections:
        ns = args.scale_n or ([10, 50] if args.quick else [10, 25, 100, 400, 1000])
        # Few steps per scan: beyond n = 64 a step takes up to seconds (see the table's note).
        text = bench_scale(ns, steps=3, repeats=2 if args.quick else 3, fresh=not args.quick)
        report += ["## (e) scale on one device", "", text, ""]
        print(text, flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            handle.write("\n".join(report))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
