"""Results as tidy rows, and what a person looks at: the table, the curves, the heatmap.

A run writes ``results.csv``: one row per (run, evaluation step), with the columns of
:data:`COLUMNS` first and any extras after them (``test_loss``, ``wall_s``, ``dataset``, ...),
sorted by name. A row is a plain dict::

    {"run": "median__alie__f5__iid__s0__1a2b3c4d", "rule": "median", "attack": "alie",
     "f": 5, "n": 25, "heterogeneity": "iid", "seed": 0, "step": 300,
     "test_accuracy": 0.8123, "train_loss": 0.61, "wall_s": 12.5}

A *run* is identified by ``RUN_KEY`` (its name with the settings that make it; two run
directories that reuse a name for different rules stay apart), a *setting* by ``SETTING``
(``n``, ``f``, heterogeneity): runs of one setting that differ only in seed are replicates, and
every figure of the report is a mean (± standard deviation) over them.

:func:`accuracy_table` prints the final test accuracy of each defence (rows) under each attack
(columns, ``none`` first), and a *worst case* column: for each defence, the attack (other than
``none``) that leaves it the lowest mean final accuracy, the worst-case attack selection of
ByzFL (Allouah et al. 2024). :func:`report` does it all for a run or sweep directory.

Example:
  >>> rows = _demo_rows()  # 2 defences x {none, alie} x 2 seeds, evaluated at steps 10 and 20
  >>> print(accuracy_table(rows))
  | defence   |       none |       alie | worst case        |
  |:----------|-----------:|-----------:|:------------------|
  | mean      | 80.5 ± 0.7 | 20.5 ± 0.7 | 20.5 ± 0.7 (alie) |
  | median    | 78.5 ± 0.7 | 70.5 ± 0.7 | 70.5 ± 0.7 (alie) |
  >>> {rule: (attack, round(acc, 3)) for rule, (attack, acc) in worst_case(rows).items()}
  {'mean': ('alie', 0.205), 'median': ('alie', 0.705)}

References:
  Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Rizk, Voitovych. "Byzantine-robust federated
  learning: impact of client subsampling and local updates" / ByzFL library (EPFL DCL), 2024:
  worst-case attack selection over a grid of attacks.
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rbyz.sim import io

COLUMNS = ("run", "rule", "attack", "f", "n", "heterogeneity", "seed", "step", "test_accuracy",
           "train_loss")
"""The columns every results row has, in the order they are written."""

TYPES = {"run": str, "rule": str, "attack": str, "f": int, "n": int, "heterogeneity": str,
         "seed": int, "step": int, "test_accuracy": float, "train_loss": float}
"""The type of each of :data:`COLUMNS` (what :func:`read_results` gives back)."""

RUN_KEY = ("run", "rule", "attack", "f", "n", "heterogeneity", "seed")
"""The columns that identify one run."""

SETTING = ("n", "f", "heterogeneity")
"""The columns that identify a setting: one table (one row of plots) per setting."""

NO_ATTACK = "none"
RESULTS = "results.csv"
REPORT = "report.md"
ACCURACY_PNG = "accuracy.png"
HEATMAP_PNG = "heatmap.png"
DIAGNOSTICS_PNG = "diagnostics.png"

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)",
                    re.IGNORECASE)


def _need(module: str, caller: str):
    """Imports an optional dependency of the report, or says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"rbyz.sim.report.{caller} needs {module.split('.')[0]}: "
                          f"{io.EXPERIMENTS_HINT}") from err


# ---------------------------------------------------------------------------------------------
# The tidy CSV.


