"""The harness's privacy section: clipped, noised, accounted runs; checks; the CLI."""

import functools
import math

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from rbyz import privacy
from rbyz.sim import cli, config, data, private, report, train

pytest.importorskip("dp_accounting")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@functools.cache
def task_data():
    return data.synthetic(seed=0)


def experiment(**sections) -> config.Experiment:
    base = {"data": {"dataset": "synthetic", "batch_size": 16},
            "model": {"name": "logistic"},
            "workers": {"n": 6, "f": 1},
            "defence": {"rule": "median"},
            "train": {"steps": 20, "eval_every": 10, "lr": 0.5},
            "privacy": {"enabled": True, "clip": 1.0}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return config.from_dict(base)


def run(exp):
    return train.train(exp, dataset=task_data())


def test_a_private_run_logs_the_epsilon_of_its_plan_after_each_evaluation():
    exp = experiment(privacy={"noise_multiplier": 1.0}, attack={"name": "sign_flip"})
    history = run(exp)
    t = train.task(exp, dataset=task_data())
    eps = [r["epsilon"] for r in history.rows]
    assert eps == [t.privacy.epsilon(10), t.privacy.epsilon(20)] and eps[0] < eps[1]
    direct = max(privacy.accounting.epsilon(t.privacy.mechanism(i, 20), 1e-5)
                 for i in range(6))
    assert eps[1] == pytest.approx(direct)
    assert history.rows[-1]["test_accuracy"] > 0.6  # still learns with noise and an attack
    assert history.rows[-1]["rule"] == "median+dp(z=1)"


def test_a_target_epsilon_is_met_by_the_worst_worker_and_no_noise_is_infinite():
    exp = experiment(privacy={"epsilon": 2.0}, data={"train_size": 200})
    t = train.task(exp, dataset=task_data())
    assert len(set(t.privacy.dataset_sizes)) == 2  # 200 / 6: shards of 33 and 34 records
    history = run(exp)
    assert 1.9 < history.rows[-1]["epsilon"] <= 2.0 + 1e-6
    assert history.rows[-1]["epsilon"] == pytest.approx(t.privacy.epsilons().max())
    clipped_only = run(experiment())
    assert clipped_only.rows[-1]["epsilon"] == math.inf


def test_clipping_bounds_what_each_worker_sends():
    """With the noise off, a huge learning signal is clipped: each worker's release has norm
    <= C (its mean of clipped examples) however large the raw gradients are."""
    exp = experiment(privacy={"clip": 1e-3}, defence={"rule": "mean"},
                     workers={"f": 0}, train={"steps": 1, "eval_every": 1, "lr": 1.0})
    t = train.task(exp, dataset=task_data())
    state = train.init_state(exp, t)
    step = train.make_step(exp, t)
    arrays, _ = train.arrays(t)
    new, _ = jax.jit(step)(arrays, state)
    moved = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), new.params,
                         state.params)
    size = np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(moved)))
    # The Poisson batch may exceed B, up to the capacity: the bound is C * capacity / B.
    assert 0 < size <= 1e-3 * t.privacy.capacity / 16 * (1 + 1e-5)


def test_same_seed_same_numbers():
    a = run(experiment(privacy={"b": 0.05}))
    b = run(experiment(privacy={"b": 0.05}))
    c = run(config.override(experiment(privacy={"b": 0.05}), ["seed=1"]))
    assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]
    assert [r["train_loss"] for r in a.rows] != [r["train_loss"] for r in c.rows]


def test_noise_sits_before_the_momentum_and_every_mode_runs():
    for sections in (dict(workers={"momentum": 0.9}, attack={"name": "alie", "hparams": {"z": 1.0}}),
                     dict(defence={"rule": "noisy_sign_sgd"}, privacy={"b": 0.01}),
                     dict(defence={"rule": "signsgd_majority"}, privacy={"b": 0.01},
                          attack={"name": "sign_flip", "on": "gradients"}),
                     dict(defence={"rule": "mean"}, workers={"f": 0},
                          privacy={"at": "server", "noise_multiplier": 1.0}),
                     dict(data={"batch_size": 0, "train_size": 120},
                          privacy={"b": 0.01, "microbatch": 8}),
                     dict(privacy={"sampling": "without_replacement", "accountant": "rdp",
                                   "b": 0.01})):
        exp = experiment(**sections)
        history = run(exp)
        assert np.isfinite(history.rows[-1]["train_loss"]), sections
    d = train.task(experiment(workers={"momentum": 0.9}, privacy={"b": 0.01}),
                   dataset=task_data()).defence
    first = d.stages.transforms[0]
    assert type(first.init(jax.numpy.zeros(2))).__name__ == "WorkerNoiseState"


