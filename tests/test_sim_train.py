"""The training harness end to end on the synthetic task: learning, attacks, defences, seeds."""

import functools

import jax
import numpy as np
import pytest

from rbyz import aggregators, attacks, preaggregators
from rbyz.sim import config, data, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@functools.cache
def task_data():
    return data.synthetic(seed=0)


def experiment(**sections) -> config.Experiment:
    base = {"data": {"dataset": "synthetic", "batch_size": 16},
            "model": {"name": "mlp", "hidden": 32},
            "workers": {"n": 10, "f": 2},
            "train": {"steps": 60, "eval_every": 30, "lr": 0.1}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return config.from_dict(base)


def final_accuracy(exp) -> float:
    return train.train(exp, dataset=task_data()).rows[-1]["test_accuracy"]


def test_learns_without_attack_and_rows_are_tidy():
    history = train.train(experiment(), dataset=task_data())
    assert [r["step"] for r in history.rows] == [30, 60]
    last = history.rows[-1]
    assert last["test_accuracy"] > 0.8
    assert {"run", "rule", "attack", "f", "n", "heterogeneity", "seed", "step", "test_accuracy",
            "train_loss"} <= set(last)
    assert (last["rule"], last["attack"], last["f"], last["heterogeneity"]) == \
        ("mean", "none", 2, "iid")
    assert history.rows[0]["train_loss"] > last["train_loss"]


def test_same_seed_same_numbers_other_seed_other_numbers():
    a = train.train(experiment(attack={"name": "alie"}, defence={"rule": "median"}),
                    dataset=task_data())
    b = train.train(experiment(attack={"name": "alie"}, defence={"rule": "median"}),
                    dataset=task_data())
    c = train.train(config.override(experiment(attack={"name": "alie"},
                                               defence={"rule": "median"}), ["seed=1"]),
                    dataset=task_data())
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a.state.params, b.state.params)
    assert all(jax.tree.leaves(same))
    assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]
    assert [r["train_loss"] for r in a.rows] != [r["train_loss"] for r in c.rows]


def test_alie_with_a_large_z_hurts_the_mean():
    clean = final_accuracy(experiment())
    attacked = final_accuracy(experiment(attack={"name": "alie", "hparams": {"z": 30.0}}))
    assert attacked < clean - 0.3, (clean, attacked)


def test_a_robust_rule_beats_the_mean_under_a_large_scale_attack():
    attack = {"name": "reverse", "hparams": {"scale": 100.0}}
    mean = final_accuracy(experiment(attack=attack))
    median = final_accuracy(experiment(attack=attack, defence={"rule": "median"}))
    assert median > 0.8 and median > mean + 0.3, (mean, median)


def test_label_flip_trains_and_loss_counts_honest_workers_only():
    history = train.train(experiment(attack={"name": "label_flip"},
                                     defence={"rule": "trimmed_mean"}), dataset=task_data())
    assert history.rows[-1]["test_accuracy"] > 0.7


@pytest.mark.parametrize("rule, hparams, attack, extra", [
    ("detox", {"r": 5}, "alie", {}),
    ("draco", {"r": 5}, "reverse", {}),
    ("election_coding", {"code": "bernoulli", "r": 3.0}, "sign_reverse",
     {"train": {"server_momentum": 0.9, "lr": 0.01}}),
    ("signsgd_majority", {}, "sign_flip", {"train": {"lr": 0.01}}),
    ("noisy_sign_sgd", {"b": 0.01}, "none", {"train": {"lr": 0.01}}),
    ("noisy_median_sgd", {"b": 0.01}, "none", {}),
])
def test_algorithms_train_with_their_samplers(rule, hparams, attack, extra):
    exp = experiment(defence={"rule": rule, "hparams": hparams}, attack={"name": attack}, **extra)
    assert final_accuracy(exp) > 0.7


