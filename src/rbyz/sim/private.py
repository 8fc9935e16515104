"""The ``privacy`` section of an experiment: its checks, its plan, its ε.

:func:`check` runs with the other checks of :func:`rbyz.sim.defences.defence`, before any data
is read; :func:`plan` builds the :class:`rbyz.privacy.PrivacyPlan` once the data split is known
(every worker's record count), with the noise set by ``b``, ``noise_multiplier`` or a target
``epsilon``; :func:`describe` is what ``rbyz privacy`` prints.

Example:
  >>> from rbyz.sim import config
  >>> exp = config.from_dict({"workers": {"n": 4, "f": 0}, "train": {"steps": 1000},
  ...                         "data": {"batch_size": 128},
  ...                         "privacy": {"enabled": True, "b": 0.01}})
  >>> p = plan(exp, [6000] * 4)
  >>> round(float(p.noise_multipliers()[0]), 2), p.sampling
  (1.28, 'poisson')
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rbyz import privacy
from rbyz.sim.config import Experiment

# The algorithms whose workers do not each send one function of their own records.
_CODED = ("detox", "draco", "election_coding")
_NOISY = ("noisy_sign_sgd", "noisy_median_sgd")


def _fail(field: str, message: str):
    raise ValueError(f"config: {field}: {message}")


def sampling(exp: Experiment) -> str:
    """The sampling ``privacy.sampling`` stands for (``"auto"``: full batch or Poisson)."""
    chosen = exp.privacy.sampling
    if chosen == "auto":
        return "full" if exp.data.batch_size == 0 else "poisson"
    return chosen


def check(exp: Experiment) -> None:
    """Every setting of ``exp.privacy`` that can be checked before the data is read."""
    cfg = exp.privacy
    if not cfg.enabled:
        return
    rule = exp.defence.rule
    if rule in _CODED:
        _fail("privacy.enabled", f"{rule} sends functions of shared data (a record is in "
                                 f"several workers' messages), so a worker's own noise does "
                                 f"not bound what one record reveals; privacy runs with an "
                                 f"aggregator or {', '.join(_NOISY)}.")
    if rule in _NOISY and "b" in exp.defence.hparams:
        _fail("defence.hparams.b", f"with privacy enabled the noise of {rule} is the privacy "
                                   f"noise: remove defence.hparams.b and set privacy.b (the "
                                   f"same b), privacy.noise_multiplier or privacy.epsilon.")
    given = {k: getattr(cfg, k) for k in ("b", "noise_multiplier", "epsilon")}
    for key, value in given.items():
        if not (math.isfinite(value) and value >= 0):
            _fail(f"privacy.{key}", f"must be a finite number >= 0 (0: not set); got {value}.")
    if sum(v > 0 for v in given.values()) > 1:
        _fail("privacy", f"set the noise one way: b, noise_multiplier or epsilon; got "
                         f"{', '.join(f'{k}={v}' for k, v in given.items() if v > 0)}.")
    chosen = sampling(exp)
    if chosen not in privacy.accounting.SAMPLINGS:
        _fail("privacy.sampling", f"must be 'auto' or one of "
                                  f"{', '.join(privacy.accounting.SAMPLINGS)}; got {chosen!r}.")
    if (chosen == "full") != (exp.data.batch_size == 0):
        _fail("privacy.sampling", f"{chosen!r} sampling needs "
                                  f"{'data.batch_size = 0 (full batch)' if chosen == 'full' else 'data.batch_size >= 1'}"
                                  f"; got data.batch_size = {exp.data.batch_size}.")
    if cfg.microbatch < 0:
        _fail("privacy.microbatch", f"must be >= 0 (0: the whole batch at once); got "
                                    f"{cfg.microbatch}.")
    if cfg.at == "server":
        try:
            privacy.central_noise(rule, stddev=0.0, key=0)
        except ValueError as err:
            _fail("privacy.at", str(err))
        if exp.defence.pre:
            _fail("privacy.at", f"central noise is sized for the mean of the workers' releases; "
                                f"the pre-aggregators {list(exp.defence.pre)} change it. Remove "
                                f"them or use privacy.at = 'worker'.")
    # The plan's own checks (clip, delta, noise and norm, accountant support), on placeholder
    # sizes: the real ones are checked by plan() once the split is known.
    size = max(exp.data.batch_size, 1)
    plan(exp, [size] * exp.workers.n, calibrate=False)


def plan(exp: Experiment, dataset_sizes: Sequence[int], *,
         calibrate: bool = True) -> privacy.PrivacyPlan:
    """The run's :class:`rbyz.privacy.PrivacyPlan` for workers holding ``dataset_sizes``
    records, its noise set from ``b``, ``noise_multiplier`` or ``epsilon``."""
    cfg = exp.privacy
    try:
        built = privacy.PrivacyPlan(
            clip=cfg.clip, batch_size=exp.data.batch_size,
            dataset_sizes=tuple(int(n) for n in dataset_sizes), steps=exp.train.steps,
            sampling=sampling(exp), noise=cfg.noise, stddev=cfg.b, max_batch=cfg.max_batch,
            norm=cfg.norm, delta=cfg.delta, accountant=cfg.accountant, at=cfg.at)
        if cfg.noise_multiplier > 0:
            built = built.with_noise_multiplier(cfg.noise_multiplier)
        if cfg.epsilon > 0 and calibrate:
            built = built.with_epsilon(cfg.epsilon)
    except ValueError as err:
        _fail("privacy", str(err).removeprefix("PrivacyPlan: "))
    return built


def describe(exp: Experiment, dataset_sizes: Sequence[int],
             target_epsilon: float | None = None) -> list[dict]:
    """Rows for ``rbyz privacy``: one per distinct worker size, with its sampling rate, noise
    multiplier and ε for the run (and, with ``target_epsilon``, the noise that reaches it)."""
    p = plan(exp, dataset_sizes)
    targets = p.with_epsilon(target_epsilon) if target_epsilon else None
    z, eps = p.noise_multipliers(), p.epsilons()
    rows = []
    sizes = np.asarray(p.dataset_sizes)
    for size in sorted(set(p.dataset_sizes)):
        i = int(np.argmax(sizes == size))
        row = {"records": size, "workers": int(np.sum(sizes == size)),
               "rate": (1.0 if p.sampling == "full" else p.batch_size / size),
               "b": p.stddev, "noise_multiplier": float(z[i]), "epsilon": float(eps[i]),
               "delta": p.delta}
        if targets is not None:
            row.update({"target_epsilon": target_epsilon, "b_for_target": targets.stddev,
                        "z_for_target": float(targets.noise_multipliers()[i])})
        rows.append(row)
    return rows


__all__ = ("check", "describe", "plan", "sampling")