@pytest.mark.parametrize("sections, match", [
    (dict(defence={"rule": "detox", "hparams": {"r": 3}}), "detox sends functions of shared"),
    (dict(defence={"rule": "noisy_median_sgd", "hparams": {"b": 0.1}}),
     "remove defence.hparams.b"),
    (dict(privacy={"b": 0.1, "epsilon": 2.0}), "set the noise one way"),
    (dict(privacy={"at": "server"}), "cannot be sized like a mean's"),
    (dict(privacy={"delta": 1.5}), r"delta: must be in \(0, 1\)"),
    (dict(privacy={"clip": 0.0}), "clip: must be a finite number > 0"),
    (dict(privacy={"sampling": "full"}), "needs data.batch_size = 0"),
    (dict(privacy={"noise": "laplace", "norm": "l1", "accountant": "rdp"}),
     "accountant='pld'"),
    (dict(privacy={"epsilon": -1.0}), "privacy.epsilon: must be a finite number >= 0"),
])
def test_bad_privacy_settings_fail_before_any_compute(sections, match):
    with pytest.raises(ValueError, match=match):
        train.defence(experiment(**sections))


def test_a_batch_larger_than_a_workers_data_names_the_worker():
    exp = experiment(data={"batch_size": 64, "train_size": 200})
    with pytest.raises(ValueError, match="larger than worker"):
        train.task(exp, dataset=task_data())


def test_privacy_levels_are_told_apart_in_results_and_in_the_report(tmp_path):
    rows = []
    for name, noise in (("e8", {"epsilon": 8.0}), ("b", {"b": 0.5})):
        exp = experiment(privacy=noise, train={"steps": 10, "eval_every": 10})
        rows += train.train(exp, dataset=task_data(), run_dir=tmp_path / name).rows
    assert {r["rule"] for r in rows} == {"median+dp(eps=8)", "median+dp(b=0.5)"}
    written = report.report(tmp_path)
    text = written["report"].read_text()
    assert "Privacy: ε" in text and "median+dp(eps=8)" in text
    assert {r["epsilon"] > 0 for r in report.collect(tmp_path)} == {True}


def test_the_privacy_command_prints_epsilon_and_the_noise_for_a_target(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[data]\ndataset = "synthetic"\nbatch_size = 16\n[workers]\nn = 6\nf = 1\n'
                    '[train]\nsteps = 500\n[privacy]\nenabled = true\nb = 0.05\n')
    result = CliRunner().invoke(cli.app, ["privacy", str(path), "--epsilon", "4"])
    assert result.exit_code == 0, result.output
    exp = config.load(path)
    t = train.task(exp)
    assert f"{t.privacy.epsilon():.4g}" in result.output
    assert "for epsilon <= 4" in result.output
    bad = CliRunner().invoke(cli.app, ["privacy", str(path), "--set", "privacy.delta=0"])
    assert bad.exit_code == 2 and "delta" in bad.output


def test_describe_rows_match_the_plan():
    exp = experiment(privacy={"b": 0.05}, train={"steps": 100})
    rows = private.describe(exp, [30, 30, 60, 60, 60, 90], target_epsilon=3.0)
    assert [(r["records"], r["workers"]) for r in rows] == [(30, 2), (60, 3), (90, 1)]
    assert rows[0]["epsilon"] > rows[1]["epsilon"] > rows[2]["epsilon"]
    assert rows[0]["noise_multiplier"] == pytest.approx(0.05 * 16 / 1.0)
    assert all(r["b_for_target"] == rows[0]["b_for_target"] for r in rows)