def _cell(value: Any, where: str) -> str:
    """One value as CSV text that :func:`read_results` types back exactly."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back to the same float; nan, inf too
    if isinstance(value, str):
        return value
    raise ValueError(f"write_results: {where} is {type(value).__name__} {value!r}; results hold "
                     f"strings, numbers, booleans or None.")


def _check_row(row: Mapping, index: int) -> None:
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ValueError(f"write_results: row {index} lacks the column(s) {', '.join(missing)}; "
                         f"every row needs {', '.join(COLUMNS)}.")
    for column, kind in TYPES.items():
        value = row[column]
        if isinstance(value, np.generic):
            value = value.item()
        ok = (isinstance(value, str) if kind is str
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"write_results: row {index}, column {column!r} must be "
                             f"{kind.__name__}; got {type(value).__name__} {value!r}.")


def _columns(rows: Sequence[Mapping]) -> list[str]:
    extras = sorted({k for row in rows for k in row} - set(COLUMNS))
    return [*COLUMNS, *extras]


def write_results(path: str | Path, rows: Iterable[Mapping]) -> None:
    """Writes the rows as a tidy CSV, atomically.

    The columns are :data:`COLUMNS`, then the extra columns of any row, sorted by name (a row
    without an extra column leaves its cell empty). Floats are written with ``repr`` (exact;
    ``nan`` and ``inf`` as such), booleans as ``true``/``false``, ``None`` as an empty cell.

    Args:
      path: the file (``results.csv`` of a run directory).
      rows: dicts with at least the :data:`COLUMNS`, of the types in :data:`TYPES`.

    Raises:
      ValueError: a row lacks a column or holds a value of the wrong type (naming the row and
        the column), before anything is written.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "results.csv"
      >>> row = {"run": "r0", "rule": "median", "attack": "alie", "f": 1, "n": 5,
      ...        "heterogeneity": "iid", "seed": 0, "step": 20, "test_accuracy": 0.75,
      ...        "train_loss": float("nan"), "wall_s": 1.5}
      >>> write_results(path, [row])
      >>> print(path.read_text(), end="")
      run,rule,attack,f,n,heterogeneity,seed,step,test_accuracy,train_loss,wall_s
      r0,median,alie,1,5,iid,0,20,0.75,nan,1.5
      >>> back = read_results(path)[0]
      >>> back["step"], back["test_accuracy"], back["train_loss"], back["wall_s"]
      (20, 0.75, nan, 1.5)
    """
    rows = list(rows)
    for i, row in enumerate(rows):
        _check_row(row, i)
    columns = _columns(rows)
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for i, row in enumerate(rows):
        writer.writerow([_cell(row.get(c), f"row {i}, column {c!r}") for c in columns])
    io.atomic_write_text(path, buf.getvalue())


def _parse(text: str, kind: type, where: str):
    if kind is str:
        return text
    if kind is int and _INT.fullmatch(text):
        return int(text)
    if kind is float and _FLOAT.fullmatch(text):
        return float(text)
    raise ValueError(f"{where}: {text!r} is not {'an integer' if kind is int else 'a number'}.")


def _infer(cells: Sequence[str]) -> type:
    """The type of an extra column: bool, int or float when every non-empty cell is one, else
    str (the type is the column's, so that a label column of digits stays one type)."""
    filled = [c for c in cells if c != ""]
    if not filled:
        return str
    if all(c in ("true", "false") for c in filled):
        return bool
    if all(_INT.fullmatch(c) for c in filled):
        return int
    if all(_FLOAT.fullmatch(c) for c in filled):
        return float
    return str


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results CSV written by :func:`write_results`, typed back.

    The :data:`COLUMNS` get their types of :data:`TYPES`; an extra column is typed as a whole:
    booleans, ints or floats when every non-empty cell is one (empty cells then read as
    ``None``), else strings. Parsed with :mod:`csv` and regular expressions: nothing is
    evaluated.

    Args:
      path: the CSV file.

    Returns:
      One dict per line after the header, with the header's columns as keys.

    Raises:
      ValueError: an empty file, a header without the :data:`COLUMNS`, a line with the wrong
        number of fields, or a value of the wrong type, naming the file and the line.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "results.csv"
      >>> io.atomic_write_text(path, ",".join(COLUMNS) + "\\nr0,mean,none,0,5,iid,0,ten,0.5,0.1\\n")
      >>> read_results(path)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: .../results.csv, line 2, column 'step': 'ten' is not an integer.
    """
    path = Path(path)
    records: list[tuple[int, list[str]]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: the file is empty; a results file starts with the "
                                 f"header line {','.join(COLUMNS)}.")
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}, line 1: the header lacks the column(s) "
                                 f"{', '.join(missing)}; it is not a results file of rbyz.")
            if len(set(header)) < len(header):
                raise ValueError(f"{path}, line 1: a column is named twice in the header.")
            for fields in reader:
                if not fields:
                    continue  # a blank line (e.g. a final one added by hand)
                if len(fields) != len(header):
                    raise ValueError(f"{path}, line {reader.line_num}: {len(fields)} fields; "
                                     f"the header has {len(header)}.")
                records.append((reader.line_num, fields))
        except csv.Error as err:
            raise ValueError(f"{path}, line {reader.line_num}: {err}.") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err}).") from None
    kinds = {}
    for j, column in enumerate(header):
        kinds[column] = TYPES.get(column) or _infer([fields[j] for _, fields in records])
    rows = []
    for line, fields in records:
        row = {}
        for column, text in zip(header, fields):
            kind = kinds[column]
            if column not in TYPES and text == "" and kind is not str:
                row[column] = None
            elif kind is bool:
                row[column] = text == "true"
            else:
                row[column] = _parse(text, kind, f"{path}, line {line}, column {column!r}")
        rows.append(row)
    return rows


def collect(directory: str | Path) -> list[dict]:
    """Every row of every ``results.csv`` under ``directory`` (recursively), each row once.

    A sweep directory holds its runs' rows twice: in ``results.csv`` beside the sweep and in
    each run's own directory. Files are read from the shallowest down; a row met again (same
    :data:`RUN_KEY` and step) keeps its first place (the sweep's order) and takes the deeper
    file's values (the run's own file is the one it writes as it goes). The same run met in two
    directories side by side (neither holds the other) is two runs: the later one's ``run``
    gets its directory appended, so no result is dropped.

    Raises:
      ValueError: ``directory`` is not a directory, or holds no results file (saying what it
        looked for), or a results file is malformed.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> out = Path(tempfile.mkdtemp())
      >>> rows = _demo_rows()
      >>> write_results(out / "mean" / RESULTS, [r for r in rows if r["rule"] == "mean"])
      >>> write_results(out / "median" / RESULTS, [r for r in rows if r["rule"] == "median"])
      >>> len(collect(out)) == len(rows)
      True
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"report: {directory} is not a directory; give a run directory (with "
                         f"a {RESULTS}) or a sweep directory (with run directories in it).")
    files = sorted(directory.rglob(RESULTS),
                   key=lambda p: (len(p.relative_to(directory).parts), str(p)))
    if not files:
        raise ValueError(f"report: found no {RESULTS} in {directory} or any directory below it; "
                         f"give the --out directory of `rbyz run` or `rbyz sweep`.")
    merged: dict[tuple, dict] = {}
    holders: dict[tuple, set[Path]] = {}  # run key -> the directories whose files hold it
    for path in files:
        here = path.parent
        clash: dict[tuple, bool] = {}
        for row in read_results(path):
            key = _run_key(row)
            if key not in clash:
                clash[key] = any(d not in here.parents for d in holders.get(key, ()))
            if clash[key]:
                # The same name and settings in a directory beside this one (two `rbyz run`
                # outputs of one experiment name): another run, kept apart by its directory.
                row = dict(row, run=f"{row['run']} ({here.relative_to(directory)})")
                key = _run_key(row)
            holders.setdefault(key, set()).add(here)
            merged[key + (row["step"],)] = row
    return list(merged.values())


