"""The sign vote: signSGD with majority vote, coordinate by coordinate."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common

ZERO_SIGNS = (0, 1)


@_spec.declare(
    "aggregator", coordinate_slices=True, constraint=_spec.MAJORITY, cost="O(n d)",
    reference=(
        _spec.Reference("Bernstein, Wang, Azizzadenesheli, Anandkumar",
                        "signSGD: compressed optimisation for non-convex problems", "ICML", 2018),
        _spec.Reference("Bernstein, Zhao, Azizzadenesheli, Anandkumar",
                        "signSGD with majority vote is communication efficient and fault tolerant",
                        "ICLR", 2019),
    ),
    note="zero_sign=0 (sign(0) = 0) as in the ICML'18 code, torch/numpy, Election Coding and "
         "DETOX; the ICLR'19 bit packing sends 0 as +1 (zero_sign=1).",
)
def sign_majority(updates, *, f: int = 0, zero_sign: int = 0):
    """Majority vote of the workers' signs (signSGD with majority vote).

    ``agg = sign(sum_i sign(g_i))`` coordinate-wise. ``zero_sign`` is what ``sign(0)`` maps to,
    both for a worker's zero coordinate and for a tied vote: ``0`` (torch/numpy, ICML'18 code,
    Election Coding, DETOX) or ``1`` (the ICLR'19 bit packing sends 0 as +1). NaN values
    abstain (vote 0); ±Inf votes its sign. Needs ``n > 2f`` (the vote tolerates a minority of
    adversaries). The output holds -1, 0 or +1 in the input dtype.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers tolerated (only validated), ``n > 2f``.
      zero_sign: ``0`` or ``1``, the sign given to zeros and ties.

    Returns:
      A pytree like one worker's update.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, -2.0, 0.0], [3.0, 4.0, 0.0], [-5.0, -6.0, 1.0]])
      >>> sign_majority(g, f=1)
      Array([ 1., -1.,  1.], dtype=float32)
      >>> sign_majority(g[:2], zero_sign=1)
      Array([1., 1., 1.], dtype=float32)

    References:
      Bernstein, Wang, Azizzadenesheli, Anandkumar, `signSGD: compressed optimisation for
      non-convex problems`, ICML 2018.
      Bernstein, Zhao, Azizzadenesheli, Anandkumar, `signSGD with majority vote is communication
      efficient and fault tolerant`, ICLR 2019.
    """
    _common.workers_and_f(updates, f, sign_majority.spec)
    _common.check_choice(zero_sign, "sign_majority", "zero_sign", ZERO_SIGNS)

    def signs(x, abstain):
        positive = jnp.where(x > 0, 1.0, jnp.where(abstain, 0.0, float(zero_sign)))
        return jnp.where(x < 0, -1.0, positive)

    def vote(leaf):
        acc = tree_util.accumulation_dtype(leaf.dtype)
        ballots = [signs(row, jnp.isnan(row)).astype(acc) for row in tree_util.rows(leaf)]
        tally = tree_util.sum_rows(ballots)
        return signs(tally, jnp.zeros_like(tally, bool)).astype(leaf.dtype)

    return jax.tree.map(vote, updates)
