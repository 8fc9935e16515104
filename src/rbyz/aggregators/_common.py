"""Validation and small tree helpers shared by the aggregators.

Every rule validates its static settings here before any compute: the worker count ``n`` from
the shapes, ``f`` against the constraint the rule declares (``spec.check``), and its other
hyperparameters, each ``ValueError`` naming the rule, the values and how to fix them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util


def workers_and_f(updates, f, declared: _spec.Spec) -> tuple[int, int]:
    """``(n, f)`` of ``updates``, with ``f`` a static int ``>= 0`` that satisfies the declared
    constraint of the rule, else ``ValueError("<rule>: needs ...; got n=.., f=..")``."""
    n = tree_util.num_workers(updates, declared.name)
    f = checks.static_int(f, declared.name, "f", minimum=0)
    declared.check(n, f)
    return n, f


def count_in_range(value, rule: str, name: str, low: int, high: int, why: str) -> int:
    """``value`` as a static int in ``[low, high]``, else ``ValueError`` naming the rule."""
    value = checks.static_int(value, rule, name)
    checks.require(
        low <= value <= high,
        rule,
        f"needs {low} <= {name} <= {high} ({why}); got {name}={value}.",
    )
    return value


def check_positive(value, rule: str, name: str) -> None:
    """Rejects a concrete ``value <= 0``; a traced value cannot be checked and is let through."""
    try:
        concrete = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    checks.require(concrete > 0, rule, f"needs {name} > 0; got {name}={value!r}.")


def check_choice(value, rule: str, name: str, choices: tuple) -> None:
    """Rejects a ``value`` outside ``choices``, listing them."""
    checks.require(
        value in choices,
        rule,
        f"unknown {name}={value!r}; choose one of {', '.join(map(repr, choices))}.",
    )


def cast_like(result, updates):
    """Casts every leaf of ``result`` to the dtype of the matching leaf of ``updates``."""
    return jax.tree.map(lambda out, leaf: out.astype(leaf.dtype), result, updates)


def weighted_mean(updates, weights, total):
    """``sum_i weights[i] * updates[i] / total`` per leaf, in each leaf's accumulation dtype.

    ``weights`` and ``total`` may be wider than a leaf (float64 weights of a tree that also has
    float32 leaves); each leaf's result keeps its own accumulation dtype, so that loops over
    iterations carry stable dtypes. Rows of weight 0 are left out exactly, even when they hold
    NaN or Inf.
    """

    def leaf_mean(leaf):
        summed = tree_util.weighted_sum_rows(leaf, weights)
        return summed / jnp.asarray(total).astype(summed.dtype)

    return jax.tree.map(leaf_mean, updates)
