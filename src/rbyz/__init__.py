"""rbyz: Byzantine-robust distributed training in JAX.

Robust aggregators, pre-aggregators and Byzantine attacks as pure, jit-compiled functions over
stacked worker updates (every leaf has the worker axis first), redundancy and coding defences,
and optax gradient transformations built from them.
"""

from rbyz import aggregators
from rbyz import attacks
from rbyz import coding
from rbyz import distributed
from rbyz import preaggregators
from rbyz import transforms

__version__ = "0.1.0"

__all__ = (
    "aggregators",
    "attacks",
    "coding",
    "distributed",
    "preaggregators",
    "transforms",
)
