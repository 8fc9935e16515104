"""Results files, the table, worst-case selection, plots and the report of a directory."""

import math
import os
import tomllib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbyz.sim import io, plots, report

pytest.importorskip("tabulate")
pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def make_rows(rules=("mean", "median", "krum"), attacks=("alie", "none", "ipm"), seeds=(0, 1, 2),
              steps=(10, 20), f=2, heterogeneity="iid", seed=0):
    """Random accuracies; returns (rows, finals) with finals[(rule, attack)] = [per seed]."""
    rng = np.random.default_rng(seed)
    rows, finals = [], {}
    for rule in rules:
        for attack in attacks:
            for s in seeds:
                for step in steps:
                    acc = float(rng.uniform(0.05, 0.95))
                    rows.append({"run": f"{rule}__{attack}__f{f}__{heterogeneity}__s{s}",
                                 "rule": rule, "attack": attack, "f": f, "n": 10,
                                 "heterogeneity": heterogeneity, "seed": s, "step": step,
                                 "test_accuracy": acc, "train_loss": float(rng.uniform(0, 2)),
                                 "wall_s": 0.1 * step})
                    if step == max(steps):
                        finals.setdefault((rule, attack), []).append(acc)
    return rows, finals


def parse_table(text):
    """{rule: {column: cell}} of a Markdown pipe table."""
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header[1:], cells[1:]))
    return header, out


# --- io -----------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "deep" / "er" / "out.txt"
    io.atomic_write_text(path, "first")
    io.atomic_write_text(path, "second, longer than the first")
    assert path.read_text() == "second, longer than the first"
    assert os.listdir(path.parent) == ["out.txt"]
    io.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["out.txt"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    io.atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_json_round_trip_and_bad_json(tmp_path):
    obj = {"step": 3, "acc": np.float32(0.5), "loss": float("nan"), "xs": np.arange(3)}
    io.write_json(tmp_path / "s.json", obj)
    back = io.read_json(tmp_path / "s.json")
    assert back["step"] == 3 and back["acc"] == 0.5 and math.isnan(back["loss"])
    assert back["xs"] == [0, 1, 2]
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        io.read_json(tmp_path / "bad.json")


def test_toml_round_trip_exact(tmp_path):
    doc = {
        "name": 'quote " backslash \\ tab \t newline \n unicode é ✓ \U0001f600 del \x7f',
        "seed": 0, "big": 2**62, "neg": -7, "flag": True,
        "floats": [0.1, 1 / 3, 1e-300, 5e-324, 1.7976931348623157e308, -0.0, 1e22],
        "data": {"dataset": "synthetic", "alpha": 0.30000000000000004, "hparams": {}},
        "defence": {"rule": "krum", "pre": ["nnm", "bucketing"], "pre_hparams":
                    {"bucketing": {"s": 2}}, "hparams": {"tau": 10.0}},
        "mixed": [1, "a", 2.5, [True, []]],
        "weird key.with dots": {"x y": 1},
        "inline": [{"name": "none"}, {"name": "ipm", "hparams": {"epsilon": 0.1}}],
        "np": np.float64(0.2),
    }
    path = tmp_path / "config.toml"
    io.write_toml(path, doc)
    back = tomllib.loads(path.read_text())
    expected = dict(doc, np=0.2)
    assert back == expected
    assert [repr(x) for x in back["floats"]] == [repr(x) for x in doc["floats"]]
    io.write_toml(path, {"x": float("nan"), "y": float("-inf")})
    back = tomllib.loads(path.read_text())
    assert math.isnan(back["x"]) and back["y"] == -math.inf


@given(st.dictionaries(st.text(min_size=1, max_size=8),
                       st.one_of(st.floats(allow_nan=False), st.integers(-2**63, 2**63 - 1),
                                 st.text(max_size=12), st.booleans(),
                                 st.lists(st.floats(allow_nan=False), max_size=3)),
                       max_size=5))
def test_toml_round_trip_property(doc):
    import tomli_w

    assert tomllib.loads(tomli_w.dumps(io._toml_data({"t": doc}, ""))) == {"t": doc}


def test_toml_rejects_what_toml_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"write_toml: train\.lr is None"):
        io.write_toml(tmp_path / "c.toml", {"train": {"lr": None}})
    with pytest.raises(ValueError, match=r"write_toml: x\[1\] is object"):
        io.write_toml(tmp_path / "c.toml", {"x": [1, object()]})
    assert not (tmp_path / "c.toml").exists()


