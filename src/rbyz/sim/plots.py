"""The report's figures: accuracy curves per attack and the final-accuracy heatmap.

Drawn with matplotlib on a ``Figure`` without pyplot (no global backend is touched, so a
notebook's inline backend keeps working; PNGs render with Agg), from the rows of
:mod:`rbyz.sim.report`; every PNG is written atomically. :func:`rbyz.sim.report.report` draws
both for a run or sweep directory, :mod:`rbyz.sim.diagnostics_plot` the diagnostics with the same
helpers.

Example:
  >>> import tempfile
  >>> from pathlib import Path
  >>> from rbyz.sim import report
  >>> out = Path(tempfile.mkdtemp())
  >>> plot_heatmap(report._demo_rows(), out / "heatmap.png")
  >>> (out / "heatmap.png").stat().st_size > 0
  True
"""

from __future__ import annotations

import io as _stdio
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rbyz.sim import io
from rbyz.sim.report import (
    NO_ATTACK,
    SETTING,
    _attack_order,
    _constants,
    _first_seen,
    _groups,
    _higher_is_better,
    _need,
    _scale,
    _setting_label,
    _varying,
)


def _figure(caller: str, **kw):
    figure = _need("matplotlib.figure", caller)
    return figure.Figure(**kw)


def _save(fig, path: str | Path) -> None:
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    io.atomic_write_bytes(path, buf.getvalue())


def _colours(rules: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(rules) <= 10 else "tab20"]
    return {rule: cmap(i % cmap.N) for i, rule in enumerate(rules)}


