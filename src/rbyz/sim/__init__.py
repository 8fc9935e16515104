"""rbyz.sim: the experiment harness — real data, flax models, non-iid workers, a jit-compiled
training loop, configs, the ``rbyz`` command, reports and plots, checkpoints.

The pieces, each usable on its own:

- :mod:`rbyz.sim.data`: IDX files (MNIST / Fashion-MNIST, gzipped or not), the Debian package
  ``dataset-fashion-mnist``, scikit-learn's digits as the embedded default, a synthetic task;
- :mod:`rbyz.sim.partition`: how the workers share the data (iid, Dirichlet, exclusive
  classes, gamma-similarity, label-sorted shards) and the samplers (per worker, grouped for
  DETOX/DRACO, per partition for Election Coding), label flipping;
- :mod:`rbyz.sim.models`: flax (nnx) MLP, CNN and logistic regression, or a user's own module;
- :mod:`rbyz.sim.grads`: the per-worker gradients, in their fastest formulation;
- :mod:`rbyz.sim.config`: experiments as dataclasses read from TOML, overrides, sweep grids;
- :mod:`rbyz.sim.defences`: the defence built from the declarations, every setting checked;
- :mod:`rbyz.sim.train`: the step (on one device, or under ``shard_map`` over
  :mod:`rbyz.sim.parallel`'s placement), the run; :mod:`rbyz.sim.launch`: across processes;
- :mod:`rbyz.sim.checkpoint`, :mod:`rbyz.sim.sweep`, :mod:`rbyz.sim.report`,
  :mod:`rbyz.sim.plots`: run directories
  that resume after a kill, grids that skip finished runs, tables and plots;
- :mod:`rbyz.sim.diagnostics`, :mod:`rbyz.sim.diagnostics_plot`: why a defence fails, per step
  (coordinates an attacker can flip, the Byzantine share of the aggregate), and its figure;
- :mod:`rbyz.sim.cli`: ``rbyz run | sweep | list | report | demo | errors``.

Example:
  >>> from rbyz import sim
  >>> exp = sim.config.from_dict({"data": {"dataset": "synthetic"}, "model": {"name": "logistic"},
  ...                             "workers": {"n": 7, "f": 1}, "defence": {"rule": "median"},
  ...                             "attack": {"name": "reverse", "hparams": {"scale": 100.0}},
  ...                             "train": {"steps": 30, "eval_every": 30}})
  >>> sim.train.train(exp).rows[-1]["test_accuracy"] > 0.5
  True

The harness needs the ``experiments`` extra (``pip install 'rbyz[experiments]'``) for the
command line, progress bars, plots, checkpoints and the embedded dataset.
"""

from rbyz.sim import config as config
from rbyz.sim import data as data
from rbyz.sim import defences as defences
from rbyz.sim import grads as grads
from rbyz.sim import models as models
from rbyz.sim import partition as partition
from rbyz.sim import train as train

__all__ = ("config", "data", "defences", "grads", "models", "partition", "train")