# ---------------------------------------------------------------------------------------------
# Summaries.


def _run_key(row: Mapping) -> tuple:
    return tuple(row[c] for c in RUN_KEY)


def final_rows(rows: Iterable[Mapping]) -> list[dict]:
    """Each run's row at its last evaluation step (runs in first-seen order).

    Example:
      >>> [(r["rule"], r["attack"], r["seed"], r["step"]) for r in final_rows(_demo_rows())][:3]
      [('mean', 'none', 0, 20), ('mean', 'none', 1, 20), ('mean', 'alie', 0, 20)]
    """
    last: dict[tuple, dict] = {}
    for row in rows:
        key = _run_key(row)
        if key not in last or row["step"] >= last[key]["step"]:
            last[key] = dict(row)
    return list(last.values())


def _first_seen(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _attack_order(rows: Sequence[Mapping]) -> list[str]:
    attacks = _first_seen(r["attack"] for r in rows)
    return sorted(attacks, key=lambda a: a != NO_ATTACK)  # stable: "none" first, then as seen


def _settings(rows: Sequence[Mapping]) -> list[tuple]:
    return _first_seen(tuple(r[c] for c in SETTING) for r in rows)


def _setting_label(setting: tuple, varying: Sequence[str]) -> str:
    parts = dict(zip(SETTING, setting))
    return ", ".join(str(parts[c]) if c == "heterogeneity" else f"{c} = {parts[c]}"
                     for c in varying)


def _varying(settings: Sequence[tuple]) -> list[str]:
    return [c for i, c in enumerate(SETTING) if len({s[i] for s in settings}) > 1]


def _higher_is_better(value: str) -> bool:
    return "loss" not in value and value != "epsilon"


def _scale(value: str) -> float:
    return 100.0 if "accuracy" in value else 1.0


class _Cells:
    """Final values of one setting, by (rule, attack): the runs' values (over seeds)."""

    def __init__(self, final: Sequence[Mapping], value: str):
        self.value = value
        self.rules = _first_seen(r["rule"] for r in final)
        self.attacks = _attack_order(final)
        self.values: dict[tuple[str, str], list[float]] = {}
        for r in final:
            v = r[value]
            self.values.setdefault((r["rule"], r["attack"]), []).append(
                float("nan") if v is None else float(v))
        self.seeds = max(len(v) for v in self.values.values())

    def stats(self, rule: str, attack: str) -> tuple[float, float] | None:
        """``(mean, sd)`` over the runs (sample sd, ``ddof=1``; ``nan`` for one run)."""
        vals = self.values.get((rule, attack))
        if not vals:
            return None
        arr = np.asarray(vals, dtype=np.float64)
        sd = float(np.std(arr, ddof=1)) if arr.size > 1 else float("nan")
        return float(np.mean(arr)), sd

    def worst(self, rule: str) -> tuple[str, float, float] | None:
        """The attack (not ``none``) with the worst mean for ``rule``; a ``nan`` mean (a run
        that diverged) counts as the worst of all."""
        better = _higher_is_better(self.value)
        found = None
        for attack in self.attacks:
            if attack == NO_ATTACK:
                continue
            s = self.stats(rule, attack)
            if s is None:
                continue
            badness = math.inf if math.isnan(s[0]) else (-s[0] if better else s[0])
            if found is None or badness > found[0]:
                found = (badness, attack, s)
        if found is None:
            return None
        return found[1], found[2][0], found[2][1]

    def text(self, mean: float, sd: float) -> str:
        scale = _scale(self.value)
        fmt = (lambda x: f"{scale * x:.1f}") if scale != 1.0 else (lambda x: f"{x:.4g}")
        return fmt(mean) if math.isnan(sd) else f"{fmt(mean)} ± {fmt(sd)}"


def _groups(rows: Iterable[Mapping], value: str, caller: str) -> list[tuple[tuple, _Cells]]:
    final = final_rows(rows)
    if not final:
        raise ValueError(f"{caller}: no rows; give the rows of read_results or collect.")
    if value not in final[0]:
        raise ValueError(f"{caller}: the rows have no column {value!r}; they have "
                         f"{', '.join(final[0])}.")
    return [(s, _Cells([r for r in final if tuple(r[c] for c in SETTING) == s], value))
            for s in _settings(final)]


def worst_case(rows: Iterable[Mapping], *, value: str = "test_accuracy") -> dict[str, tuple]:
    """Each defence's worst-case attack: ``{rule: (attack, mean final value)}``.

    ByzFL-style worst-case attack selection: among the attacks other than ``none``, the one
    whose mean final ``value`` over seeds is lowest (highest for a ``value`` whose name holds
    ``loss``); a ``nan`` mean counts as the worst. Rules met with no attack are left out.

    Args:
      rows: results rows of one setting (one ``n``, ``f`` and heterogeneity).
      value: the column compared.

    Raises:
      ValueError: the rows hold several settings (select one first), or no rows.

    Example:
      >>> worst = worst_case(_demo_rows())
      >>> {rule: (attack, round(acc, 3)) for rule, (attack, acc) in worst.items()}
      {'mean': ('alie', 0.205), 'median': ('alie', 0.705)}
    """
    groups = _groups(rows, value, "worst_case")
    if len(groups) > 1:
        varying = _varying([s for s, _ in groups])
        raise ValueError(
            "worst_case: the rows hold several settings ("
            + "; ".join(_setting_label(s, varying) for s, _ in groups)
            + "); pass the rows of one, e.g. [r for r in rows if r['f'] == 5].")
    cells = groups[0][1]
    out = {}
    for rule in cells.rules:
        found = cells.worst(rule)
        if found is not None:
            out[rule] = (found[0], found[1])
    return out


def accuracy_table(rows: Iterable[Mapping], *, value: str = "test_accuracy") -> str:
    """The Markdown table of final values: defences (rows, first-seen order) x attacks
    (columns, ``none`` first), with each defence's worst case.

    A cell is the mean over seeds of the runs' final ``value`` with the sample standard
    deviation (``85.3 ± 1.2``), or the single value with one seed; accuracies are shown in
    percent. The last column is the worst case (:func:`worst_case`), e.g. ``12.3 (alie)``.
    With several settings (``n``, ``f``, heterogeneity), one table per setting under a heading
    naming it.

    Args:
      rows: results rows (e.g. :func:`read_results`; every step, or only the final ones).
      value: the column shown (``"test_accuracy"``, ``"train_loss"``, ...).

    Returns:
      GitHub-flavoured Markdown.

    Example:
      >>> rows = [r for r in _demo_rows() if r["seed"] == 0]
      >>> print(accuracy_table(rows))
      | defence   |   none |   alie | worst case   |
      |:----------|-------:|-------:|:-------------|
      | mean      |   80.0 |   20.0 | 20.0 (alie)  |
      | median    |   78.0 |   70.0 | 70.0 (alie)  |
    """
    tabulate = _need("tabulate", "accuracy_table").tabulate
    groups = _groups(rows, value, "accuracy_table")
    varying = _varying([s for s, _ in groups])
    blocks = []
    for setting, cells in groups:
        attacks = cells.attacks
        has_worst = any(a != NO_ATTACK for a in attacks)
        body = []
        for rule in cells.rules:
            line = [rule]
            for attack in attacks:
                s = cells.stats(rule, attack)
                line.append("-" if s is None else cells.text(*s))
            if has_worst:
                w = cells.worst(rule)
                line.append("-" if w is None else f"{cells.text(w[1], w[2])} ({w[0]})")
            body.append(line)
        headers = ["defence", *attacks] + (["worst case"] if has_worst else [])
        table = tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True,
                         colalign=("left", *["right"] * len(attacks),
                                   *(["left"] if has_worst else [])))
        if len(groups) > 1:
            table = f"#### {_setting_label(setting, varying)}\n\n{table}"
        blocks.append(table)
    return "\n\n".join(blocks)