def test_grouped_sampling_gives_group_members_identical_gradients():
    exp = experiment(defence={"rule": "detox", "hparams": {"r": 5}})
    t = train.task(exp, dataset=task_data())
    assert (t.defence.sampling, t.defence.group_size, t.indices.shape[0]) == ("grouped", 5, 2)
    train_data, _ = train.arrays(t)
    seen = {}

    def spy(updates, state, params=None):
        seen["g"] = updates
        return t.defence.tx.update(updates, state, params)

    step = train.make_step(exp, t._replace(defence=t.defence._replace(
        tx=t.defence.tx._replace(update=spy))))
    step(train_data, train.init_state(exp, t))
    g = np.asarray(jax.tree.leaves(seen["g"])[0])
    assert np.array_equal(g[0], g[4]) and not np.array_equal(g[0], g[5])


def test_election_coding_computes_one_gradient_per_partition():
    exp = experiment(defence={"rule": "election_coding", "hparams": {"r": 3.0}},
                     attack={"name": "sign_reverse"})
    t = train.task(exp, dataset=task_data())
    assert t.defence.sampling == "partitions" and t.indices.shape[0] == t.defence.units


SMALL = {"workers": {"n": 11, "f": 2}, "train": {"steps": 2, "eval_every": 2},
         "model": {"name": "logistic"}}


def small(**sections):
    return experiment(**{**SMALL, **sections})


@pytest.mark.parametrize("rule", aggregators.names())
def test_every_aggregator_trains(rule):
    history = train.train(small(defence={"rule": rule}, attack={"name": "alie"}),
                          dataset=task_data())
    assert np.isfinite(history.rows[-1]["train_loss"])


PRE_HPARAMS = {"clip": {"max_norm": 1.0}}


@pytest.mark.parametrize("pre", preaggregators.names())
def test_every_preaggregator_trains(pre):
    defence = {"rule": "median", "pre": [pre],
               "pre_hparams": {pre: PRE_HPARAMS[pre]} if pre in PRE_HPARAMS else {}}
    history = train.train(small(defence=defence, attack={"name": "ipm"}), dataset=task_data())
    assert np.isfinite(history.rows[-1]["train_loss"])


# The adaptive attacks search against the defence's own rule unless told another.
ADAPTIVE = {"ipm_adaptive": {"aggregator": "median"}}


@pytest.mark.parametrize("attack, on", [(a, "momentum") for a in attacks.names()]
                         + [(a, "gradients") for a in ("alie", "ipm", "gaussian")])
def test_every_attack_trains(attack, on):
    exp = small(defence={"rule": "trimmed_mean"}, workers={"n": 11, "f": 2, "momentum": 0.9},
                attack={"name": attack, "on": on, "hparams": ADAPTIVE.get(attack, {})})
    history = train.train(exp, dataset=task_data())
    assert np.isfinite(history.rows[-1]["test_accuracy"])


@pytest.mark.parametrize("sections, message", [
    ({"defence": {"rule": "krumm"}}, "unknown rule 'krumm'"),
    ({"attack": {"name": "alei"}}, "unknown attack 'alei'"),
    ({"defence": {"rule": "krum"}, "workers": {"n": 10, "f": 4}},
     "krum: needs n >= 2f \\+ 3; got n=10, f=4"),
    ({"defence": {"rule": "bulyan"}}, "bulyan: needs n >= 4f \\+ 3; got n=10, f=2"),
    ({"defence": {"rule": "median", "hparams": {"tau": 1.0}}},
     "median has no hyperparameter 'tau'"),
    ({"defence": {"rule": "median", "pre": ["nmm"]}}, "unknown pre-aggregator 'nmm'"),
    ({"attack": {"name": "alie", "hparams": {"zz": 1.0}}}, "alie has no hyperparameter 'zz'"),
    ({"attack": {"name": "alie", "hparams": {"z": -1.0}}}, "z"),
    ({"attack": {"name": "alie", "on": "grads"}}, "attack.on: must be 'momentum' or"),
    ({"workers": {"n": 10, "f": 10}}, "workers.f: needs 0 <= f < n"),
    ({"workers": {"n": 10, "f": 0}, "attack": {"name": "alie"}}, "needs Byzantine workers"),
    ({"defence": {"rule": "detox", "hparams": {"r": 3}}}, "n=10 must be a multiple of r=3"),
    ({"defence": {"rule": "detox", "hparams": {"k": 3}}}, "detox has no hyperparameter 'k'"),
    ({"defence": {"rule": "detox", "pre": ["nnm"]}}, "takes no pre-aggregators"),
    ({"defence": {"rule": "election_coding"}, "attack": {"name": "label_flip"}},
     "a data attack does not apply"),
    ({"train": {"optimizer": "lion"}}, "unknown optimizer 'lion'"),
    ({"train": {"lr": 0.0}}, "learning rate must be > 0"),
    ({"attack": {"name": "label_flip", "hparams": {"p": 1}}}, "takes no hyperparameters"),
    ({"defence": {"rule": "median", "pre_hparams": {"nnm": {}}}}, "'nnm' is not in defence.pre"),
    ({"defence": {"rule": "median", "pre": ["clip"]}},
     "defence.pre_hparams.clip: clip needs max_norm=..."),
])
def test_bad_settings_fail_before_training(sections, message):
    with pytest.raises(ValueError, match=message):
        train.defence(experiment(**sections))


