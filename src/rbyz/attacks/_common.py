"""Shared pieces of the attacks: input checks, row statistics, stacking, and the references.

Every model attack maps the stacked honest rows an attacker knows, ``[h, ...]``, to the stacked
rows the ``f`` Byzantine workers send, ``[f, ...]``, in the dtypes of the input. Statistics of
16-bit inputs are accumulated in float32, and in the input's own precision when it is wider
(float64 stays float64 end to end).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util

# Registers a model attack: ``@declare_attack(key=..., constraint=..., reference=..., ...)``.
declare_attack = functools.partial(_spec.declare, "attack")

# ------------------------------------------------------------------------------------------------
# References, shared by the declarations and the docstrings.

(BARUCH, XIE, SHEJWALKAR, RAJPUT, SOHN, BLANCHARD, KARIMIREDDY, ALLOUAH, BYZFL) = (
    _spec.Reference(*entry) for entry in (
        ("Baruch, Baruch, Goldberg", "A Little Is Enough: Circumventing Defenses For "
         "Distributed Learning", "NeurIPS", 2019),
        ("Xie, Koyejo, Gupta", "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner "
         "Product Manipulation", "UAI", 2019),
        ("Shejwalkar, Houmansadr", "Manipulating the Byzantine: Optimizing Model Poisoning "
         "Attacks and Defenses for Federated Learning", "NDSS", 2021),
        ("Rajput, Wang, Charles, Papailiopoulos", "DETOX: A Redundancy-based Framework for "
         "Faster and More Robust Gradient Aggregation", "NeurIPS", 2019),
        ("Sohn, Han, Choi, Moon", "Election Coding for Distributed Learning: Protecting "
         "SignSGD against Byzantine Attacks", "NeurIPS", 2020),
        ("Blanchard, El Mhamdi, Guerraoui, Stainer", "Machine Learning with Adversaries: "
         "Byzantine Tolerant Gradient Descent", "NeurIPS", 2017),
        ("Karimireddy, He, Jaggi", "Byzantine-Robust Learning on Heterogeneous Datasets via "
         "Bucketing", "ICLR", 2022),
        ("Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan", "Fixing by Mixing: A Recipe "
         "for Optimal Byzantine ML under Heterogeneity", "AISTATS", 2023),
        ("González, Guerraoui, Pinot, Rizk, Stephan, Taïani", "ByzFL: Research Framework for "
         "Robust Federated Learning", "arXiv:2505.24802", 2025),
    )
)

# ------------------------------------------------------------------------------------------------
# Input checks and stacking.


def prepare(honest, f, rule: str) -> tuple[int, int]:
    """Validates the stacked input and ``f``; returns ``(h, f)`` as Python ints."""
    h = tree_util.num_workers(honest, rule)
    return h, checks.static_int(f, rule, "f", minimum=0)


def empty(honest):
    """The ``[0, ...]`` stack returned when there are no Byzantine workers."""
    return jax.tree.map(lambda x: x[:0], honest)


def repeat(vector_tree, honest, f: int):
    """Stacks ``f`` copies of a per-worker pytree, in the dtypes of ``honest``."""
    return jax.tree.map(
        lambda v, x: jnp.broadcast_to(v.astype(x.dtype)[None], (f,) + x.shape[1:]),
        vector_tree, honest)


def cycle_rows(honest, f: int):
    """Row ``i % h`` for Byzantine worker ``i``: each attacker starts from its own gradient."""
    h = tree_util.num_workers(honest, "attack")
    index = np.arange(f) % h
    return jax.tree.map(lambda x: x[index], honest)


def full_like(honest, f: int, value: float):
    """``f`` rows of ``value`` shaped and typed like the rows of ``honest``."""
    return jax.tree.map(lambda x: jnp.full((f,) + x.shape[1:], value, x.dtype), honest)


def draw_leaves(honest, f: int, key, rule: str, draw):
    """``f`` random rows per leaf: ``draw(key, shape, dtype)`` with an independent key per leaf."""
    key = checks.as_key(key, rule)
    flat, treedef = jax.tree.flatten(honest)
    keys = jax.random.split(key, len(flat))
    return jax.tree.unflatten(
        treedef, [draw(k, (f,) + x.shape[1:], x.dtype) for k, x in zip(keys, flat)])


# ------------------------------------------------------------------------------------------------
# Row statistics in the accumulation dtype.


def acc_dtype(tree) -> jnp.dtype:
    """The widest accumulation dtype over the leaves (float32 for 16-bit, float64 for float64)."""
    return max((tree_util.accumulation_dtype(jnp.result_type(x)) for x in jax.tree.leaves(tree)),
               key=lambda d: d.itemsize)


def leaf_mean(x: jax.Array) -> jax.Array:
    acc = tree_util.accumulation_dtype(x.dtype)
    return tree_util.sum_rows(x.astype(acc)) / x.shape[0]


def leaf_std(x: jax.Array, ddof: int) -> jax.Array:
    # Direct differences from the mean: the one-pass E[x^2] - E[x]^2 cancels badly when the
    # honest gradients are close to each other.
    centred = x.astype(tree_util.accumulation_dtype(x.dtype)) - leaf_mean(x)[None]
    return jnp.sqrt(tree_util.sum_rows(jnp.square(centred)) / (x.shape[0] - ddof))


def mean(honest):
    """Coordinate-wise mean of the rows, per leaf, in the accumulation dtype."""
    return jax.tree.map(leaf_mean, honest)


def std(honest, ddof: int):
    """Coordinate-wise standard deviation of the rows (``ddof``), in the accumulation dtype."""
    return jax.tree.map(lambda x: leaf_std(x, ddof), honest)


def tree_vdot(a, b, dtype) -> jax.Array:
    """Inner product of two pytrees over every coordinate, accumulated in ``dtype``."""
    return sum(
        jnp.vdot(x.astype(dtype).ravel(), y.astype(dtype).ravel())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def row_dots(a, b, dtype) -> jax.Array:
    """``[h]``: the inner product of row ``i`` of ``a`` with row ``i`` of ``b`` (or with ``b``
    itself when its leaves carry no row axis), over all leaves, in ``dtype``."""
    total = 0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        y = y if y.ndim == x.ndim else y[None]
        total = total + jnp.sum((x.astype(dtype) * y.astype(dtype)).reshape(x.shape[0], -1),
                                axis=1)
    return total
