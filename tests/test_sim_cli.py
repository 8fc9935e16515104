"""The ``rbyz`` command line, and a run that is killed and resumes to the same numbers."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

typer_testing = pytest.importorskip("typer.testing")

from rbyz.sim import checkpoint, cli, report

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE = """
name = "tiny"
[data]
dataset = "synthetic"
batch_size = 16
[model]
name = "logistic"
[workers]
n = 7
f = 1
[train]
steps = 20
eval_every = 10
"""

GRID = BASE + """
[sweep]
defence = [{rule = "mean"}, {rule = "median"}]
attack = [{name = "none"}, {name = "reverse", hparams = {scale = 100.0}}]
"""


def invoke(*args):
    result = typer_testing.CliRunner().invoke(cli.app, [str(a) for a in args])
    return result.exit_code, result.output


def test_list_reads_the_declarations():
    code, out = invoke("list")
    assert code == 0
    for name in ("krum", "n >= 2f + 3", "bulyan", "nnm", "alie", "label_flip", "detox",
                 "election_coding", "Blanchard"):
        assert name in out
    code, out = invoke("list", "attack")
    assert code == 0 and "| krum " not in out and "| ipm " in out
    assert invoke("list", "rules")[0] == 2


def test_run_writes_results_config_and_plots(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(BASE)
    code, out = invoke("run", cfg, "--out", tmp_path / "run", "--quiet",
                       "--set", "defence.rule=median")
    assert code == 0, out
    rows = report.read_results(tmp_path / "run" / "results.csv")
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["rule"] == "median"
    for name in ("config.toml", "summary.json", "report.md", "accuracy.png", "heatmap.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("overrides, message", [
    (["--set", "train.stesp=3"], "unknown key 'train.stesp'"),
    (["--set", "workers.n=abc"], "workers.n must be an integer"),
    (["--set", "defence.rule=krum", "--set", "workers.f=3"], "krum: needs n >= 2f + 3"),
    (["--set", "attack.name=alie", "--set", "workers.f=0"], "needs Byzantine workers"),
])
def test_bad_settings_exit_with_status_2(tmp_path, overrides, message):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(BASE)
    code, out = invoke("run", cfg, "--out", tmp_path / "run", "--quiet", *overrides)
    assert code == 2 and message in out, out
    assert not (tmp_path / "run" / "results.csv").exists()


def test_an_output_directory_of_another_experiment_is_refused(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(BASE)
    assert invoke("run", cfg, "--out", tmp_path / "run", "--quiet")[0] == 0
    code, out = invoke("run", cfg, "--out", tmp_path / "run", "--quiet", "--set", "train.lr=0.5")
    assert code == 2 and "holds another experiment's results" in out and "train.lr" in out


def test_sweep_report_skip_and_redo(tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(GRID)
    out = tmp_path / "grid"
    code, text = invoke("sweep", cfg, "--out", out, "--quiet")
    assert code == 0, text
    rows = report.read_results(out / "results.csv")
    assert len(rows) == 8 and {r["attack"] for r in rows} == {"none", "reverse"}
    final = {(r["rule"], r["attack"]): r["test_accuracy"] for r in report.final_rows(rows)}
    assert final[("median", "reverse")] > final[("mean", "reverse")] + 0.3
    assert "worst" in (out / "report.md").read_text().lower()
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 4
    stamps = {p: (p / checkpoint.SUMMARY).stat().st_mtime_ns for p in runs}
    # Half-written: the summary and the last checkpoint of one run are gone.
    half = runs[0]
    (half / checkpoint.SUMMARY).unlink()
    shutil.rmtree(half / checkpoint.CHECKPOINTS / "20")
    assert invoke("sweep", cfg, "--out", out, "--quiet")[0] == 0
    assert all((p / checkpoint.SUMMARY).stat().st_mtime_ns == stamps[p] for p in runs[1:])
    assert (half / checkpoint.SUMMARY).exists()
    again = report.read_results(out / "results.csv")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]
    assert strip(again) == strip(rows)
    code, text = invoke("report", out)
    assert code == 0 and "median" in text


def test_report_of_an_empty_directory_fails(tmp_path):
    code, out = invoke("report", tmp_path)
    assert code == 2 and "results.csv" in out


LONG = BASE.replace("steps = 20", "steps = 3000").replace("eval_every = 10", "eval_every = 100")
LONG = LONG.replace('name = "logistic"', 'name = "mlp"\nhidden = 64')


def _run(cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-m", "rbyz.sim.cli", "run", str(cfg), "--out",
                             str(out), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_numbers(tmp_path):
    cfg = tmp_path / "long.toml"
    cfg.write_text(LONG)
    killed = tmp_path / "killed"
    proc = _run(cfg, killed)
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = list((killed / checkpoint.CHECKPOINTS).glob("[0-9]*"))
        if len(steps) >= 1 or proc.poll() is not None:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / checkpoint.SUMMARY).exists(), "the run finished before it was killed"
    partial = report.read_results(killed / "results.csv")
    assert 1 <= len(partial) < 30
    assert _run(cfg, killed).wait() == 0
    clean = tmp_path / "clean"
    assert _run(cfg, clean).wait() == 0
    a = report.read_results(killed / "results.csv")
    b = report.read_results(clean / "results.csv")
    assert len(a) == len(b) == 30
    for key in ("step", "test_accuracy", "train_loss", "test_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key


@pytest.mark.slow
def test_the_demo_runs_its_whole_grid(tmp_path):
    from rbyz.sim import demo

    # The grid's wiring, not its numbers: a small model, no checkpoints (tested above).
    text = demo.main(tmp_path, overrides=["data.dataset=synthetic", "model.name=logistic",
                                          "train.steps=10", "train.eval_every=10",
                                          "train.checkpoint_every=0"], progress=False)
    rows = report.read_results(tmp_path / "results.csv")
    rules = {r["rule"] for r in rows}
    assert rules == {"mean", "median", "trimmed_mean", "krum", "bulyan", "geometric_median",
                     "cclip+momentum", "nnm+krum", "detox"}
    assert {r["attack"] for r in rows} == {"none", "alie", "ipm(10)"}
    assert all(r["n"] == 25 and r["f"] == 5 for r in rows)
    assert "worst case" in text and (tmp_path / "heatmap.png").exists()
