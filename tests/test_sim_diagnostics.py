"""The per-step diagnostics: coordinates an attacker can flip, and who reaches the aggregate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rbyz import transforms
from rbyz.sim import checkpoint, config, data, diagnostics, diagnostics_plot, report, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def reference_below(rows: np.ndarray, z: float) -> int:
    """Plain float64 loops: coordinates with |mean| < z * std (ddof 0) over the rows."""
    rows = rows.astype(np.float64)
    count = 0
    for j in range(rows.shape[1]):
        column = rows[:, j]
        mu = sum(column) / len(column)
        sigma = (sum((v - mu) ** 2 for v in column) / len(column)) ** 0.5
        count += abs(mu) < z * sigma
    return count


@pytest.mark.parametrize("n", [3, 8, 25])
def test_coordinates_below_matches_the_reference(n):
    rng = np.random.default_rng(n)
    a = rng.normal(0.3, 1.0, (n, 17)).astype(np.float32)
    b = rng.normal(-1.0, 0.5, (n, 2, 3)).astype(np.float32)
    got = diagnostics.coordinates_below({"a": a, "b": b}, (0.5, 1.0, 2.0)).tolist()
    want = [reference_below(a, z) + reference_below(b.reshape(n, -1), z) for z in (0.5, 1, 2)]
    assert got == want
    assert got == sorted(got), "a larger z counts at least the same coordinates"


def test_changed_rows_sees_replaced_rows_and_treats_nan_as_equal():
    before = {"w": jnp.array([[1.0, jnp.nan], [2.0, 3.0], [4.0, 5.0]])}
    after = {"w": jnp.array([[1.0, jnp.nan], [2.0, -3.0], [jnp.nan, 5.0]])}
    assert diagnostics.changed_rows(before, after).tolist() == [False, True, True]


def _share(rule, x, byzantine):
    mask = jnp.zeros(x.shape[0], bool).at[jnp.array(byzantine)].set(True)
    return float(diagnostics.byzantine_share(lambda u: (rule(u), None), x, mask)[2])


def test_byzantine_share_of_known_rules():
    from rbyz import aggregators

    x = jnp.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2], [0.1, 0.1], [9.0, 9.0]])
    assert _share(aggregators.mean, x, [3, 4]) == pytest.approx(0.4, rel=1e-3)
    krum = functools.partial(aggregators.krum, f=1)
    assert _share(krum, x, [4]) == 0.0
    assert _share(krum, x, [1]) == pytest.approx(1.0, rel=1e-3)  # row 1 is Krum's choice
    multi = functools.partial(aggregators.multi_krum, f=1, m=4)
    assert _share(multi, x, [0, 4]) == pytest.approx(0.25, rel=1e-3)
    # The median of [0, 0.1, 0, 0.1, 9] is row 0 or 2 (0.0) in column 1, a 0.1 row in column 2.
    assert _share(aggregators.median, x, [4]) == 0.0
    hostile = x.at[4].set(jnp.nan)
    assert _share(functools.partial(aggregators.multi_krum, f=1), hostile, [4]) == 0.0
    assert np.isnan(_share(lambda u: jnp.sign(jnp.sum(u, 0)), x, [4]))  # a vote does not move


def test_inspected_update_is_the_chains_update():
    stages = transforms.robust_stages("multi_krum", f=2, attack="alie", momentum=0.9, n=9, key=0,
                                      optimizer=optax.sgd(0.1, momentum=0.5))
    tx = optax.chain(*stages.transforms)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), (9, *p.shape)), params)
    want, want_state = tx.update(g, tx.init(params), params)
    got, got_state, detection = diagnostics.inspected_update(stages, g, tx.init(params), params)
    close = jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-6), (want, want_state),
                         (got, got_state))
    assert all(jax.tree.leaves(close))
    # ALIE's rows sit near the mean: Multi-Krum keeps them, among the 7 it averages.
    assert float(detection["byzantine_share"]) == pytest.approx(2 / 7, rel=1e-3)
    assert int(detection["rejected"]) == -1  # measured by differences, not reported

    # The same chain with the rule's own report: the same share, exact, and the counts.
    stages = transforms.robust_stages("multi_krum", f=2, attack="alie", momentum=0.9, n=9, key=0,
                                      optimizer=optax.sgd(0.1, momentum=0.5), report=True,
                                      num_workers=9)
    state = optax.chain(*stages.transforms).init(params)
    got, _, detection = diagnostics.inspected_update(stages, g, state, params)
    chex_close = jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-6), want, got)
    assert all(jax.tree.leaves(chex_close))
    assert float(detection["byzantine_share"]) == pytest.approx(2 / 7, rel=1e-6)
    assert int(detection["byzantine_kept"]) == 2 and int(detection["rejected"]) == 2


@functools.cache
def task_data():
    return data.synthetic(seed=0)


def experiment(**sections):
    base = {"data": {"dataset": "synthetic", "batch_size": 16},
            "model": {"name": "mlp", "hidden": 16}, "workers": {"n": 10, "f": 2},
            "train": {"steps": 20, "eval_every": 10, "lr": 0.1},
            "diagnostics": {"enabled": True}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return config.from_dict(base)


def test_a_run_logs_one_diagnostic_row_per_step_and_trains_the_same():
    exp = experiment(defence={"rule": "krum"}, attack={"name": "constant"})
    history = train.train(exp, dataset=task_data())
    rows = history.diagnostics
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert set(diagnostics.columns((0.5, 1.0, 2.0))) <= set(rows[0])
    assert all(r["byzantine_share"] == 0.0 for r in rows), "krum never picks the far rows"
    features = task_data().x_train.shape[1]
    assert rows[0]["coordinates"] == features * 16 + 16 + 16 * 10 + 10
    plain = train.train(config.override(exp, ["diagnostics.enabled=false"]), dataset=task_data())
    assert plain.diagnostics == []
    np.testing.assert_allclose([r["test_accuracy"] for r in history.rows],
                               [r["test_accuracy"] for r in plain.rows], atol=1e-6)


def test_mean_gives_the_byzantine_rows_their_share_and_sign_votes_have_none():
    mean = train.train(experiment(attack={"name": "alie"}), dataset=task_data()).diagnostics
    assert all(r["byzantine_share"] == pytest.approx(0.2, rel=1e-3) for r in mean)
    vote = train.train(experiment(defence={"rule": "signsgd_majority"},
                                  attack={"name": "sign_flip"}),
                       dataset=task_data()).diagnostics
    assert all(np.isnan(r["byzantine_share"]) for r in vote)
    assert all(r["below_z2"] >= r["below_z0.5"] > 0 for r in vote)


def test_diagnostics_are_written_and_resumed(tmp_path):
    exp = experiment(defence={"rule": "median"}, attack={"name": "ipm"})
    history = train.train(exp, dataset=task_data(), run_dir=tmp_path)
    written = report.read_results(tmp_path / checkpoint.DIAGNOSTICS)
    assert [r["step"] for r in written] == list(range(1, 21))
    assert written[-1]["byzantine_share"] == pytest.approx(history.diagnostics[-1]
                                                           ["byzantine_share"])
    again = train.train(exp, dataset=task_data(), run_dir=tmp_path)  # restored, nothing to do
    assert [r["step"] for r in again.diagnostics] == list(range(1, 21))


@pytest.mark.parametrize("z", [[], [0.5, -1.0]])
def test_bad_z_is_refused_before_compute(z):
    with pytest.raises(ValueError, match="diagnostics.z"):
        train.defence(experiment(diagnostics={"z": z}))


def test_z_must_be_numbers():
    with pytest.raises(ValueError, match="diagnostics.z must be a list of numbers"):
        experiment(diagnostics={"z": ["1"]})


def test_the_report_draws_the_diagnostics_of_the_runs_that_logged_them(tmp_path):
    for rule in ("krum", "mean"):
        for attack in ("none", "alie"):
            exp = experiment(defence={"rule": rule}, attack={"name": attack},
                             workers={"f": 2 if attack != "none" else 0})
            train.train(exp, dataset=task_data(), run_dir=tmp_path / f"{rule}-{attack}")
    rows = diagnostics_plot.collect(tmp_path)
    assert len(rows) == 4 * 20
    written = report.report(tmp_path)
    assert written["diagnostics"].read_bytes()[:4] == b"\x89PNG"
    assert "diagnostics.png" in written["report"].read_text()
    plain = tmp_path / "plain"
    train.train(experiment(diagnostics={"enabled": False}), dataset=task_data(), run_dir=plain)
    assert "diagnostics" not in report.report(plain)
    with pytest.raises(ValueError, match="diagnostics.enabled"):
        diagnostics_plot.plot_diagnostics(report.read_results(plain / "results.csv"),
                                          tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------
# Detection as an output: the rule's own selection, logged per step, and failing closed.


def test_a_reporting_rule_logs_its_selection_per_step():
    exp = experiment(defence={"rule": "multi_krum"}, attack={"name": "constant"})
    rows = train.train(exp, dataset=task_data()).diagnostics
    # The constant attack's rows are far: Multi-Krum (m = n - f) leaves out exactly them.
    assert all(r["byzantine_kept"] == 0 and r["rejected"] == 2 for r in rows)
    assert all(r["byzantine_share"] == 0.0 for r in rows)
    mean = train.train(experiment(attack={"name": "alie"}), dataset=task_data()).diagnostics
    assert all(r["byzantine_kept"] == 2 and r["rejected"] == 0 for r in mean)
    assert all(r["byzantine_share"] == pytest.approx(0.2, rel=1e-6) for r in mean)
    median = train.train(experiment(defence={"rule": "median"}, attack={"name": "alie"}),
                         dataset=task_data()).diagnostics
    assert all(r["byzantine_kept"] == -1 and r["rejected"] == -1 for r in median)


def test_fail_closed_stops_when_more_rows_are_rejected_than_f(tmp_path):
    # f = 1 assumed while 3 workers send far rows: multi_krum with m = n - 3 rejects 3 > 1.
    exp = experiment(defence={"rule": "multi_krum", "hparams": {"m": 7}},
                     attack={"name": "constant"}, workers={"n": 10, "f": 1},
                     diagnostics={"fail_closed": True})
    with pytest.raises(diagnostics.FailClosed, match=r"fail closed: at step 1 multi_krum "
                                                     r"rejected 3 rows, more than the f=1"):
        train.train(exp, dataset=task_data(), run_dir=tmp_path)
    assert not (tmp_path / checkpoint.DIAGNOSTICS).exists()  # nothing of that chunk was saved
    calm = experiment(defence={"rule": "multi_krum"}, attack={"name": "constant"},
                      diagnostics={"fail_closed": True})
    assert len(train.train(calm, dataset=task_data()).rows) == 2  # rejects f = 2: runs on


@pytest.mark.parametrize("sections, message", [
    ({"defence": {"rule": "median"}}, r"needs a rule that reports its selection; median does "
                                      r"not \(one of caf, centered_clipping"),
    ({"defence": {"rule": "multi_krum", "pre": ["nnm"]}}, r"needs a rule without "
                                                          r"pre-aggregators"),
    ({"diagnostics": {"enabled": False}}, r"needs diagnostics.enabled = true"),
    ({"defence": {"rule": "krum"}}, r"krum keeps one row by construction"),
    ({"defence": {"rule": "signsgd_majority"}}, r"signsgd_majority is a whole algorithm"),
], ids=["median", "pre", "disabled", "krum", "algorithm"])
def test_fail_closed_misuse_is_refused_before_compute(sections, message):
    sections = {**sections, "diagnostics": {"fail_closed": True,
                                            **sections.get("diagnostics", {})}}
    with pytest.raises(ValueError, match=r"config: diagnostics.fail_closed: " + message):
        train.defence(experiment(**sections))