# --- results.csv --------------------------------------------------------------------------------


def test_results_round_trip(tmp_path):
    rows, _ = make_rows(rules=("median",), attacks=("none",), seeds=(0,), steps=(5, 10))
    rows[0].update(test_accuracy=float("nan"), train_loss=float("inf"))
    rows[1].update(train_loss=-math.inf, test_accuracy=0.1 + 0.2)  # 0.30000000000000004
    for r in rows:
        r.update(heterogeneity="0.5", run="007")  # strings of digits stay strings
    rows[0]["dataset"] = "digits"      # an extra column only one row has
    rows[1]["diverged"] = True         # a boolean extra
    rows[1]["count"] = np.int64(3)     # NumPy scalars are written as numbers
    path = tmp_path / "results.csv"
    report.write_results(path, rows)
    header = path.read_text().splitlines()[0].split(",")
    assert header == [*report.COLUMNS, "count", "dataset", "diverged", "wall_s"]
    back = report.read_results(path)
    assert len(back) == 2
    assert math.isnan(back[0]["test_accuracy"]) and back[0]["train_loss"] == math.inf
    assert back[1]["train_loss"] == -math.inf and back[1]["test_accuracy"] == 0.1 + 0.2
    for b, r in zip(back, rows):
        for col in ("run", "rule", "attack", "f", "n", "heterogeneity", "seed", "step", "wall_s"):
            assert b[col] == r[col] and type(b[col]) is type(r[col]), col
    assert back[0]["heterogeneity"] == "0.5" and back[0]["run"] == "007"
    assert back[0]["dataset"] == "digits" and back[1]["dataset"] == ""
    assert back[1]["diverged"] is True and back[0]["diverged"] is None
    assert back[1]["count"] == 3 and type(back[1]["count"]) is int and back[0]["count"] is None
    assert os.listdir(tmp_path) == ["results.csv"]


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("run,rule\nr,mean\n", "line 1: the header lacks the column"),
    (",".join(report.COLUMNS) + "\nr,mean,none,1,5,iid,0,10,0.5,0.1\nr,mean,none,1,5,iid\n",
     "line 3: 6 fields; the header has 10"),
    (",".join(report.COLUMNS) + "\nr,mean,none,1,5,iid,0,10,0.5,0.1\nr,mean,none,1,5,iid,0,20,"
     "high,0.1\n", "line 3, column 'test_accuracy': 'high' is not a number"),
    (",".join(report.COLUMNS) + "\nr,mean,none,1.5,5,iid,0,10,0.5,0.1\n",
     "line 2, column 'f': '1.5' is not an integer"),
    (",".join(report.COLUMNS) + "\nr,mean,none,1,5,iid,0,10,__import__('os'),0.1\n",
     "line 2, column 'test_accuracy'"),
])
def test_malformed_results_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "results.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        report.read_results(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_write_results_checks_rows_before_writing(tmp_path):
    rows, _ = make_rows(seeds=(0,), steps=(1,))
    bad = dict(rows[1])
    del bad["seed"]
    with pytest.raises(ValueError, match="row 1 lacks the column"):
        report.write_results(tmp_path / "r.csv", [rows[0], bad])
    with pytest.raises(ValueError, match="row 0, column 'step' must be int"):
        report.write_results(tmp_path / "r.csv", [dict(rows[0], step=1.0)])
    assert not (tmp_path / "r.csv").exists()


# --- summaries ----------------------------------------------------------------------------------


