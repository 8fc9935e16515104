"""Robust aggregators: pure functions from stacked worker updates to one update.

Every rule has the signature ``agg(updates, *, f=..., **hparams) -> pytree``. ``updates`` is a
stacked pytree (every leaf ``[n, ...]``, worker axis first); the result has the same structure
without the worker axis and the dtype of each input leaf (16-bit floats are accumulated in
float32, float64 stays float64 end to end). ``n`` comes from the shapes and ``f`` (the number of
Byzantine workers assumed) is a keyword Python int, so every rule can be called uniformly, e.g.
through :func:`get`. Invalid settings raise ``ValueError`` at trace time, before any compute.

Each rule is declared (``rbyz._src.spec``): :func:`spec` gives its constraint on ``n`` and
``f``, its hyperparameters and defaults, whether it needs a key (:func:`dnc`) or keeps state
(:func:`centered_clipping`'s ``center``), whether it runs on a coordinate slice, its cost and its
references. :data:`declare` declares a rule of your own the same way.

Hostile input: up to ``f`` rows may hold NaN, +Inf, -Inf or huge values. Coordinate-wise rules
treat NaN as +Inf (it sorts last); distance-based rules put a non-finite row (or one whose
distance overflows the accumulation dtype) at infinite distance from every other row; weighting
rules give it weight 0. Only :func:`mean` propagates them.

Coordinate-wise rules work leaf by leaf; distance-based rules sum per-leaf partial distances,
then select or weight rows leaf by leaf: the model is never ravelled into one vector.

Modules: ``coordinatewise`` (mean, median, trimmed mean, MeaMed), ``krum`` (Krum, Multi-Krum,
Bulyan), ``subsets`` (MDA, DnC), ``iterative`` (geometric median, centered clipping), ``sign``
(majority vote of signs), ``clustering`` (clipped clustering, SignGuard, FLAME), ``spectral``
(CAF, SMEA), ``nearest`` (MoNNA, CGE), ``history`` (FoolsGold, which keeps each worker's summed
updates), ``layerwise`` (LASA per layer, GAS per chunk of coordinates).

Example:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> from rbyz import aggregators
  >>> updates = {"w": jnp.array([[1.0, 2.0], [1.5, 2.5], [1e30, -1e30]])}
  >>> aggregators.get("median")(updates, f=1)["w"]
  Array([1.5, 2. ], dtype=float32)
  >>> jax.jit(aggregators.trimmed_mean, static_argnames="f")(updates, f=1)["w"]
  Array([1.5, 2. ], dtype=float32)
  >>> aggregators.spec("bulyan").constraint.text
  'n >= 4f + 3'
  >>> aggregators.names()[:1]
  ('bulyan',)
"""

from __future__ import annotations

from typing import Callable

from rbyz._src import spec as _spec
from rbyz.aggregators.clustering import clipped_clustering as clipped_clustering
from rbyz.aggregators.clustering import flame as flame
from rbyz.aggregators.clustering import signguard as signguard
from rbyz.aggregators.coordinatewise import EVEN_MEDIANS as EVEN_MEDIANS
from rbyz.aggregators.coordinatewise import mean as mean
from rbyz.aggregators.coordinatewise import meamed as meamed
from rbyz.aggregators.coordinatewise import median as median
from rbyz.aggregators.coordinatewise import phocas as phocas
from rbyz.aggregators.coordinatewise import trimmed_mean as trimmed_mean
from rbyz.aggregators.history import foolsgold as foolsgold
from rbyz.aggregators.iterative import GEOMETRIC_MEDIAN_INITS as GEOMETRIC_MEDIAN_INITS
from rbyz.aggregators.hierarchical import Stage2 as Stage2
from rbyz.aggregators.hierarchical import hierarchical as hierarchical
from rbyz.aggregators.hierarchical import plain as plain
from rbyz.aggregators.iterative import centered_clipping as centered_clipping
from rbyz.aggregators.iterative import geometric_median as geometric_median
from rbyz.aggregators.krum import bulyan as bulyan
from rbyz.aggregators.krum import krum as krum
from rbyz.aggregators.krum import multi_krum as multi_krum
from rbyz.aggregators.layerwise import gas as gas
from rbyz.aggregators.layerwise import lasa as lasa
from rbyz.aggregators.nearest import cge as cge
from rbyz.aggregators.nearest import monna as monna
from rbyz.aggregators.selection import Selection as Selection
from rbyz.aggregators.sign import ZERO_SIGNS as ZERO_SIGNS
from rbyz.aggregators.sign import sign_majority as sign_majority
from rbyz.aggregators.spectral import SMEA_MAX_SUBSETS as SMEA_MAX_SUBSETS
from rbyz.aggregators.spectral import caf as caf
from rbyz.aggregators.spectral import smea as smea
from rbyz.aggregators.subsets import MDA_MAX_SUBSETS as MDA_MAX_SUBSETS
from rbyz.aggregators.subsets import dnc as dnc
from rbyz.aggregators.subsets import mda as mda

__all__ = (
    "EVEN_MEDIANS",
    "GEOMETRIC_MEDIAN_INITS",
    "MDA_MAX_SUBSETS",
    "Selection",
    "SMEA_MAX_SUBSETS",
    "Stage2",
    "ZERO_SIGNS",
    "bulyan",
    "caf",
    "centered_clipping",
    "cge",
    "clipped_clustering",
    "declare",
    "dnc",
    "flame",
    "foolsgold",
    "gas",
    "geometric_median",
    "get",
    "hierarchical",
    "krum",
    "lasa",
    "mda",
    "mean",
    "meamed",
    "median",
    "monna",
    "multi_krum",
    "names",
    "phocas",
    "plain",
    "sign_majority",
    "signguard",
    "smea",
    "spec",
    "specs",
    "supports_coordinate_layout",
    "trimmed_mean",
)

# get(name) -> rule, names(), spec(name) -> declaration, specs(), and declare(...) for a
# rule of your own (not registered): @rbyz.aggregators.declare(...).
get, names, spec, specs, declare = (getattr(_spec.registry_view("aggregator"), attr) for attr in
                                     ("get", "names", "spec", "specs", "declare"))


def supports_coordinate_layout(rule: Callable) -> bool:
    """Whether ``rule`` gives the right aggregate when each device holds a slice of the coordinates.

    That is what ``rbyz.transforms.aggregate(..., layout="coordinates")`` runs: every device
    receives all workers' values on ``1/S`` of the coordinates and aggregates that slice. It is
    what the rule declares (``coordinate_slices``): true for every rule of this package but
    :func:`dnc` (its random subsamples span all coordinates), since coordinate-wise rules need
    nothing else and the others reduce over coordinates (norms, distances, finiteness of a whole
    update) only through ``rbyz._src.reductions``, which completes those sums over the devices,
    so that every device makes the same selection or weighting. A rule of your own qualifies when
    declared with ``declare(coordinate_slices=True)`` (do so only if it is coordinate-wise, or
    reduces over coordinates only through ``rbyz._src.reductions``: a norm it computes itself
    would see one slice). An undeclared function does not.

    Args:
      rule: an aggregator, or a ``functools.partial`` of one.

    Example:
      >>> supports_coordinate_layout(krum), supports_coordinate_layout(dnc)
      (True, False)
      >>> supports_coordinate_layout(lambda updates, f=0: updates)
      False
    """
    return _spec.spec_of(rule).coordinate_slices
