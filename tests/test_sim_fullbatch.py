"""The harness's small settings of Chen et al. 2020: a seeded training subset
(``data.train_size``) and full-batch local gradients (``data.batch_size = 0``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rbyz.sim import config, data, models, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@functools.cache
def task_data():
    return data.synthetic(seed=0)


def experiment(**sections) -> config.Experiment:
    base = {"data": {"dataset": "synthetic", "batch_size": 0, "train_size": 103},
            "model": {"name": "logistic"},
            "workers": {"n": 5, "f": 0},
            "train": {"steps": 40, "eval_every": 20, "lr": 0.5}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return config.from_dict(base)


def test_train_size_keeps_a_stratified_subset_fixed_by_the_seed():
    a = train.task(experiment(), dataset=task_data()).dataset
    b = train.task(experiment(), dataset=task_data()).dataset
    c = train.task(config.override(experiment(), ["seed=1"]), dataset=task_data()).dataset
    assert a.y_train.shape == (103,) and a.x_train.shape[0] == 103
    share = 103 * np.bincount(task_data().y_train, minlength=10) / len(task_data().y_train)
    assert np.all(np.abs(np.bincount(a.y_train, minlength=10) - share) <= 1)
    assert np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert np.array_equal(a.x_test, task_data().x_test)  # the test set is untouched


def test_train_size_zero_keeps_the_whole_training_set():
    t = train.task(experiment(data={"train_size": 0, "batch_size": 8}), dataset=task_data())
    assert t.dataset.y_train.shape == task_data().y_train.shape


def test_classes_partition_on_a_subset_gives_one_class_per_worker():
    exp = experiment(data={"partition": "classes", "train_size": 500}, workers={"n": 10})
    t = train.task(exp, dataset=task_data())
    sizes = np.asarray(t.sizes)
    assert sizes.sum() == 500
    for row, size in zip(np.asarray(t.indices), sizes):
        assert len(set(t.dataset.y_train[row[:size]].tolist())) == 1


def _expected_step(exp, t, params):
    """One full-batch step of mean SGD computed by hand: each worker's gradient of its mean loss
    over exactly its own examples, averaged over the workers."""
    ds = t.dataset
    grads = []
    for row, size in zip(np.asarray(t.indices), np.asarray(t.sizes)):
        x, y = ds.x_train[row[:size]], ds.y_train[row[:size]]
        loss = functools.partial(lambda p, x, y: models.cross_entropy(t.model.apply(p, x), y),
                                 x=x, y=y)
        grads.append(jax.grad(loss)(params))
    mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    return jax.tree.map(lambda p, g: p - exp.train.lr * g, params, mean)


def test_full_batch_gradients_use_each_whole_shard_once_and_ignore_the_padding():
    exp = experiment()
    t = train.task(exp, dataset=task_data())
    assert sorted(np.asarray(t.sizes).tolist()) == [20, 20, 21, 21, 21]  # padded to 21
    state = train.init_state(exp, t)
    data_arrays, _ = train.arrays(t)
    step = jax.jit(train.make_step(exp, t))
    new, metrics = step(data_arrays, state)
    loss = metrics["train_loss"]
    expected = _expected_step(exp, t, state.params)
    close = jax.tree.map(lambda a, b: bool(np.allclose(a, b, atol=1e-6)), new.params, expected)
    assert all(jax.tree.leaves(close))
    assert np.isfinite(float(loss))
    # Full batch draws nothing: the second step from the same params is the same step.
    again, _ = step(data_arrays, new._replace(params=state.params))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), again.params, new.params)
    assert all(jax.tree.leaves(same))


def test_full_batch_learns_and_is_reproducible():
    a = train.train(experiment(), dataset=task_data())
    b = train.train(experiment(), dataset=task_data())
    assert a.rows[-1]["test_accuracy"] > 0.8
    assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]


@pytest.mark.parametrize("defence", [
    {"rule": "detox", "hparams": {"r": 3}},
    {"rule": "election_coding", "hparams": {"code": "bernoulli", "r": 2.0}},
    {"rule": "noisy_sign_sgd", "hparams": {"b": 0.01}},
])
def test_full_batch_with_grouped_and_partition_sampling(defence):
    exp = experiment(defence=defence, workers={"n": 9, "f": 1},
                     train={"steps": 20, "eval_every": 20, "lr": 0.05})
    history = train.train(exp, dataset=task_data())
    assert np.isfinite(history.rows[-1]["train_loss"])
    assert history.rows[-1]["test_accuracy"] > 0.5


def test_full_batch_group_members_compute_the_same_gradient():
    exp = experiment(defence={"rule": "detox", "hparams": {"r": 3}}, workers={"n": 9, "f": 1})
    t = train.task(exp, dataset=task_data())
    idx = jnp.repeat(t.indices, 3, axis=0)  # what the step gathers for each worker
    assert t.indices.shape[0] == 3
    assert bool((idx[0] == idx[2]).all()) and not bool((idx[0] == idx[3]).all())


@pytest.mark.parametrize("fields, message", [
    ({"data": {"batch_size": -1}}, "data.batch_size: must be >= 1 (or 0: full batch"),
    ({"data": {"train_size": -5}}, "data.train_size: must be >= 1 (or 0: the whole"),
])
def test_bad_sizes_fail_before_any_compute(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train.defence(experiment(**fields))


@pytest.mark.parametrize("size", [3, 10**6])
def test_train_size_outside_the_dataset_or_below_the_workers_is_named(size):
    with pytest.raises(ValueError, match="data.train_size: must be between the 5 data units"):
        train.task(experiment(data={"train_size": size}), dataset=task_data())


def test_train_subset_checks_its_size():
    with pytest.raises(ValueError, match=r"train_subset: size must be an int in \[1, 2000\]"):
        data.train_subset(task_data(), 0, seed=0)
    assert data.train_subset(task_data(), 2000, seed=0) is task_data()