def test_final_rows_are_each_runs_last_step():
    rows, finals = make_rows(steps=(10, 30, 20))  # rows out of step order: the largest wins
    final = report.final_rows(rows)
    assert len(final) == 3 * 3 * 3 and {r["step"] for r in final} == {30}
    assert final[0]["test_accuracy"] == finals[("mean", "alie")][0]


def test_table_numbers_match_numpy():
    rows, finals = make_rows()
    header, table = parse_table(report.accuracy_table(rows))
    # rules in first-seen order, "none" first, then the attacks as seen, then the worst case
    assert header == ["defence", "none", "alie", "ipm", "worst case"]
    assert list(table) == ["mean", "median", "krum"]
    for (rule, attack), accs in finals.items():
        a = 100 * np.asarray(accs, np.float64)
        assert table[rule][attack] == f"{a.mean():.1f} ± {a.std(ddof=1):.1f}"
    for rule in table:
        means = {a: 100 * np.mean(finals[(rule, a)]) for a in ("alie", "ipm")}
        worst = min(means, key=means.get)
        assert table[rule]["worst case"].endswith(f"({worst})")
        assert table[rule]["worst case"].startswith(f"{means[worst]:.1f} ± ")


def test_table_single_seed_and_other_values():
    rows, finals = make_rows(seeds=(4,))
    _, table = parse_table(report.accuracy_table(rows))
    assert table["krum"]["ipm"] == f"{100 * finals[('krum', 'ipm')][0]:.1f}"
    _, losses = parse_table(report.accuracy_table(rows, value="train_loss"))
    final = {(r["rule"], r["attack"]): r["train_loss"] for r in report.final_rows(rows)}
    assert losses["mean"]["alie"] == f"{final[('mean', 'alie')]:.4g}"
    # for a loss, the worst case is the highest
    worst = max(("alie", "ipm"), key=lambda a: final[("mean", a)])
    assert losses["mean"]["worst case"].endswith(f"({worst})")
    with pytest.raises(ValueError, match="no column 'accuracy'"):
        report.accuracy_table(rows, value="accuracy")


def test_table_groups_settings():
    a, _ = make_rows(f=1)
    b, _ = make_rows(f=3, heterogeneity="dirichlet(0.5)", seed=1)
    text = report.accuracy_table(a + b)
    assert "#### f = 1, iid" in text and "#### f = 3, dirichlet(0.5)" in text
    assert text.count("| defence") == 2


def test_worst_case_picks_the_lowest_mean():
    rows = []
    values = {("mean", "none"): [0.9, 0.9], ("mean", "alie"): [0.2, 0.4],
              ("mean", "ipm"): [0.35, 0.3],        # mean 0.325 > 0.3: alie is worse
              ("median", "none"): [0.8, 0.8], ("median", "alie"): [0.7, 0.7],
              ("median", "ipm"): [0.5, 0.9],       # mean 0.7 ties alie: the first wins
              ("krum", "none"): [0.8, 0.8], ("krum", "alie"): [0.6, 0.6],
              ("krum", "ipm"): [0.1, float("nan")],  # a diverged run: the worst
              ("only_clean", "none"): [0.5, 0.5]}
    for (rule, attack), accs in values.items():
        for seed, acc in enumerate(accs):
            rows.append({"run": f"{rule}{attack}{seed}", "rule": rule, "attack": attack, "f": 1,
                         "n": 5, "heterogeneity": "iid", "seed": seed, "step": 7,
                         "test_accuracy": acc, "train_loss": 0.0})
    worst = report.worst_case(rows)
    assert set(worst) == {"mean", "median", "krum"}
    assert worst["mean"][0] == "alie" and worst["mean"][1] == pytest.approx(0.3)
    assert worst["median"] == ("alie", pytest.approx(0.7))
    assert worst["krum"][0] == "ipm" and math.isnan(worst["krum"][1])
    more = [dict(r, f=2) for r in rows]
    with pytest.raises(ValueError, match="several settings"):
        report.worst_case(rows + more)