def test_a_worker_without_data_fails_before_training():
    exp = experiment(data={"partition": "classes", "classes_per_worker": 20})
    with pytest.raises(ValueError, match="classes"):
        train.task(exp, dataset=task_data())


def test_a_users_own_flax_model_trains():
    from flax import nnx

    from rbyz.sim import models

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            return self.dense(x.reshape(x.shape[0], -1))

    model = models.from_flax(Tiny(nnx.Rngs(0)), task_data().x_train.shape[1:])
    history = train.train(experiment(), model=model, dataset=task_data())
    assert history.rows[-1]["test_accuracy"] > 0.7


def _write_idx(path, array, gz):
    import gzip
    import struct

    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">HBB", 0, codes[array.dtype], array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.tobytes()
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as fh:
        fh.write(payload)


def _idx_dataset(directory, train=600, test=200):
    """Ten classes of 12x12 images: a bright bar whose position is the label, plus noise."""
    rng = np.random.default_rng(0)

    def images(count):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        x = rng.integers(0, 60, (count, 12, 12)).astype(np.uint8)
        for i, y in enumerate(labels):
            x[i, y + 1, 2:10] = 255
        return x, labels

    for prefix, count, gz in (("train", train, True), ("t10k", test, False)):
        x, y = images(count)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte", x, gz)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte", y, gz)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_trains_on_idx_files_written_here(tmp_path, model):
    _idx_dataset(tmp_path)
    exp = config.from_dict({"data": {"dataset": "mnist", "dir": str(tmp_path), "batch_size": 8},
                            "model": {"name": model, "hidden": 32},
                            "workers": {"n": 5, "f": 1}, "attack": {"name": "sign_flip"},
                            "defence": {"rule": "median"},
                            "train": {"steps": 40, "eval_every": 40, "lr": 0.05}})
    history = train.train(exp)
    assert history.rows[-1]["dataset"] == "mnist"
    assert history.rows[-1]["test_accuracy"] > 0.8


def test_noisy_sgd_noises_the_honest_messages_and_not_the_attack():
    """Chen et al.'s workers perturb what they send; a Byzantine worker sends the attack as is."""
    exp = experiment(workers={"n": 3, "f": 1}, attack={"name": "constant"},
                     defence={"rule": "noisy_median_sgd", "hparams": {"b": 1000.0}},
                     train={"lr": 1.0})
    tx = train.defence(exp).tx
    params = jax.numpy.zeros(2000)
    update, _ = tx.update(jax.numpy.zeros((3, 2000)), tx.init(params), params)
    # The median of two noised zeros and the exact -100 is -100 where the noises straddle it.
    exact = float(np.mean(np.asarray(update) == 100.0))
    assert 0.3 < exact < 0.7, exact