def unfinished(rows: Iterable[Mapping]) -> list[dict]:
    """The final rows of runs that stopped before the others of their setting (their last step
    is below the setting's largest): a half-done run, not comparable yet.

    Example:
      >>> rows = _demo_rows()
      >>> unfinished(rows[:-1])[0]["step"]   # the last run lost its step 20
      10
    """
    final = final_rows(rows)
    out = []
    for setting in _settings(final):
        group = [r for r in final if tuple(r[c] for c in SETTING) == setting]
        top = max(r["step"] for r in group)
        out += [r for r in group if r["step"] < top]
    return out


# ---------------------------------------------------------------------------------------------
def _constants(rows: Sequence[Mapping]) -> str:
    """What every row shares, for titles: ``n = 25, f = 5, iid, digits``."""
    parts = []
    for column in ("n", "f", "heterogeneity", "dataset"):
        values = _first_seen(r.get(column) for r in rows)
        if len(values) == 1 and values[0] not in (None, ""):
            parts.append(str(values[0]) if column in ("heterogeneity", "dataset")
                         else f"{column} = {values[0]}")
    return ", ".join(parts)


def _count(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _markdown(rows: list[dict], directory: Path, diagnostics: bool = False) -> str:
    final = final_rows(rows)
    steps = sorted({r["step"] for r in final})
    seeds = len(_first_seen(r["seed"] for r in final))
    settings = _settings(final)
    rules = _first_seen(r["rule"] for r in final)
    attacks = _attack_order(final)
    common = _constants(final)
    grid = [_count(len(rules), "defence"), _count(len(attacks), "attack")]
    if len(settings) > 1:
        grid.append(_count(len(settings), "setting"))
    if seeds > 1:
        grid.append(_count(seeds, "seed"))
    lines = [f"# Results: {directory.resolve().name}", ""]
    lines.append(f"{_count(len(final), 'run')}: {' x '.join(grid)}"
                 + (f"; {common}" if common else "") + ".")
    text = (f"Final test accuracy (%) at each run's last evaluation (step "
            f"{', '.join(map(str, steps))})" + (", mean ± sd over seeds" if seeds > 1 else "")
            + ".")
    if any(a != NO_ATTACK for a in attacks):
        text += (" *worst case*: each defence's lowest accuracy over the attacks and the attack "
                 "that caused it (ByzFL's worst-case attack selection).")
    lines += [text, "", accuracy_table(rows), ""]
    if any(r.get("epsilon") is not None for r in final):
        lines += [f"Privacy: ε at each run's last evaluation (δ as configured; the worker "
                  f"with the weakest guarantee; `inf`: no noise or no privacy section; "
                  f"*worst case*: the largest).", "",
                  accuracy_table([{**r, "epsilon": r.get("epsilon", math.inf)} for r in rows],
                                 value="epsilon"), ""]
    late = unfinished(rows)
    if late:
        lines.append("Not finished yet (their last step is below the others'): "
                     + ", ".join(f"{r['run']} (step {r['step']})" for r in late) + ".")
        lines.append("")
    lines += [f"![Test accuracy during training]({ACCURACY_PNG})", "",
              f"![Final test accuracy, defences x attacks]({HEATMAP_PNG})", ""]
    if diagnostics:
        lines += ["Diagnostics (`diagnostics.csv` of each run; `rbyz.sim.diagnostics`): the "
                  "coordinates an attacker can flip, and the Byzantine share of each "
                  "defence's aggregate.", "", f"![Why a defence fails]({DIAGNOSTICS_PNG})", ""]
    return "\n".join(lines)


def report(directory: str | Path) -> dict[str, Path]:
    """Reads every ``results.csv`` under ``directory`` and writes the report beside them.

    ``directory`` is a run directory or a sweep directory holding run directories (at any
    depth; see :func:`collect`). Written atomically into ``directory``: ``report.md`` (a
    summary line and :func:`accuracy_table`, runs not finished yet, and the figures),
    ``accuracy.png`` (:func:`rbyz.sim.plots.plot_accuracy`), ``heatmap.png``
    (:func:`rbyz.sim.plots.plot_heatmap`) and, when
    the runs logged diagnostics, ``diagnostics.png``
    (:func:`rbyz.sim.diagnostics_plot.plot_diagnostics`).

    Args:
      directory: the run or sweep directory.

    Returns:
      ``{"report": path, "accuracy": path, "heatmap": path}``, and ``"diagnostics": path``
      when written.

    Raises:
      ValueError: no directory, no ``results.csv`` under it (saying what it looked for), no
        rows in them, or a malformed file (naming it and the line).
      ImportError: tabulate or matplotlib missing (``pip install 'rbyz[experiments]'``).

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> out = Path(tempfile.mkdtemp())
      >>> write_results(out / "run-a" / RESULTS, _demo_rows())
      >>> sorted(p.name for p in report(out).values())
      ['accuracy.png', 'heatmap.png', 'report.md']
      >>> report(out / "run-a" / "nothing")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: report: .../nothing is not a directory; ...
    """
    directory = Path(directory)
    rows = collect(directory)
    if not rows:
        raise ValueError(f"report: the {RESULTS} files under {directory} hold no rows yet; "
                         f"a run writes one at each evaluation.")
    written = {"report": directory / REPORT, "accuracy": directory / ACCURACY_PNG,
               "heatmap": directory / HEATMAP_PNG}
    from rbyz.sim import diagnostics_plot, plots  # they read this module's rows

    diagnostics = diagnostics_plot.collect(directory)
    if diagnostics:
        written["diagnostics"] = directory / DIAGNOSTICS_PNG
    io.atomic_write_text(written["report"], _markdown(rows, directory, bool(diagnostics)))
    plots.plot_accuracy(rows, written["accuracy"])
    plots.plot_heatmap(rows, written["heatmap"])
    if diagnostics:
        diagnostics_plot.plot_diagnostics(diagnostics, written["diagnostics"])
    return written


def _demo_rows() -> list[dict]:
    """The rows the examples use: mean and median under no attack and ALIE, seeds 0 and 1,
    evaluated at steps 10 and 20 (final accuracies: mean 80/81 and 20/21, median 78/79 and
    70/71 percent)."""
    final = {("mean", "none"): 0.80, ("mean", "alie"): 0.20,
             ("median", "none"): 0.78, ("median", "alie"): 0.70}
    rows = []
    for (rule, attack), acc in final.items():
        for seed in (0, 1):
            for step in (10, 20):
                rows.append({
                    "run": f"{rule}__{attack}__s{seed}", "rule": rule, "attack": attack,
                    "f": 1, "n": 5, "heterogeneity": "iid", "seed": seed, "step": step,
                    "test_accuracy": round(acc + 0.01 * seed - (0.1 if step == 10 else 0.0), 6),
                    "train_loss": 0.5 if step == 10 else 0.25})
    return rows


__all__ = ("ACCURACY_PNG", "COLUMNS", "DIAGNOSTICS_PNG", "HEATMAP_PNG", "NO_ATTACK", "REPORT",
           "RESULTS", "RUN_KEY", "SETTING", "TYPES", "accuracy_table", "collect", "final_rows",
           "read_results", "report", "unfinished", "worst_case", "write_results")