# --- plots and the report -----------------------------------------------------------------------


def test_plots_are_png(tmp_path):
    rows, _ = make_rows()
    other, _ = make_rows(f=3, seeds=(0,), seed=2)
    for name, data in (("one", rows), ("two", rows + other)):
        acc, heat = tmp_path / name / "accuracy.png", tmp_path / name / "heatmap.png"
        plots.plot_accuracy(data, acc)
        plots.plot_heatmap(data, heat)
        for path in (acc, heat):
            blob = path.read_bytes()
            assert blob[:8] == PNG and len(blob) > 10_000
        assert sorted(os.listdir(acc.parent)) == ["accuracy.png", "heatmap.png"]


def test_report_of_a_sweep_directory(tmp_path):
    rows, finals = make_rows(rules=("mean", "median"), attacks=("none", "alie"), seeds=(0,))
    for rule in ("mean", "median"):
        report.write_results(tmp_path / f"{rule}-run" / "results.csv",
                             [r for r in rows if r["rule"] == rule])
    written = report.report(tmp_path)
    assert set(written) == {"report", "accuracy", "heatmap"}
    assert all(p.parent == tmp_path for p in written.values())
    for key in ("accuracy", "heatmap"):
        assert written[key].read_bytes()[:8] == PNG
    text = written["report"].read_text()
    _, table = parse_table(text)
    assert set(table) == {"mean", "median"}
    assert table["median"]["alie"] == f"{100 * finals[('median', 'alie')][0]:.1f}"
    assert "(accuracy.png)" in text and "(heatmap.png)" in text
    # The sweep's own results.csv repeats its runs' rows: counted once, sweep order kept.
    report.write_results(tmp_path / "results.csv", rows[::-1])
    assert len(report.collect(tmp_path)) == len(rows)
    assert report.collect(tmp_path)[0]["rule"] == "median"
    assert "4 runs: 2 defences x 2 attacks" in report.report(tmp_path)["report"].read_text()


def test_collect_keeps_runs_of_one_name_in_two_directories(tmp_path):
    rows, _ = make_rows(rules=("mean",), attacks=("none",), seeds=(0,), steps=(10, 20))
    report.write_results(tmp_path / "lr0.1" / "results.csv", rows)
    report.write_results(tmp_path / "lr0.3" / "results.csv",
                         [dict(r, test_accuracy=0.5) for r in rows])
    got = report.collect(tmp_path)
    assert len(got) == 4 and len(report.final_rows(got)) == 2
    assert got[-1]["run"] == f"{rows[0]['run']} (lr0.3)" and got[-1]["test_accuracy"] == 0.5


def test_report_names_unfinished_runs(tmp_path):
    rows, _ = make_rows(rules=("mean",), attacks=("none",), seeds=(0, 1), steps=(10, 20))
    report.write_results(tmp_path / "results.csv", rows[:-1])
    text = report.report(tmp_path)["report"].read_text()
    assert "Not finished yet" in text and "s1 (step 10)" in text


def test_report_without_results(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match=r"found no results\.csv in .* or any directory below"):
        report.report(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        report.report(tmp_path / "missing")
    report.write_results(tmp_path / "sub" / "results.csv", [])
    with pytest.raises(ValueError, match="hold no rows yet"):
        report.report(tmp_path)


@pytest.mark.parametrize("module", ["tabulate", "matplotlib.figure", "tomli_w"])
def test_missing_optional_dependency_says_how_to_install(monkeypatch, tmp_path, module):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    call = {"tabulate": lambda: report.accuracy_table(make_rows()[0]),
            "matplotlib.figure": lambda: plots.plot_heatmap(make_rows()[0], tmp_path / "h.png"),
            "tomli_w": lambda: io.write_toml(tmp_path / "c.toml", {"a": 1})}[module]
    with pytest.raises(ImportError, match=r"pip install 'rbyz\[experiments\]'"):
        call()