def _legend(fig, axes: Iterable, title: str = "defence") -> None:
    """One legend on the figure's right for the lines of all ``axes``, each label once."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside right center", title=title, frameon=False)


def _label(value: str) -> str:
    text = value.replace("_", " ")
    return f"{text} (%)" if _scale(value) != 1.0 else text


def _attack_title(attack: str) -> str:
    return "no attack" if attack == NO_ATTACK else attack


def plot_accuracy(rows: Iterable[Mapping], path: str | Path, *,
                  value: str = "test_accuracy") -> None:
    """Curves of ``value`` against training steps: one panel per attack, one line per defence.

    Each line is the mean over seeds at each evaluation step, with a band of ± one standard
    deviation when there are several seeds. With several settings, one row of panels per
    setting. The PNG is written atomically.

    Args:
      rows: results rows (every evaluation step).
      path: the PNG file.
      value: the column plotted.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> from rbyz.sim import report
      >>> path = Path(tempfile.mkdtemp()) / "accuracy.png"
      >>> plot_accuracy(report._demo_rows(), path)  # 2 defences x 2 attacks x 2 seeds
      >>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
      True
    """
    rows = [dict(r) for r in rows]
    groups = _groups(rows, value, "plot_accuracy")  # checks rows and value
    settings = [s for s, _ in groups]
    varying = _varying(settings)
    attacks = _attack_order(rows)
    rules = _first_seen(r["rule"] for r in rows)
    scale = _scale(value)
    seeds = max(c.seeds for _, c in groups)
    ncols, nrows = len(attacks), len(settings)
    fig = _figure("plot_accuracy", figsize=(0.6 + 3.6 * ncols, 0.9 + 3.0 * nrows),
                  layout="constrained")
    colours = _colours(rules)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    for i, setting in enumerate(settings):
        in_setting = [r for r in rows if tuple(r[c] for c in SETTING) == setting]
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            for rule in rules:
                cell = [r for r in in_setting if r["rule"] == rule and r["attack"] == attack]
                if not cell:
                    continue
                by_step: dict[int, list[float]] = {}
                for r in cell:
                    v = r[value]
                    by_step.setdefault(r["step"], []).append(
                        float("nan") if v is None else scale * float(v))
                steps = np.array(sorted(by_step))
                vals = [np.asarray(by_step[s], np.float64) for s in steps]
                mean = np.array([v.mean() for v in vals])
                ax.plot(steps, mean, color=colours[rule], label=rule, linewidth=1.6,
                        marker="o", markersize=2.5)
                if seeds > 1:
                    sd = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in vals])
                    ax.fill_between(steps, mean - sd, mean + sd, color=colours[rule],
                                    alpha=0.15, linewidth=0)
            if i == 0:
                ax.set_title(_attack_title(attack), fontsize=11)
            ax.grid(True, alpha=0.3)
            if i == nrows - 1:
                ax.set_xlabel("step")
            if j == 0:
                # Several settings: each row of panels is named on its left.
                ax.set_ylabel(_label(value) if nrows == 1 else
                              f"{_setting_label(setting, varying)}\n{_label(value)}")
    if scale != 1.0:
        axes[0][0].set_ylim(0, 100)
    _legend(fig, axes.flat)
    common = _constants(rows)
    spread = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"{_label(value).capitalize()} during training\n"
                 + (f"{common}; " if common else "") + spread, fontsize=12)
    _save(fig, path)


def plot_heatmap(rows: Iterable[Mapping], path: str | Path, *,
                 value: str = "test_accuracy") -> None:
    """A heatmap of final ``value``: defences (rows) x attacks (columns) and each defence's worst
    case (the last column), every cell annotated; one panel per setting. Written atomically.

    Accuracies are coloured on a fixed 0-100 % scale (figures of different sweeps compare);
    other values on their range. Missing combinations are grey.

    Args:
      rows: results rows (every step, or the final ones).
      path: the PNG file.
      value: the column shown.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> from rbyz.sim import report
      >>> path = Path(tempfile.mkdtemp()) / "heatmap.png"
      >>> plot_heatmap(report._demo_rows(), path)  # 2 defences x 2 attacks x 2 seeds
      >>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
      True
    """
    rows = [dict(r) for r in rows]
    groups = _groups(rows, value, "plot_heatmap")
    varying = _varying([s for s, _ in groups])
    scale = _scale(value)
    better = _higher_is_better(value)
    panels = []
    for setting, cells in groups:
        attacks = cells.attacks
        has_worst = any(a != NO_ATTACK for a in attacks)
        columns = [_attack_title(a) for a in attacks] + (["worst case"] if has_worst else [])
        grid = np.full((len(cells.rules), len(columns)), np.nan)
        notes = [[""] * len(columns) for _ in cells.rules]
        for i, rule in enumerate(cells.rules):
            for j, attack in enumerate(attacks):
                s = cells.stats(rule, attack)
                if s is not None:
                    grid[i, j] = scale * s[0]
                    notes[i][j] = cells.text(*s).replace(" ± ", "\n± ")
            if has_worst:
                w = cells.worst(rule)
                if w is not None:
                    grid[i, -1] = scale * w[1]
                    notes[i][-1] = f"{cells.text(w[1], float('nan'))}\n{w[0]}"
        panels.append((setting, cells, columns, grid, notes, has_worst))
    width = max(len(p[2]) for p in panels)
    height = sum(len(p[1].rules) for p in panels)
    # Sized by the cells (a floor keeps the colour bar's label inside a one-cell figure).
    fig = _figure("plot_heatmap", layout="constrained",
                  figsize=(max(5.0, 2.6 + 1.25 * width),
                           max(3.4, 1.2 + 0.5 * height + 0.5 * len(panels))))
    axes = fig.subplots(len(panels), 1, squeeze=False,
                        height_ratios=[len(p[1].rules) for p in panels])[:, 0]
    everything = np.concatenate([p[3].ravel() for p in panels])
    finite = everything[np.isfinite(everything)]
    if scale != 1.0:
        lo, hi = 0.0, 100.0
    elif finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        lo, hi = (lo - 1.0, hi + 1.0) if lo == hi else (lo, hi)
    else:
        lo, hi = 0.0, 1.0
    import matplotlib

    cmap = matplotlib.colormaps["viridis" if better else "viridis_r"].with_extremes(bad="#d9d9d9")
    image = None
    for ax, (setting, cells, columns, grid, notes, has_worst) in zip(axes, panels):
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi,
                          aspect="auto")
        ax.set_xticks(range(len(columns)), columns)
        if max(len(c) for c in columns) > 12:  # long attack labels would run into each other
            ax.tick_params(axis="x", labelrotation=25)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("left")
        ax.set_yticks(range(len(cells.rules)), cells.rules)
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        for spine in ax.spines.values():
            spine.set_visible(False)
        # White gaps between cells, and a wider one before the worst-case column.
        ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(cells.rules)), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        if has_worst:
            ax.axvline(len(columns) - 1.5, color="white", linewidth=5)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid[i, j]
                if np.isnan(v):
                    ax.text(j, i, "n/a" if not notes[i][j] else notes[i][j], ha="center",
                            va="center", fontsize=8, color="#555555")
                    continue
                r, g, b, _ = cmap((v - lo) / (hi - lo))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8,
                        color="white" if dark else "black", linespacing=1.1)
        if len(panels) > 1:
            ax.set_title(_setting_label(setting, varying), fontsize=11, loc="left",
                         fontweight="bold")
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02)
    bar.set_label(f"final {_label(value)}")
    common = _constants(rows)
    seeds = max(p[1].seeds for p in panels)
    spread = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"Final {_label(value)}\n" + (f"{common}; " if common else "") + spread,
                 fontsize=12)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# The report of a directory.


__all__ = ("plot_accuracy", "plot_heatmap")
