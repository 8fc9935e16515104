"""Optax gradient transformations for Byzantine-robust training.

Robust aggregation, Byzantine attacks, per-worker noise and sign voting as composable
``optax.GradientTransformationExtraArgs``. The builder :func:`robust` puts them in the only right
order (stacked transforms, one aggregation, then the server optimizer):

>>> import optax, rbyz
>>> tx = rbyz.transforms.robust("krum", f=5, attack="alie", key=0, optimizer=optax.sgd(0.1))

Two modes, the same numbers:

- **stacked** (``axis_name=None``): updates carry the worker axis first, every leaf ``[n, ...]``;
- **collective** (``axis_name="workers"``): the transform runs on each shard of a named axis
  (``jax.shard_map``, ``jax.pmap`` or ``jax.vmap(axis_name=...)``), each shard holding its own
  worker's update (``tiled=True``: a stack of its own workers); the aggregating transforms
  gather over the axis and return the aggregate replicated on every shard (rules declared to run
  on coordinate slices can instead split the coordinates over the shards:
  ``layout="coordinates"`` in :func:`aggregate`). Compute the per-shard gradients with
  :func:`rbyz.distributed.local_grad` (inside ``shard_map`` a plain ``jax.grad`` of replicated
  params silently sums the workers' gradients).

Both modes check the updates' shapes against the params' before any compute: a forgotten
``tiled=True``, one worker's update in stacked mode, or params that gained a worker axis (a chain
without aggregation) raise ``ValueError`` with the fix.

Warning:
  The stacked transforms (``byzantine``, ``per_worker``, ``add_worker_noise``) come first in a
  chain, then one aggregation, then the model-shaped transforms; they do not compose with
  ``optax.MultiSteps`` or ``optax.apply_every`` (which would accumulate per-worker values). This
  is the caveat of ``optax.contrib.differentially_private_aggregate``; :func:`robust` makes the
  wrong order impossible.

Random keys live in the states as raw ``uint32`` key data (``jax.random.key_data``), so states are
plain arrays that ``np.savez`` or any checkpointer stores as they are. No transform has a default
seed.
"""

from rbyz.transforms.aggregate import AggregateState
from rbyz.transforms.aggregate import aggregate
from rbyz.transforms.aggregate import majority_vote
from rbyz.transforms.aliases import noisy_median_sgd
from rbyz.transforms.aliases import noisy_sign_sgd
from rbyz.transforms.aliases import robust_sgd
from rbyz.transforms.aliases import signsgd_majority
from rbyz.transforms.coding import detox_aggregate
from rbyz.transforms.coding import election_vote_aggregate
from rbyz.transforms.coding import repetition_aggregate
from rbyz.transforms.byzantine import ByzantineState
from rbyz.transforms.byzantine import byzantine
from rbyz.transforms.per_worker import PerWorkerState
from rbyz.transforms.per_worker import WorkerNoiseState
from rbyz.transforms.per_worker import add_worker_noise
from rbyz.transforms.per_worker import per_worker
from rbyz.transforms.per_worker import sign
from rbyz.transforms.robust import Stages
from rbyz.transforms.robust import robust
from rbyz.transforms.robust import robust_stages

__all__ = (
    "AggregateState",
    "ByzantineState",
    "Stages",
    "PerWorkerState",
    "WorkerNoiseState",
    "add_worker_noise",
    "aggregate",
    "byzantine",
    "detox_aggregate",
    "election_vote_aggregate",
    "majority_vote",
    "noisy_median_sgd",
    "noisy_sign_sgd",
    "per_worker",
    "repetition_aggregate",
    "robust",
    "robust_sgd",
    "robust_stages",
    "sign",
    "signsgd_majority",
)
