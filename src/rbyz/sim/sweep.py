"""Sweeps: a grid of experiments, one run directory each, resumable, with one report.

:func:`run_sweep` expands a sweep document (:func:`rbyz.sim.config.expand`), checks every
experiment of the grid before training any (a bad rule, attack or constraint anywhere in the
grid fails at once), then trains them in order, each in ``out/<run id>/``. The run id is readable
(rule, attack, ``f``, heterogeneity, seed) and ends with a hash of the resolved config, so that a
re-run of the sweep skips every finished run, resumes a half-written one from its checkpoint, and
never mixes two different experiments. The rows of all runs are gathered into ``out/results.csv``
and the report (:func:`rbyz.sim.report.report`: the table with each rule's worst-case attack, the
accuracy plot and the heatmap) is written beside it.

Example:
  >>> import tempfile
  >>> doc = {"data": {"dataset": "synthetic"}, "model": {"name": "logistic"},
  ...        "workers": {"n": 5, "f": 1}, "train": {"steps": 20, "eval_every": 20},
  ...        "sweep": {"defence": [{"rule": "mean"}, {"rule": "median"}],
  ...                  "attack": [{"name": "none"}, {"name": "sign_flip"}]}}
  >>> rows = run_sweep(doc, tempfile.mkdtemp())
  >>> sorted({(r["rule"], r["attack"]) for r in rows})
  [('mean', 'none'), ('mean', 'sign_flip'), ('median', 'none'), ('median', 'sign_flip')]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from rbyz.sim import checkpoint, parallel, report
from rbyz.sim import config as config_lib
from rbyz.sim import partition as partition_lib
from rbyz.sim import train as train_lib


def run_id(exp: config_lib.Experiment) -> str:
    """``rule__attack__f5__iid__s0__<8 hex digits of the config's hash>``."""
    document = config_lib.to_dict(exp)
    if not exp.privacy.enabled:  # the ids of runs without privacy stay those before it existed
        del document["privacy"]
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode())
    het = partition_lib.heterogeneity_label(
        exp.data.partition, alpha=exp.data.alpha,
        classes_per_worker=exp.data.classes_per_worker, gamma=exp.data.gamma)
    parts = (exp.rule_label, exp.attack_label, f"f{exp.workers.f}", het, f"s{exp.seed}")
    slug = "__".join(re.sub(r"[^A-Za-z0-9.+=-]+", "-", p).strip("-") for p in parts)
    return f"{slug}__{digest.hexdigest()[:8]}"


def check_all(grid: Sequence[config_lib.Experiment]) -> None:
    """Builds every experiment's defence and placement on the devices (no data, no compute):
    the first bad one raises, named by its run id."""
    for exp in grid:
        try:
            parallel.placement(exp, train_lib.defence(exp).units)
        except ValueError as err:
            raise ValueError(f"sweep run {run_id(exp)}: {err}") from None


def run_sweep(document: Mapping, out: str | Path, *, overrides: Sequence[str] = (),
              progress: bool = False) -> list[dict]:
    """Runs (or finishes) every experiment of a sweep document; returns all rows.

    Args:
      document: a parsed sweep TOML (a base experiment and a ``[sweep]`` table of axes).
      out: the sweep directory.
      overrides: ``section.field=value`` overrides applied to the base before expanding.
      progress: progress bars over the runs and the steps.

    Returns:
      The rows of every run (also written to ``out/results.csv``, with the report).
    """
    document = dict(document)
    sweep = document.pop("sweep", None)
    base = config_lib.override(config_lib.from_dict(document), overrides)
    grid = config_lib.expand({**config_lib.to_dict(base), "sweep": sweep or {}})
    ids = [run_id(exp) for exp in grid]
    if len(set(ids)) < len(ids):
        raise ValueError("sweep: two runs of the grid are the same experiment; remove the "
                         "repeated axis values.")
    check_all(grid)
    out = Path(out)
    runs = list(zip(ids, grid))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), unit="run", desc="sweep")
    rows: list[dict] = []
    for name, exp in runs:
        store = checkpoint.Store(out / name, exp)
        if store.finished():
            rows += store.rows()
        else:
            rows += train_lib.train(exp, run_dir=out / name, run=name, progress=progress).rows
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{exp.rule_label} / {exp.attack_label}")
    if bar is not None:
        bar.close()
    report.write_results(out / checkpoint.RESULTS, rows)
    report.report(out)
    return rows


__all__ = ("check_all", "run_id", "run_sweep")
