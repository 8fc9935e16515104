"""The harness's training step spread over 8 simulated CPU devices: the single-device numbers.

Every case trains the same experiment twice, on one device (the stacked step) and with
``parallel.devices = 8`` (the step under ``jax.shard_map``, two workers per device), in one or
both layouts, and compares the evaluations and the final parameters over several steps.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from rbyz.sim import config, data, parallel, train

pytestmark = [pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

DEVICES = 8


@functools.cache
def task_data():
    return data.synthetic(seed=0)


def experiment(**sections) -> config.Experiment:
    base = {"data": {"dataset": "synthetic", "batch_size": 8, "partition": "dirichlet",
                     "alpha": 0.5},
            "model": {"name": "mlp", "hidden": 16},
            "workers": {"n": 16, "f": 3, "momentum": 0.9},
            "train": {"steps": 6, "eval_every": 3, "lr": 0.05}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return config.from_dict(base)


CASES = {
    "cclip+alie": dict(defence={"rule": "centered_clipping"}, attack={"name": "alie"}),
    "krum+ipm(gradients)": dict(defence={"rule": "krum"},
                                attack={"name": "ipm", "on": "gradients"}),
    "nnm+trimmed_mean+random rows": dict(
        defence={"rule": "trimmed_mean", "pre": ["nnm"]},
        attack={"name": "sign_flip", "positions": "random"}),
    "geometric_median+label_flip": dict(defence={"rule": "geometric_median"},
                                        attack={"name": "label_flip"}),
    "noisy_sign_sgd+gaussian": dict(defence={"rule": "noisy_sign_sgd", "hparams": {"b": 0.01}},
                                    attack={"name": "gaussian"},
                                    workers={"momentum": 0.0}),
    "median, full batch": dict(defence={"rule": "median"}, attack={"name": "sign_flip"},
                               data={"batch_size": 0, "train_size": 160}),
    "median+dp(poisson), momentum": dict(
        defence={"rule": "median"}, attack={"name": "alie"},
        privacy={"enabled": True, "noise_multiplier": 1.0, "clip": 0.5}),
    "noisy_median_sgd+dp(full, laplace)": dict(
        defence={"rule": "noisy_median_sgd"}, attack={"name": "sign_flip"},
        workers={"momentum": 0.0}, data={"batch_size": 0, "train_size": 160},
        privacy={"enabled": True, "b": 0.01, "noise": "laplace", "norm": "l1",
                 "microbatch": 4}),
}
GATHER_ONLY = {
    "detox": dict(defence={"rule": "detox", "hparams": {"r": 2}}, workers={"f": 1},
                  attack={"name": "sign_flip"}),
    "election_coding": dict(defence={"rule": "election_coding",
                                     "hparams": {"code": "bernoulli", "r": 2.0}},
                            workers={"momentum": 0.0, "f": 1}, attack={"name": "sign_reverse"}),
}


@functools.cache
def single_device(case: str) -> train.History:
    return train.train(experiment(**{**CASES, **GATHER_ONLY}[case]), dataset=task_data())


def sharded(case: str, layout: str) -> train.History:
    sections = {**CASES, **GATHER_ONLY}[case]
    exp = experiment(**sections, parallel={"devices": DEVICES, "layout": layout})
    return train.train(exp, dataset=task_data())


def assert_same_run(got: train.History, want: train.History) -> None:
    assert [r["step"] for r in got.rows] == [r["step"] for r in want.rows]
    for key in ("test_accuracy", "train_loss", "test_loss"):
        np.testing.assert_allclose([r[key] for r in got.rows], [r[key] for r in want.rows],
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 got.state.params, want.state.params)
    # The state has the single-device shapes: a checkpoint is the same pytree either way.
    assert jax.tree.map(np.shape, got.state) == jax.tree.map(np.shape, want.state)


# Both layouts for the rules whose coordinate layout differs most from the gather (distances,
# norms and centres summed over the devices); the others in the layout that is their default.
LAYOUT_CASES = [(case, layout) for case in ("cclip+alie", "krum+ipm(gradients)",
                                            "nnm+trimmed_mean+random rows")
                for layout in parallel.LAYOUTS]
LAYOUT_CASES += [("geometric_median+label_flip", "coordinates"),
                 ("noisy_sign_sgd+gaussian", "gather"), ("median, full batch", "gather"),
                 ("median+dp(poisson), momentum", "coordinates"),
                 ("noisy_median_sgd+dp(full, laplace)", "gather")]


@pytest.mark.parametrize("case, layout", LAYOUT_CASES)
def test_sharded_step_equals_single_device_step(case, layout):
    assert_same_run(sharded(case, layout), single_device(case))


@pytest.mark.parametrize("case", sorted(GATHER_ONLY))
def test_coding_defences_sharded_equal_single_device(case):
    assert_same_run(sharded(case, "gather"), single_device(case))


def test_the_workers_momenta_are_split_over_the_devices_and_the_rest_replicated():
    exp = experiment(**CASES["cclip+alie"], parallel={"devices": DEVICES})
    t = train.task(exp, dataset=task_data())
    state = train.init_state(exp, t)
    momenta = state.opt_state[0].inner.trace
    for leaf in jax.tree.leaves(momenta):
        assert leaf.shape[0] == 16 and leaf.sharding.spec[0] == "workers"
        assert len(leaf.addressable_shards) == DEVICES
        assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}
    for leaf in jax.tree.leaves((state.params, state.opt_state[1:])):
        assert leaf.sharding.is_fully_replicated


def test_a_sharded_run_resumes_to_the_uninterrupted_numbers(tmp_path):
    exp = experiment(**CASES["cclip+alie"], parallel={"devices": DEVICES})
    full = train.train(exp, dataset=task_data())

    class Stop(Exception):
        pass

    def stop_after_first_evaluation(done):
        raise Stop(done)

    with pytest.raises(Stop):
        train.train(exp, dataset=task_data(), run_dir=tmp_path,
                    progress=stop_after_first_evaluation)
    resumed = train.train(exp, dataset=task_data(), run_dir=tmp_path)
    assert [r["train_loss"] for r in resumed.rows] == [r["train_loss"] for r in full.rows]
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, full.state.params)


@pytest.mark.parametrize("sections, message", [
    (dict(workers={"n": 10, "f": 2}, parallel={"devices": 4}),
     "workers.n = 10 is not a multiple of devices = 4"),
    (dict(parallel={"devices": 64}), "64 devices asked, 8 present"),
    (dict(parallel={"devices": 4, "layout": "rows"}), "must be 'gather' or 'coordinates'"),
    (dict(defence={"rule": "dnc"}, parallel={"devices": 4, "layout": "coordinates"}),
     "dnc cannot run this way over 4 devices: aggregate: layout='coordinates' needs a rule "
     "declared to run on slices"),
    (dict(defence={"rule": "detox", "hparams": {"r": 2}}, workers={"f": 1},
          parallel={"devices": 4, "layout": "coordinates"}), "use layout = 'gather'"),
    (dict(diagnostics={"enabled": True}, parallel={"devices": 4}),
     "set parallel.devices = 1"),
])
def test_settings_that_cannot_be_spread_fail_before_training(sections, message):
    with pytest.raises(ValueError, match="config: ") as err:
        train.task(experiment(**sections), dataset=task_data())
    assert message in str(err.value)
