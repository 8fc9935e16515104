"""The diagnostics as a figure: why a defence fails, beside the accuracy curves of the report.

A run with ``diagnostics.enabled = true`` writes ``diagnostics.csv`` (one row per step, see
:mod:`rbyz.sim.diagnostics`); :func:`rbyz.sim.report.report` then adds ``diagnostics.png``
(:data:`rbyz.sim.report.DIAGNOSTICS_PNG`), drawn by :func:`plot_diagnostics`:

- the first panel is the rebuttal's figure of Baruch et al. (NeurIPS 2019): per iteration, the
  share of the coordinates with ``|mu_j| < z sigma_j`` over the workers' true gradients, for each
  logged ``z``, during the first ``first`` iterations (mean over the runs without an attack, or
  over all runs when every run is attacked): the coordinates an attacker can flip;
- one panel per attack then shows, for each defence, the Byzantine rows' share of the aggregate
  (a moving mean over ``window`` steps, and over seeds), beside the ``f/n`` the mean gives them:
  a rule above that line follows the attackers more than the plain mean does.

Example:
  >>> import tempfile
  >>> from pathlib import Path
  >>> rows = [{"run": f"{rule}__{attack}", "rule": rule, "attack": attack, "f": 1, "n": 5,
  ...          "heterogeneity": "iid", "seed": 0, "step": step, "test_accuracy": None,
  ...          "train_loss": 1.0, "below_z0.5": 40, "below_z1": 70, "coordinates": 100,
  ...          "byzantine_share": 1.0 if rule == "krum" and attack != "none" else 0.2}
  ...         for rule in ("mean", "krum") for attack in ("none", "alie") for step in range(1, 31)]
  >>> path = Path(tempfile.mkdtemp()) / "diagnostics.png"
  >>> plot_diagnostics(rows, path)
  >>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
  True
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from rbyz.sim import plots
from rbyz.sim import report as report_lib
from rbyz.sim.checkpoint import DIAGNOSTICS

_BELOW = re.compile(r"^below_z(.+)$")


def collect(directory: str | Path) -> list[dict]:
    """Every row of every ``diagnostics.csv`` under ``directory`` (recursively; ``[]`` if none).

    Each run writes its own file (the sweep does not copy them), so a run's rows are read once.
    """
    rows: list[dict] = []
    for path in sorted(Path(directory).rglob(DIAGNOSTICS)):
        rows += report_lib.read_results(path)
    return rows


def _zs(rows: list[dict]) -> list[str]:
    columns = {c for r in rows for c in r if _BELOW.match(c)}
    return sorted(columns, key=lambda c: float(_BELOW.match(c).group(1)))


def _mean_by_step(rows: Iterable[Mapping], value) -> tuple[np.ndarray, np.ndarray]:
    by_step: dict[int, list[float]] = {}
    for r in rows:
        v = value(r)
        by_step.setdefault(r["step"], []).append(np.nan if v is None else float(v))
    steps = np.array(sorted(by_step))
    with np.errstate(all="ignore"):
        means = np.array([np.nanmean(by_step[s]) if not np.isnan(by_step[s]).all() else np.nan
                          for s in steps])
    return steps, means


def _moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    if values.size < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_diagnostics(rows: Iterable[Mapping], path: str | Path, *, first: int = 50,
                     window: int = 10) -> None:
    """Writes the diagnostics figure (atomically): coordinates an attacker can flip, and the
    Byzantine share of each defence's aggregate under each attack.

    Args:
      rows: diagnostics rows (:func:`collect`): the results columns plus ``below_z<z>``,
        ``coordinates`` and ``byzantine_share``.
      path: the PNG file.
      first: the iterations of the first panel (the rebuttal plots the first 50).
      window: the moving mean of the share panels, in steps.

    Raises:
      ValueError: no rows, or rows without the diagnostic columns (saying how to log them).
      ImportError: matplotlib missing (``pip install 'rbyz[experiments]'``).
    """
    rows = [dict(r) for r in rows]
    zs = _zs(rows)
    if not rows or not zs or any("coordinates" not in r for r in rows):
        raise ValueError("plot_diagnostics: no diagnostics rows (below_z<z>, coordinates, "
                         "byzantine_share); run with `[diagnostics] enabled = true` "
                         "(or `--set diagnostics.enabled=true`).")
    attacks = report_lib._attack_order(rows)
    attacked = [a for a in attacks if a != report_lib.NO_ATTACK]
    rules = report_lib._first_seen(r["rule"] for r in rows)
    colours = plots._colours(rules)
    fig = plots._figure("plot_diagnostics", figsize=(0.8 + 4.0 * (1 + len(attacked)), 3.4),
                             layout="constrained")
    axes = fig.subplots(1, 1 + len(attacked), squeeze=False)[0]

    clean = [r for r in rows if r["attack"] == report_lib.NO_ATTACK] or rows
    early = [r for r in clean if r["step"] <= first]
    for z in zs:
        steps, share = _mean_by_step(early, lambda r, z=z: r[z] / r["coordinates"])
        axes[0].plot(steps, share, label=f"z = {_BELOW.match(z).group(1)}")
    d = report_lib._first_seen(r["coordinates"] for r in rows)
    axes[0].set_title(f"coordinates an attacker can flip (d = {d[0]})" if len(d) == 1 else
                      "coordinates an attacker can flip", fontsize=10)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("share with |mu_j| < z sigma_j")
    axes[0].set_ylim(0, 1)
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)

    for ax, attack in zip(axes[1:], attacked):
        here = [r for r in rows if r["attack"] == attack]
        for rule in rules:
            cell = [r for r in here if r["rule"] == rule]
            if not cell:
                continue
            steps, share = _mean_by_step(cell, lambda r: r["byzantine_share"])
            if np.isnan(share).all():   # a sign vote or a whole algorithm: no share defined
                continue
            smooth = _moving_mean(share, window)
            ax.plot(steps[len(steps) - len(smooth):], smooth, color=colours[rule], label=rule)
        for share in {r["f"] / r["n"] for r in here}:
            ax.axhline(share, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{attack}: whom the rule follows", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    if attacked:
        axes[1].set_ylabel(f"Byzantine share of the aggregate\n({window}-step mean; dotted: f/n)")
        plots._legend(fig, axes[1:])
    common = report_lib._constants(rows)
    seeds = len(report_lib._first_seen(r["seed"] for r in rows))
    fig.suptitle("Why a defence fails" + (f": {common}" if common else "")
                 + (f"; mean over {seeds} seeds" if seeds > 1 else ""), fontsize=11)
    plots._save(fig, path)


__all__ = ("collect", "plot_diagnostics")
