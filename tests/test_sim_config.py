"""Experiment configs: TOML as data, every key and type checked, overrides, sweep grids."""

import pathlib

import pytest

from rbyz.sim import config, sweep


def test_defaults_and_sections():
    exp = config.Experiment()
    assert (exp.workers.n, exp.workers.f, exp.attack.on) == (25, 5, "momentum")
    assert exp.rule_label == "mean" and exp.attack_label == "none"
    assert config.from_dict(config.to_dict(exp)) == exp


def test_toml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('name = "x"\n[defence]\nrule = "krum"\npre = ["nnm"]\n'
                    '[attack]\nname = "ipm"\nhparams = {epsilon = 0.5}\n')
    exp = config.load(path, ["train.steps=7", "workers.f=2", "defence.rule=median",
                             "attack.hparams={epsilon = 2.0}", "data.alpha=1"])
    assert exp.train.steps == 7 and exp.workers.f == 2 and exp.defence.rule == "median"
    assert exp.defence.pre == ("nnm",) and exp.attack.hparams == {"epsilon": 2.0}
    assert exp.data.alpha == 1.0 and isinstance(exp.data.alpha, float)
    assert exp.rule_label == "nnm+median"


@pytest.mark.parametrize("document, message", [
    ({"train": {"step": 5}}, "unknown key 'train.step'; train accepts steps"),
    ({"nmae": "x"}, "unknown key 'nmae'"),
    ({"workers": {"n": "25"}}, "workers.n must be an integer; got str '25'"),
    ({"workers": {"n": 2.5}}, "workers.n must be an integer"),
    ({"workers": {"n": True}}, "workers.n must be an integer"),
    ({"train": {"lr": "fast"}}, "train.lr must be a number"),
    ({"defence": {"pre": [1]}}, "defence.pre must be a list of strings"),
    ({"attack": {"hparams": 3}}, "attack.hparams must be a table"),
    ({"workers": 5}, "workers must be a table"),
])
def test_bad_documents_name_the_field(document, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.from_dict(document)


def test_bad_toml_and_overrides(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        config.load(path)
    with pytest.raises(ValueError, match="no such file"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="section.field=value"):
        config.override(config.Experiment(), ["train.steps"])
    with pytest.raises(ValueError, match="unknown key 'train.stpes'"):
        config.override(config.Experiment(), ["train.stpes=3"])
    with pytest.raises(ValueError, match="'seed' is not a section"):
        config.override(config.Experiment(), ["seed.x=3"])


def test_sweep_axes():
    grid = config.expand({
        "attack": {"name": "alie", "hparams": {"z": 2.0}, "on": "gradients"},
        "sweep": {"workers.f": [1, 2], "attack": [{"name": "none"}, {"name": "ipm"},
                                                  {"on": "momentum"}]}})
    assert [(e.workers.f, e.attack.name) for e in grid] == [
        (1, "none"), (1, "ipm"), (1, "alie"), (2, "none"), (2, "ipm"), (2, "alie")]
    # A table naming another attack starts from its defaults; other fields are kept.
    assert grid[1].attack.hparams == {} and grid[1].attack.on == "gradients"
    # A table that names no attack keeps the base's attack and hyperparameters.
    assert grid[2].attack.hparams == {"z": 2.0} and grid[2].attack.on == "momentum"


def test_sweep_partial_experiments():
    grid = config.expand({"sweep": {"defences": [
        {"defence": {"rule": "centered_clipping", "label": "cc"}, "workers": {"momentum": 0.9}},
        {"defence": {"rule": "median"}}]}})
    assert [(e.rule_label, e.workers.momentum) for e in grid] == [("cc", 0.9), ("median", 0.0)]


@pytest.mark.parametrize("sweep, message", [
    ({}, "needs a \\[sweep\\] table"),
    ({"seed": 3}, "sweep.seed must be a non-empty list"),
    ({"attack": ["alie"]}, "sweep.attack lists tables of attack fields"),
    ({"bogus.field": [1]}, "sweep.bogus.field names no field"),
    ({"variants": [{"nope": {}}]}, "unknown key 'nope'"),
    ({"variants": [3]}, "lists partial experiments"),
    ({"attack": [{"nmae": "x"}]}, "unknown key 'sweep.attack.nmae'"),
])
def test_bad_sweeps(sweep, message):
    with pytest.raises(ValueError, match=message):
        config.expand({"sweep": sweep})


@pytest.mark.parametrize("path", sorted(
    (pathlib.Path(__file__).parents[1] / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_parses_expands_and_builds(path):
    """A reproduction's config that fails only when someone runs it is a broken command in the
    docs: each one is read, expanded into its grid and every defence built (no data, no compute)."""
    document = config.read(path)
    grid = config.expand(document)
    assert grid, path
    sweep.check_all(grid)
