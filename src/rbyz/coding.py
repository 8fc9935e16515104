"""Redundancy and coding defences: DETOX, DRACO's repetition code and Election Coding.

These defences change *what the workers compute* before they change how the results are
aggregated: the same data is given to several workers, so that the master can compare their
answers.

- **Group codes** (DETOX, DRACO): ``n`` workers form ``n / r`` groups of ``r`` consecutive
  workers; every member of a group computes the gradient of the same batch
  (:func:`group_assignment`), so honest members send bit-identical vectors and a majority vote
  inside each group (:func:`group_vote`) removes every Byzantine vector of a group with an honest
  majority. DRACO (:func:`repetition_code`) averages the group winners; DETOX (:func:`detox`)
  feeds them to a cheap hierarchical robust aggregation that only has to handle the
  ``f_eff = floor(f / ceil(r / 2))`` groups the adversary can still win.
- **Election Coding** (sign domain): an allocation matrix ``G`` (``n`` workers x ``k`` data
  partitions) says which partitions each worker holds (:func:`bernoulli_code`,
  :func:`deterministic_code`, :func:`identity_code`); a worker sends the majority of its
  partitions' gradient signs and the master takes the majority of the workers' messages
  (:func:`election_vote`). :func:`vote_failures` counts exactly (or estimates) how often ``b``
  Byzantine workers can flip the master's vote; :func:`detox_vote_failures` does the same for
  DETOX's group vote under random placement.

Every rule exists as a function over stacked updates (worker or partition axis first) and as an
optax transform that must come first in a chain (:func:`detox_aggregate`,
:func:`repetition_aggregate`, :func:`election_vote_aggregate`).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rbyz import aggregators as _aggregators
from rbyz._src import checks
from rbyz._src import order_stats
from rbyz._src import tree as tree_util

Stage2 = Callable[..., object]

FALLBACKS = ("median", "boyer_moore")
STAGE2_PRESETS = ("median_of_means", "multi_krum", "bulyan")


# ------------------------------------------------------------------------------------------------
# Group codes: DETOX and DRACO.


def group_assignment(n: int, r: int) -> np.ndarray:
    """Which batch (group) each worker computes under a group code of redundancy ``r``.

    Worker ``i`` belongs to group ``i // r`` and computes the gradient of batch ``i // r``: a
    simulator draws one batch per group (e.g. with ``jax.random.fold_in(key, group)``) so that
    the honest members of a group produce bit-identical gradients. Needs ``r >= 1`` and
    ``r | n`` (the reference code's "last worker joins the last group" is not supported).

    Args:
      n: number of workers.
      r: group size (redundancy).

    Returns:
      ``int32`` NumPy array ``[n]``, the group (batch) index of every worker.

    Example:
      >>> group_assignment(6, 3)
      array([0, 0, 0, 1, 1, 1], dtype=int32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    n = checks.static_int(n, "group_assignment", "n", minimum=1)
    r = _check_group_size(n, r, "group_assignment")
    return np.arange(n, dtype=np.int32) // r


def _check_group_size(n: int, r, rule: str) -> int:
    r = checks.static_int(r, rule, "r", minimum=1)
    checks.require(
        n % r == 0,
        rule,
        f"needs the group size r to divide the worker count n; got n={n}, r={r}. "
        f"Use r in {[d for d in range(1, n + 1) if n % d == 0]} or change n.",
    )
    return r


def _members(leaf: jax.Array, r: int) -> list[jax.Array]:
    """``[n, ...]`` -> ``r`` arrays ``[n / r, ...]``: member ``a`` of every group."""
    grouped = leaf.reshape((leaf.shape[0] // r, r) + leaf.shape[1:])
    return [grouped[:, a] for a in range(r)]


def _equal_members(members_per_leaf: list[list[jax.Array]], a: int, b: int) -> jax.Array:
    """``[n / r]`` bool: members ``a`` and ``b`` of each group sent exactly the same update."""
    flags = [
        jnp.all((m[a] == m[b]).reshape(m[a].shape[0], -1), axis=1) for m in members_per_leaf
    ]
    return jnp.logical_and.reduce(jnp.stack(flags), axis=0)


def _agreement(members_per_leaf: list[list[jax.Array]], r: int) -> list[list[jax.Array]]:
    """``eq[a][b]``: ``[n / r]`` bool exact equality of members ``a`` and ``b`` (r x r pairs)."""
    groups = members_per_leaf[0][0].shape[0]
    eq = [[jnp.ones((groups,), bool) for _ in range(r)] for _ in range(r)]
    for a, b in itertools.combinations(range(r), 2):
        eq[a][b] = eq[b][a] = _equal_members(members_per_leaf, a, b)
    return eq


def _majority_member(eq: list[list[jax.Array]], r: int) -> jax.Array:
    """``[n / r]`` int32: the first member agreeing with > r/2 members (itself included), or -1."""
    needed = r // 2 + 1
    winner = jnp.full(eq[0][0].shape, -1, jnp.int32)
    for a in reversed(range(r)):
        votes = tree_util.sum_rows([row.astype(jnp.int32) for row in eq[a]])
        winner = jnp.where(votes >= needed, a, winner)
    return winner


def _boyer_moore_member(eq: list[list[jax.Array]], r: int) -> jax.Array:
    """``[n / r]`` int32: Boyer-Moore's final candidate, as the reference code's vote returns it."""
    candidate = jnp.zeros(eq[0][0].shape, jnp.int32)
    count = jnp.ones(eq[0][0].shape, jnp.int32)
    for a in range(1, r):
        same = _select([eq[c][a] for c in range(a)], candidate, eq[0][a])
        restart = count == 0
        candidate = jnp.where(restart, a, candidate)
        count = jnp.where(restart, 1, jnp.where(same, count + 1, count - 1))
    return candidate


def _select(options: list[jax.Array], index: jax.Array, default: jax.Array) -> jax.Array:
    """``options[index[g]][g]`` per group, ``default[g]`` where ``index`` names no option."""
    out = default
    for a, option in enumerate(options):
        pick = (index == a).reshape(index.shape + (1,) * (option.ndim - 1))
        out = jnp.where(pick, option, out)
    return out


def group_vote(updates, *, r: int, fallback: str = "median"):
    """Majority vote inside each group of ``r`` consecutive workers (stage 1 of DETOX and DRACO).

    Members ``a`` and ``b`` of a group agree when their whole updates are exactly equal (every
    leaf, every coordinate; NaN agrees with nothing). The group's output is a member agreeing
    with at least ``floor(r / 2) + 1`` members, itself included. When no member has such a
    majority (possible only if some member is Byzantine or honest computation is not
    deterministic), ``fallback`` decides:

    - ``"median"`` (default): the coordinate-wise median of the group's ``r`` updates (NaN
      sorts last), which stays inside the honest range when honest members are a plurality;
    - ``"boyer_moore"``: the final candidate of the Boyer-Moore majority algorithm over the
      members in order, as the DETOX and DRACO reference code returns it (with a strict
      majority both agree).

    If a group has fewer than ``ceil(r / 2)`` Byzantine members, its honest members (identical
    by :func:`group_assignment`) hold the majority and the output is exactly their update.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``, workers ordered by group.
      r: group size; needs ``r | n``.
      fallback: ``"median"`` or ``"boyer_moore"``.

    Returns:
      Stacked pytree, every leaf ``[n / r, ...]``: one update per group, input dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0], [1.0, 2.0], [-100.0, -200.0], [3.0, 4.0], [5.0, 6.0],
      ...                [3.0, 4.0]])
      >>> group_vote(x, r=3)
      Array([[1., 2.],
             [3., 4.]], dtype=float32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
      Chen, Wang, Charles, Papailiopoulos, `DRACO: Byzantine-resilient Distributed Training via
      Redundant Gradients`, ICML 2018.
    """
    n = tree_util.num_workers(updates, "group_vote")
    r = _check_group_size(n, r, "group_vote")
    checks.require(
        fallback in FALLBACKS,
        "group_vote",
        f"unknown fallback {fallback!r}; use one of {FALLBACKS}.",
    )
    leaves, treedef = jax.tree.flatten(updates)
    members = [_members(leaf, r) for leaf in leaves]
    eq = _agreement(members, r)
    if fallback == "boyer_moore":
        candidate = _boyer_moore_member(eq, r)
        voted = [_select(m, candidate, m[0]) for m in members]
    else:
        winner = _majority_member(eq, r)
        voted = [_select(m, winner, order_stats.median(jnp.stack(m))) for m in members]
    return jax.tree.unflatten(treedef, voted)


def repetition_code(updates, *, f: int, r: int | None = None, fallback: str = "median"):
    """DRACO's repetition code: the mean of the group majorities.

    ``out = (r / n) * sum_g vote(group g)`` with groups of ``r = 2s + 1`` workers computing the
    same batch (:func:`group_assignment`). With ``f <= (r - 1) / 2`` Byzantine workers no group
    can lose its honest majority, so the output is exactly the mean of the honest group
    gradients, whatever the attack.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``, workers ordered by group.
      f: number of Byzantine workers to tolerate.
      r: group size; default ``2f + 1``. Needs ``r >= 2f + 1`` and ``r | n``.
      fallback: see :func:`group_vote` (only used when some group has no majority).

    Returns:
      The aggregated pytree (leaves ``[...]``), input dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0], [1.0], [9.0], [3.0], [3.0], [3.0]])
      >>> repetition_code(x, f=1)
      Array([2.], dtype=float32)

    References:
      Chen, Wang, Charles, Papailiopoulos, `DRACO: Byzantine-resilient Distributed Training via
      Redundant Gradients`, ICML 2018.
    """
    n = tree_util.num_workers(updates, "repetition_code")
    f = checks.static_int(f, "repetition_code", "f", minimum=0)
    r = 2 * f + 1 if r is None else checks.static_int(r, "repetition_code", "r", minimum=1)
    checks.byzantine_count(f, r, "repetition_code", "group size r >= 2f + 1 (read n as r)",
                           lambda size, f: size >= 2 * f + 1)
    voted = group_vote(updates, r=_check_group_size(n, r, "repetition_code"), fallback=fallback)
    return jax.tree.map(tree_util.mean_rows, voted)


def _aggregator(name: str) -> Callable:
    """``rbyz.aggregators.<name>``, with a clear error while that module lacks it."""
    rule = getattr(_aggregators, name, None)
    checks.require(
        rule is not None,
        "detox",
        f"needs rbyz.aggregators.{name}, which is not available; pass stage2= a callable "
        "instead.",
    )
    return rule


def plain(rule: Callable) -> Callable:
    """``rule`` called with ``f=0`` whatever ``f`` it is given.

    For the non-robust steps of :func:`hierarchical` (the mean inside a bucket of DETOX-MoM, the
    mean of the bucket results of DETOX-MultiKrum), which must not be checked against ``f``.

    Args:
      rule: an aggregator ``rule(updates, *, f)``.

    Returns:
      ``wrapped(updates, *, f=0) -> rule(updates, f=0)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import aggregators
      >>> plain(aggregators.mean)(jnp.array([[1.0], [3.0]]), f=5)
      Array([2.], dtype=float32)
    """

    def wrapped(updates, *, f: int = 0):
        del f
        return rule(updates, f=0)

    return wrapped


def hierarchical(inner: Callable, outer: Callable, *, buckets: int) -> Stage2:
    """Hierarchical aggregation: an inner rule A1 per bucket, then an outer rule A0 over buckets.

    ``out = A0(A1(B_1), ..., A1(B_k))`` where ``B_1..B_k`` split the (optionally randomly
    permuted) rows into ``k = buckets`` consecutive buckets, sizes differing by at most one
    (``np.array_split``). Both rules receive ``f`` as a keyword (``rule(stacked, *, f)``), so any
    ``rbyz.aggregators`` function fits.

    Args:
      inner: A1, applied to each bucket.
      outer: A0, applied to the ``k`` bucket results.
      buckets: number of buckets ``k``, ``1 <= k <= rows``.

    Returns:
      ``stage2(updates, *, f, key=None) -> pytree``, usable as ``detox(..., stage2=...)``; with a
      ``key`` the rows are permuted at random first (as the reference DETOX does every step).

    Example:
      >>> import jax.numpy as jnp
      >>> from rbyz import aggregators
      >>> mom = hierarchical(plain(aggregators.mean), aggregators.median, buckets=3)
      >>> mom(jnp.array([[1.0], [3.0], [5.0], [7.0], [100.0], [300.0]]), f=1)
      Array([6.], dtype=float32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    buckets = checks.static_int(buckets, "hierarchical", "buckets", minimum=1)

    def stage2(updates, *, f: int, key=None):
        n = tree_util.num_workers(updates, "hierarchical")
        checks.require(
            buckets <= n,
            "hierarchical",
            f"needs buckets <= rows; got buckets={buckets}, rows={n}. Use fewer buckets.",
        )
        if key is not None:
            order = jax.random.permutation(checks.as_key(key, "hierarchical"), n)
            updates = tree_util.take_rows(updates, order)
        results = [
            inner(jax.tree.map(lambda x, idx=idx: x[idx[0]:idx[-1] + 1], updates), f=f)
            for idx in np.array_split(np.arange(n), buckets)
        ]
        return outer(jax.tree.map(lambda *xs: jnp.stack(xs), *results), f=f)

    return stage2


def effective_byzantine_groups(f: int, r: int) -> int:
    """Most groups the adversary can win after the vote: ``f_eff = floor(f / ceil(r / 2))``.

    A group of ``r`` outputs a Byzantine (or fallback) value only if at least ``ceil(r / 2)`` of
    its members are Byzantine.

    Args:
      f: Byzantine workers, ``f >= 0``.
      r: group size, ``r >= 1``.

    Returns:
      ``f_eff`` as a Python int.

    Example:
      >>> effective_byzantine_groups(5, 3)
      2

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    f = checks.static_int(f, "detox", "f", minimum=0)
    r = checks.static_int(r, "detox", "r", minimum=1)
    return f // -(-r // 2)


def _preset(name: str, groups: int, f_eff: int, buckets: int | None) -> Stage2:
    """The reference code's stage-2 modes, checked against the number of groups."""
    checks.require(
        name in STAGE2_PRESETS,
        "detox",
        f"unknown stage2 {name!r}; use one of {STAGE2_PRESETS} or a callable.",
    )
    where = f"got n/r={groups} groups, f_eff={f_eff}"
    if name == "median_of_means":
        k = buckets or min(d for d in range(1, groups + 1) if groups % d == 0 and
                           d >= min(2 * f_eff + 1, groups))
        checks.require(
            groups % k == 0 and k >= 2 * f_eff + 1,
            "detox",
            f"median_of_means needs buckets k | n/r and k >= 2 f_eff + 1; {where}, k={k}. "
            "Use more groups, a smaller r or fewer Byzantine workers.",
        )
        return hierarchical(plain(_aggregator("mean")), _aggregator("median"), buckets=k)
    if name == "multi_krum":
        k = buckets or 2
        smallest = groups // k
        checks.require(
            smallest >= 2 * f_eff + 3,
            "detox",
            f"multi_krum needs every bucket to hold >= 2 f_eff + 3 groups; {where}, "
            f"buckets={k} (smallest {smallest}). Use fewer buckets or more workers.",
        )
        return hierarchical(_multi_krum_in_bucket, plain(_aggregator("mean")), buckets=k)
    checks.require(
        groups >= 4 * f_eff + 3,
        "detox",
        f"bulyan needs n/r >= 4 f_eff + 3; {where}. Use more workers or a smaller r.",
    )
    return hierarchical(_aggregator("bulyan"), plain(_aggregator("mean")), buckets=1)


def _multi_krum_in_bucket(bucket, *, f: int):
    """Multi-Krum selecting ``m = rows - f - 2`` vectors, as DETOX's reference does."""
    rows = tree_util.num_workers(bucket, "detox")
    return _aggregator("multi_krum")(bucket, f=f, m=rows - f - 2)


def detox(updates, *, f: int, r: int, stage2: str | Stage2 = "median_of_means",
          buckets: int | None = None, fallback: str = "median", key=None):
    """DETOX: majority vote inside groups of ``r`` workers, then hierarchical robust aggregation.

    Stage 1: :func:`group_vote` reduces the ``n`` updates to ``n / r`` group winners; at most
    ``f_eff = floor(f / ceil(r / 2))`` of them can be Byzantine
    (:func:`effective_byzantine_groups`). Stage 2 aggregates the winners with ``f = f_eff``:

    - ``"median_of_means"`` (default, DETOX-MoM): ``k`` buckets, mean per bucket, coordinate
      median of the ``k`` means. Default ``k``: the smallest divisor of ``n / r`` that is
      ``>= 2 f_eff + 1`` (5 for the paper's n=45, r=3, f=5). Needs ``k | n/r``,
      ``k >= 2 f_eff + 1``.
    - ``"multi_krum"``: ``k = 2`` buckets (``np.array_split``), ``rbyz.aggregators.multi_krum``
      with ``f_eff`` and ``m = bucket size - f_eff - 2`` in each, mean of the two outputs. Needs
      every bucket ``>= 2 f_eff + 3``.
    - ``"bulyan"``: ``rbyz.aggregators.bulyan`` on all winners with ``f_eff`` (the library's
      Bulyan, not the reference's one-pass variant). Needs ``n / r >= 4 f_eff + 3``.
    - a callable ``stage2(winners, *, f, key)``, e.g. from :func:`hierarchical`.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``, workers ordered by group
        (:func:`group_assignment`).
      f: number of Byzantine workers (Python int).
      r: group size; needs ``r | n``.
      stage2: a preset name or a callable, see above.
      buckets: number of stage-2 buckets for the presets (default as above).
      fallback: group vote without a majority, see :func:`group_vote`.
      key: optional PRNG key or int seed; permutes the winners before bucketing, as the
        reference code does every step. ``None`` keeps the group order.

    Returns:
      The aggregated pytree (leaves ``[...]``), input dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> honest = jnp.arange(15.0).reshape(15, 1)  # one gradient per group
      >>> x = jnp.repeat(honest, 3, axis=0).at[0:2].set(1e30)  # 2 Byzantine workers in group 0
      >>> detox(x, f=2, r=3)  # median of the means of 3 buckets of 5 groups: 2e29, 7, 12
      Array([12.], dtype=float32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    n = tree_util.num_workers(updates, "detox")
    r = _check_group_size(n, r, "detox")
    f = checks.byzantine_count(f, n, "detox", "0 <= f < n", lambda n, f: f < n)
    f_eff = effective_byzantine_groups(f, r)
    if not callable(stage2):
        stage2 = _preset(stage2, n // r, f_eff, buckets)
    winners = group_vote(updates, r=r, fallback=fallback)
    return stage2(winners, f=f_eff, key=key)


# ------------------------------------------------------------------------------------------------
# Election Coding (sign domain).


def _check_code(G, rule: str, *, partitions: int | None = None) -> np.ndarray:
    """``G`` as a concrete ``int32`` ``[n, k]`` 0/1 matrix with no empty row, or ``ValueError``."""
    try:
        G = np.asarray(G)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"{rule}: the allocation matrix G must be concrete (a NumPy array): it fixes which "
            "partitions each worker adds up. Build it outside jit."
        ) from None
    checks.require(G.ndim == 2 and G.size > 0, rule,
                   f"G must be a non-empty [n workers, k partitions] matrix; got shape {G.shape}.")
    checks.require(bool(np.all((G == 0) | (G == 1))), rule, "G must hold only 0 and 1 entries.")
    empty = np.flatnonzero(G.sum(axis=1) == 0)
    checks.require(
        empty.size == 0,
        rule,
        f"every worker needs at least one partition; rows {empty.tolist()} of G are empty. "
        "Redraw the code (bernoulli_code redraws automatically).",
    )
    if partitions is not None:
        checks.require(
            G.shape[1] == partitions,
            rule,
            f"G has {G.shape[1]} columns but the updates hold {partitions} partitions (first "
            "axis); pass one gradient per partition, G of shape [n, k].",
        )
    return G.astype(np.int32)


def identity_code(n: int) -> np.ndarray:
    """The uncoded allocation ``G = I_n``: worker ``j`` holds partition ``j`` (SignSGD-MV).

    Args:
      n: number of workers (= partitions), ``n >= 1``.

    Returns:
      ``int32`` NumPy array ``[n, n]``; redundancy 1.

    Example:
      >>> identity_code(3)
      array([[1, 0, 0],
             [0, 1, 0],
             [0, 0, 1]], dtype=int32)

    References:
      Bernstein, Zhao, Azizzadenesheli, Anandkumar, `signSGD with Majority Vote is Communication
      Efficient and Fault Tolerant`, ICLR 2019.
    """
    n = checks.static_int(n, "identity_code", "n", minimum=1)
    return np.eye(n, dtype=np.int32)


def bernoulli_code(n: int, r: float, *, key, partitions: int | None = None,
                   max_draws: int = 1000) -> np.ndarray:
    """Random Bernoulli allocation: ``G[j, i] ~ Bernoulli(p)`` iid with ``p = r / n``.

    ``E[redundancy] = p * k`` (``= r`` for the paper's ``k = n``). As the reference code does, G
    is redrawn until no worker is empty (columns are not checked).

    Args:
      n: number of workers, ``n >= 1``.
      r: target redundancy, ``0 < r <= n``.
      key: PRNG key or int seed.
      partitions: number of data partitions ``k`` (default ``n``).
      max_draws: give up (``ValueError``) after this many draws.

    Returns:
      ``int32`` NumPy array ``[n, k]``.

    Example:
      >>> G = bernoulli_code(9, 3.0, key=0)
      >>> G.shape, bool((G.sum(axis=1) > 0).all())
      ((9, 9), True)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    n = checks.static_int(n, "bernoulli_code", "n", minimum=1)
    k = n if partitions is None else checks.static_int(partitions, "bernoulli_code",
                                                        "partitions", minimum=1)
    checks.require(0 < r <= n, "bernoulli_code",
                   f"needs 0 < r <= n (p = r/n is a probability); got n={n}, r={r}.")
    key = checks.as_key(key, "bernoulli_code")
    for _ in range(max_draws):
        key, draw = jax.random.split(key)
        G = np.asarray(jax.random.bernoulli(draw, r / n, (n, k)), dtype=np.int32)
        if G.sum(axis=1).min() > 0:
            return G
    raise ValueError(
        f"bernoulli_code: no draw without an empty worker in {max_draws} tries (n={n}, r={r}); "
        "use a larger r."
    )


_DETERMINISTIC_CODES = {
    (5, 1): ((1, 0, 0, 0, 0),
             (0, 1, 1, 1, 0),
             (1, 1, 1, 1, 1),
             (1, 1, 1, 1, 1),
             (1, 1, 1, 1, 1)),
}


def deterministic_code(n: int, b: int) -> np.ndarray:
    """The deterministic Election Coding allocation that no ``b`` Byzantine workers can defeat.

    Only the paper's example is available: ``n = 5, b = 1``, redundancy ``19 / 5 = 3.8``. Workers
    3-5 hold all partitions, so they send the true majority; workers 1 and 2 hold disjoint
    partition sets, so they cannot both send its negation, and one Byzantine worker never flips
    the vote (checked exhaustively by :func:`vote_failures`).

    Args:
      n: number of workers.
      b: number of Byzantine workers to tolerate.

    Returns:
      ``int32`` NumPy array ``[n, n]``.

    Example:
      >>> deterministic_code(5, 1).sum(axis=1)
      array([1, 3, 5, 5, 5])

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    checks.require(
        (n, b) in _DETERMINISTIC_CODES,
        "deterministic_code",
        f"only (n, b) in {sorted(_DETERMINISTIC_CODES)} is available (the paper's example); got "
        f"n={n}, b={b}. Use bernoulli_code for other sizes.",
    )
    return np.array(_DETERMINISTIC_CODES[(n, b)], dtype=np.int32)


class Redundancy(NamedTuple):
    """Computational redundancy of an allocation matrix."""

    r: float  # partitions per worker, averaged over workers
    r_eff: float  # r times the per-partition batch ratio to the uncoded run


def redundancy(G, *, batch_ratio: float = 1.0) -> Redundancy:
    """Redundancy ``r = (1/n) sum_{j,i} G[j, i]`` and effective redundancy ``r_eff = rho * r``.

    ``rho`` (``batch_ratio``) is the per-partition batch size of the coded run divided by that of
    the uncoded run (the reference runs use 0.5, e.g. global batch 120 against 240).

    Args:
      G: allocation matrix ``[n, k]``.
      batch_ratio: ``rho > 0``.

    Returns:
      :class:`Redundancy` ``(r, r_eff)``.

    Example:
      >>> redundancy(deterministic_code(5, 1), batch_ratio=0.5)
      Redundancy(r=3.8, r_eff=1.9)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    G = _check_code(G, "redundancy")
    checks.require(batch_ratio > 0, "redundancy", f"needs batch_ratio > 0; got {batch_ratio}.")
    r = float(G.sum()) / G.shape[0]
    return Redundancy(r, r * batch_ratio)


def _check_byzantine(byzantine: Sequence[int], n: int, rule: str) -> tuple[int, ...]:
    byzantine = tuple(int(j) for j in byzantine)
    checks.require(
        len(set(byzantine)) == len(byzantine) and all(0 <= j < n for j in byzantine)
        and len(byzantine) < n,
        rule,
        f"byzantine must list distinct worker indices in [0, {n}) and leave an honest worker; "
        f"got {byzantine}.",
    )
    return byzantine


def local_majorities(partition_grads, G):
    """Every worker's message ``M_j = sign(sum_i G[j, i] sign(g_i))`` (``sign(0) = 0``).

    Args:
      partition_grads: stacked pytree, every leaf ``[k, ...]``: one gradient per partition.
      G: allocation matrix ``[n, k]`` (concrete).

    Returns:
      Stacked pytree, every leaf ``[n, ...]`` float32 in ``{-1, 0, 1}`` (exact integer sums).

    Example:
      >>> import jax.numpy as jnp
      >>> local_majorities(jnp.array([[1.0], [-2.0], [3.0]]), [[1, 1, 1], [1, 1, 0]])
      Array([[1.],
             [0.]], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    k = tree_util.num_workers(partition_grads, "election_vote")
    G = _check_code(G, "election_vote", partitions=k)

    def leaf_messages(leaf):
        signs = tree_util.rows(jnp.sign(leaf.astype(jnp.float32)))
        return jnp.stack([
            jnp.sign(tree_util.sum_rows([signs[i] for i in np.flatnonzero(row)])) for row in G
        ])

    return jax.tree.map(leaf_messages, partition_grads)


def _inject(messages, byzantine: tuple[int, ...], attack: Callable, key):
    """Replaces the Byzantine workers' messages by ``attack(own, *, f=b, key=key)``, where
    ``own`` are their honest messages (what a Byzantine worker knows in the reference)."""
    bad = np.array(byzantine)
    sent = attack(tree_util.take_rows(messages, bad), f=len(bad), key=key)
    return jax.tree.map(lambda m, s: m.at[bad].set(s.astype(m.dtype)), messages, sent)


def _resolve_attack(attack) -> Callable | None:
    if attack is None or callable(attack):
        return attack
    from rbyz import attacks  # resolved late: the registry fills as rbyz is imported

    return attacks.get(attack)


def election_vote(partition_grads, G, *, byzantine: Sequence[int] = (),
                  attack: str | Callable | None = "sign_reverse", key=None):
    """Election Coding: workers vote on their partitions' signs, the master on the workers'.

    ``M_j = sign(sum_i G[j, i] sign(g_i))`` (:func:`local_majorities`), the Byzantine rows of
    ``M`` replaced by the attack, then ``v = sign(sum_j M_j)`` with ``sign(0) = 0`` (a tie does
    not move the coordinate). Sums are exact integers in float32. ``G = I`` is SignSGD with
    majority vote.

    Args:
      partition_grads: stacked pytree, every leaf ``[k, ...]``: one gradient per partition.
      G: allocation matrix ``[n, k]`` (concrete): 0/1, no empty row.
      byzantine: static indices of the Byzantine workers (the reference draws them once).
      attack: a sign-domain attack from ``rbyz.attacks`` (name or function
        ``attack(own, *, f=b, key=key) -> [b, ...]``), given the Byzantine workers' own honest
        messages ``own``; default ``"sign_reverse"``, the reference's (each sends the negation
        of its honest message). ``None``: no attack.
      key: PRNG key for a random attack (e.g. ``"sign_random"``).

    Returns:
      Pytree of votes in ``{-1, 0, 1}``, leaves ``[...]``, input dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, -1.0], [2.0, -3.0], [-1.0, 4.0], [5.0, -2.0], [-3.0, -1.0]])
      >>> election_vote(g, identity_code(5), byzantine=(0,))  # uncoded: one flip wins
      Array([-1., -1.], dtype=float32)
      >>> election_vote(g, deterministic_code(5, 1), byzantine=(0,))
      Array([ 1., -1.], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    messages = local_majorities(partition_grads, G)
    byzantine = _check_byzantine(byzantine, np.asarray(G).shape[0], "election_vote")
    attack = _resolve_attack(attack)
    if byzantine and attack is not None:
        messages = _inject(messages, byzantine, attack, key)
    return jax.tree.map(
        lambda m, g: jnp.sign(tree_util.sum_rows(m)).astype(g.dtype), messages, partition_grads
    )


# ------------------------------------------------------------------------------------------------
# Failure analysis.


class VoteFailures(NamedTuple):
    """How often ``b`` Byzantine workers flip the master's vote away from the true majority."""

    failures: int  # failing (sign pattern, Byzantine placement) pairs
    trials: int  # pairs examined (patterns with a tied true majority are skipped)
    rate: float  # failures / trials
    exact: bool  # True: every pair enumerated; False: a Monte Carlo estimate


def _support(G: jax.Array, patterns: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each honest message times the true majority ``mu`` (``[P, n]``, in {-1, 0, 1}), and
    whether ``mu != 0`` (``[P]``)."""
    mu = jnp.sign(tree_util.sum_rows(patterns.T))
    messages = jnp.sign(jnp.matmul(patterns, G.T, precision=jax.lax.Precision.HIGHEST))
    return messages * mu[:, None], mu != 0


@jax.jit
def _exact_failures(G, patterns, placements, b):
    """Failing pairs over all patterns x all placements (rows of ``placements``: 0/1 ``[C, n]``).

    The adversary sends ``-mu``: the vote fails when ``sum_{j not in B} c_j - b <= 0``.
    """
    support, decided = _support(G, patterns)
    kept = support.sum(axis=1)[:, None] - jnp.matmul(
        support, placements.T, precision=jax.lax.Precision.HIGHEST)
    fails = (kept - b <= 0) & decided[:, None]
    return fails.sum(), decided.sum() * placements.shape[0]


@jax.jit(static_argnames=("b", "samples"))
def _sampled_failures(G, key, *, b, samples):
    """Monte Carlo: uniform sign patterns, uniform ``b``-subsets, adversary sends ``-mu``."""
    pattern_key, placement_key = jax.random.split(key)
    n, k = G.shape
    patterns = jnp.where(jax.random.bernoulli(pattern_key, 0.5, (samples, k)), 1.0, -1.0)
    placements = _random_subsets(placement_key, samples, n, b).astype(jnp.float32)
    support, decided = _support(G, patterns)
    kept = jnp.sum(support * (1.0 - placements), axis=1)
    return ((kept - b <= 0) & decided).sum(), decided.sum()


def _random_subsets(key, samples: int, n: int, size: int) -> jax.Array:
    """``[samples, n]`` bool, each row a uniform random subset of ``size`` of the ``n`` slots."""
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (samples, n)), axis=1), axis=1)
    return ranks < size


def _all_patterns(k: int) -> np.ndarray:
    bits = (np.arange(2**k)[:, None] >> np.arange(k)[None, :]) & 1
    return np.where(bits == 1, 1.0, -1.0).astype(np.float32)


def _all_placements(n: int, b: int) -> np.ndarray:
    placements = np.zeros((math.comb(n, b), n), np.float32)
    for row, subset in enumerate(itertools.combinations(range(n), b)):
        placements[row, list(subset)] = 1.0
    return placements


def vote_failures(G, b: int, *, method: str = "auto", samples: int = 1 << 16, key=0,
                  max_exact: int = 1 << 22) -> VoteFailures:
    """Failure count of the Election Coding vote against ``b`` Byzantine workers.

    For a sign pattern ``s in {-1, 1}^k`` of the partitions and a Byzantine set ``B`` of size
    ``b``, the honest workers send ``M_j = sign(G_j s)`` and the Byzantine ones the worst
    message, ``-mu`` with ``mu = sign(sum_i s_i)``; the vote fails when
    ``sign(sum_j M_j) != mu``. Patterns with ``mu = 0`` (even ``k``) are skipped.
    ``method="exact"`` enumerates all ``2^k x C(n, b)`` pairs; ``"monte_carlo"`` samples
    ``samples`` uniform pairs under jit; ``"auto"`` is exact when ``2^k * C(n, b) <= max_exact``.

    Args:
      G: allocation matrix ``[n, k]``.
      b: Byzantine workers, ``0 <= b <= n``.
      method: ``"auto"``, ``"exact"`` or ``"monte_carlo"``.
      samples: Monte Carlo pairs.
      key: PRNG key or int seed for Monte Carlo.
      max_exact: largest enumeration ``"auto"`` does exactly.

    Returns:
      :class:`VoteFailures`; ``failures == 0`` with ``exact=True`` proves the code tolerates
      any ``b`` Byzantine workers.

    Example:
      >>> vote_failures(deterministic_code(5, 1), 1)
      VoteFailures(failures=0, trials=160, rate=0.0, exact=True)
      >>> vote_failures(identity_code(5), 1).failures > 0
      True

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    G = _check_code(G, "vote_failures")
    n, k = G.shape
    b = checks.static_int(b, "vote_failures", "b", minimum=0)
    checks.require(b <= n, "vote_failures", f"needs 0 <= b <= n; got n={n}, b={b}.")
    checks.require(method in ("auto", "exact", "monte_carlo"), "vote_failures",
                   f"unknown method {method!r}; use 'auto', 'exact' or 'monte_carlo'.")
    if method == "exact" or (method == "auto" and 2**k * math.comb(n, b) <= max_exact):
        failures, trials = _exact_failures(
            jnp.asarray(G, jnp.float32), _all_patterns(k), _all_placements(n, b), float(b))
        exact = True
    else:
        samples = checks.static_int(samples, "vote_failures", "samples", minimum=1)
        failures, trials = _sampled_failures(jnp.asarray(G, jnp.float32),
                                             checks.as_key(key, "vote_failures"), b=b,
                                             samples=samples)
        exact = False
    failures, trials = int(failures), int(trials)
    return VoteFailures(failures, trials, failures / max(trials, 1), exact)


class GroupVoteFailures(NamedTuple):
    """Byzantine-won groups of DETOX's vote when ``f`` Byzantine workers are placed at random."""

    worst_case: int  # f_eff = floor(f / ceil(r/2)) capped at the group count
    expected: float  # E[# groups with >= ceil(r/2) Byzantine members]
    prob_any: float  # P(at least one such group)
    exact: bool


def _bad_group_distribution(n: int, r: int, f: int) -> list[int]:
    """``ways[t]``: placements of ``f`` Byzantine workers with exactly ``t`` groups having
    ``>= ceil(r/2)`` Byzantine members (dynamic programming over groups, exact integers)."""
    threshold = -(-r // 2)
    ways = {(0, 0): 1}  # (placed, bad groups) -> count
    for _ in range(n // r):
        nxt: dict[tuple[int, int], int] = {}
        for (placed, bad), count in ways.items():
            for j in range(min(r, f - placed) + 1):
                state = (placed + j, bad + (j >= threshold))
                nxt[state] = nxt.get(state, 0) + count * math.comb(r, j)
        ways = nxt
    groups = n // r
    return [ways.get((f, t), 0) for t in range(groups + 1)]


@jax.jit(static_argnames=("n", "r", "f", "samples"))
def _sampled_bad_groups(key, *, n, r, f, samples):
    placed = _random_subsets(key, samples, n, f).reshape(samples, n // r, r)
    bad = placed.sum(axis=2) >= -(-r // 2)
    return bad.sum(), bad.any(axis=1).sum()


def detox_vote_failures(n: int, r: int, f: int, *, method: str = "exact",
                        samples: int = 1 << 16, key=0) -> GroupVoteFailures:
    """How many groups ``f`` randomly placed Byzantine workers win in DETOX's vote.

    A group is lost when at least ``ceil(r / 2)`` of its ``r`` members are Byzantine (they send
    identical vectors). The worst case over placements is ``f_eff = floor(f / ceil(r/2))``
    (capped at ``n / r``); under a uniform random placement ``"exact"`` counts all
    ``C(n, f)`` placements by dynamic programming over groups and ``"monte_carlo"`` samples
    ``samples`` placements under jit.

    Args:
      n: workers; ``r | n``.
      r: group size.
      f: Byzantine workers, ``0 <= f <= n``.
      method: ``"exact"`` or ``"monte_carlo"``.
      samples: Monte Carlo placements.
      key: PRNG key or int seed for Monte Carlo.

    Returns:
      :class:`GroupVoteFailures`.

    Example:
      >>> out = detox_vote_failures(45, 3, 5)
      >>> out.worst_case, round(out.expected, 4), round(out.prob_any, 4)
      (2, 0.4334, 0.4027)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    n = checks.static_int(n, "detox_vote_failures", "n", minimum=1)
    r = _check_group_size(n, r, "detox_vote_failures")
    f = checks.byzantine_count(f, n, "detox_vote_failures", "0 <= f <= n", lambda n, f: f <= n)
    checks.require(method in ("exact", "monte_carlo"), "detox_vote_failures",
                   f"unknown method {method!r}; use 'exact' or 'monte_carlo'.")
    worst = min(effective_byzantine_groups(f, r), n // r)
    if method == "exact":
        ways = _bad_group_distribution(n, r, f)
        total = math.comb(n, f)
        expected = sum(t * w for t, w in enumerate(ways)) / total
        return GroupVoteFailures(worst, expected, 1.0 - ways[0] / total, True)
    samples = checks.static_int(samples, "detox_vote_failures", "samples", minimum=1)
    bad, any_bad = _sampled_bad_groups(checks.as_key(key, "detox_vote_failures"), n=n, r=r, f=f,
                                       samples=samples)
    return GroupVoteFailures(worst, int(bad) / samples, int(any_bad) / samples, False)


# ------------------------------------------------------------------------------------------------
# Optax transforms.


def detox_aggregate(*, f: int, r: int, stage2: str | Stage2 = "median_of_means",
                    buckets: int | None = None, fallback: str = "median", key=None,
                    axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
    """:func:`detox` as an optax transform over stacked worker updates.

    It consumes updates with the worker axis first (``[n, ...]``, grouped as
    :func:`group_assignment` says) and returns the aggregate, so it must come first in a chain;
    ``MultiSteps`` and ``apply_every`` do not compose with it. With a ``key`` the winners are
    permuted at random each step (the key lives in the state).

    Args:
      f: number of Byzantine workers.
      r: group size.
      stage2: see :func:`detox`.
      buckets: see :func:`detox`.
      fallback: see :func:`group_vote`.
      key: optional PRNG key or int seed.
      axis_name: ``None`` for stacked updates, or the worker axis to gather over (collective
        mode, see ``rbyz.transforms.aggregate``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (state
      ``rbyz.transforms.AggregateState``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(detox_aggregate(f=1, r=3), optax.sgd(1.0))
      >>> grads = jnp.repeat(jnp.array([[1.0], [2.0], [3.0]]), 3, axis=0).at[4].set(-50.0)
      >>> params = jnp.zeros(1)
      >>> tx.update(grads, tx.init(params), params)[0]
      Array([-2.], dtype=float32)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    from rbyz import transforms  # rbyz.transforms builds on this module's siblings

    return transforms.aggregate(detox, axis_name=axis_name, key=key, f=f, r=r, stage2=stage2,
                                buckets=buckets, fallback=fallback)


def repetition_aggregate(*, f: int, r: int | None = None, fallback: str = "median",
                         axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
    """:func:`repetition_code` (DRACO) as an optax transform; it must come first in a chain.

    Args:
      f: number of Byzantine workers.
      r: group size (default ``2f + 1``).
      fallback: see :func:`group_vote`.
      axis_name: ``None`` for stacked updates, or the worker axis to gather over.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = repetition_aggregate(f=1)
      >>> tx.update(jnp.array([[1.0], [7.0], [1.0]]), tx.init(None))[0]
      Array([1.], dtype=float32)

    References:
      Chen, Wang, Charles, Papailiopoulos, `DRACO: Byzantine-resilient Distributed Training via
      Redundant Gradients`, ICML 2018.
    """
    from rbyz import transforms

    return transforms.aggregate(repetition_code, axis_name=axis_name, f=f, r=r,
                                fallback=fallback)


def election_vote_aggregate(G, *, byzantine: Sequence[int] = (),
                            attack: str | Callable | None = "sign_reverse", key=None,
                            axis_name: str | None = None,
                            ) -> optax.GradientTransformationExtraArgs:
    """:func:`election_vote` as an optax transform, in place of a plain majority vote.

    It consumes per-partition gradients (``[k, ...]``, partition axis first) and returns the
    master's vote in ``{-1, 0, 1}``, so it comes first in a ``signsgd_majority``-style chain,
    e.g. ``optax.chain(election_vote_aggregate(G), optax.sgd(lr, momentum=0.9))`` as in the
    paper's runs. The key for a random attack lives in the state.

    Args:
      G: allocation matrix ``[n, k]`` (concrete).
      byzantine: static Byzantine worker indices.
      attack: see :func:`election_vote`.
      key: PRNG key or int seed for a random attack.
      axis_name: ``None`` for stacked partition gradients, or the axis to gather them over.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = election_vote_aggregate(deterministic_code(5, 1), byzantine=(2,))
      >>> g = jnp.array([[1.0], [2.0], [-1.0], [5.0], [-3.0]])
      >>> tx.update(g, tx.init(None))[0]
      Array([1.], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    from rbyz import transforms

    G = _check_code(G, "election_vote_aggregate")
    byzantine = _check_byzantine(byzantine, G.shape[0], "election_vote_aggregate")
    return transforms.aggregate(election_vote, axis_name=axis_name, key=key, G=G,
                                byzantine=byzantine, attack=_resolve_attack(attack))
