"""Differential privacy for the workers' noise: per-example clipping, calibrated noise, the ε.

In noisy sign / median SGD (Chen et al. 2020) every worker adds noise to what it sends, before
it leaves the worker. With a bound on each record's influence (per-example clipping,
:mod:`rbyz.privacy.clipping`) that noise is worker-level local differential privacy: each
worker's records are protected from the server, the other workers and any Byzantine worker by
that worker's noise alone, and the sign, the median and every robust rule after it are
post-processing. The workers hold disjoint data, so a record's guarantee is the ε of its worker,
which the accountant (:mod:`rbyz.privacy.accounting`, Google's ``dp-accounting``, the optional
extra ``rbyz[privacy]``) gives for the whole run.

:class:`PrivacyPlan` ties the three together: the sampler the training step draws batches with,
the clipping, the noise transform and the accounted ε all read its fields, so what is accounted
is what ran. :func:`central_noise` is the trusted-server alternative, and refuses any rule but the
mean (whose sensitivity it needs).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from rbyz import privacy, transforms
  >>> plan = privacy.PrivacyPlan(clip=1.0, batch_size=4, dataset_sizes=(20, 20, 20), steps=100)
  >>> plan = plan.with_noise_multiplier(1.0)           # b = z C / B = 0.25
  >>> plan.stddev
  0.25
  >>> tx = optax.chain(plan.worker_noise(key=0), transforms.aggregate("median"), optax.sgd(0.1))
  >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
  >>> grad_fn = plan.grad_fn(loss)
  >>> data_x, data_y = jnp.ones((60, 2)), jnp.zeros(60)
  >>> idx, mask = plan.sample(jax.random.key(1), jnp.arange(60).reshape(3, 20),
  ...                         jnp.full(3, 20))
  >>> _, g = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0))(jnp.ones(2), data_x[idx], data_y[idx],
  ...                                                   mask)
  >>> update, _ = tx.update(g, tx.init(jnp.ones(2)), jnp.ones(2))
  >>> update.shape
  (2,)

References:
  Chen, Chen, Sun, Wu, Hong, `Distributed Training with Heterogeneous Data: Bridging Median- and
  Mean-Based Algorithms`, NeurIPS 2020. Abadi et al., `Deep Learning with Differential Privacy`,
  CCS 2016.
"""

from rbyz.privacy import accounting
from rbyz.privacy.clipping import ClippedGrad, clip_tree, clipped_grad
from rbyz.privacy.noise import central_noise
from rbyz.privacy.plan import PrivacyPlan

__all__ = ("ClippedGrad", "PrivacyPlan", "accounting", "central_noise", "clip_tree",
           "clipped_grad")
