"""Group codes: DETOX and DRACO's repetition code.

``n`` workers form ``n / r`` groups of ``r`` consecutive workers; every member of a group
computes the gradient of the same batch (:func:`group_assignment`), so honest members send
bit-identical vectors and a majority vote inside each group (:func:`group_vote`) removes every
Byzantine vector of a group with an honest majority. DRACO (:func:`repetition_code`) averages
the group winners; DETOX (:func:`detox`) feeds them to a cheap hierarchical robust aggregation
(:func:`rbyz.aggregators.hierarchical`) that only has to handle the
``f_eff = floor(f / ceil(r / 2))`` groups the adversary can still win
(:func:`effective_byzantine_groups`).

References:
  Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
  More Robust Gradient Aggregation`, NeurIPS 2019.
  Chen, Wang, Charles, Papailiopoulos, `DRACO: Byzantine-resilient Distributed Training via
  Redundant Gradients`, ICML 2018.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from rbyz import aggregators
from rbyz._src import checks
from rbyz._src import order_stats
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators.hierarchical import DETOX, Stage2, bind_stage, hierarchical, plain

FALLBACKS = ("median", "boyer_moore")
STAGE2_PRESETS = ("median_of_means", "multi_krum", "bulyan", "sign_majority")
# Whether the DETOX reference permutes the group winners before its stage 2 (every step). The
# sign vote (DETOX paired with signSGD, the authors' rebuttal) has one bucket: nothing to permute.
REFERENCE_SHUFFLES = {"median_of_means": True, "multi_krum": True, "bulyan": False,
                      "sign_majority": False}

DRACO = _spec.Reference(
    "Chen, Wang, Charles, Papailiopoulos",
    "DRACO: Byzantine-resilient Distributed Training via Redundant Gradients", "ICML", 2018,
)


def check_group_size(n: int, r, rule: str) -> int:
    """``r`` as a Python int ``>= 1`` dividing ``n``, else ``ValueError`` naming ``rule``."""
    r = checks.static_int(r, rule, "r", minimum=1)
    checks.require(
        n % r == 0,
        rule,
        f"needs the group size r to divide the worker count n; got n={n}, r={r}. "
        f"Use r in {[d for d in range(1, n + 1) if n % d == 0]} or change n.",
    )
    return r


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
    r = check_group_size(n, r, "group_assignment")
    return np.arange(n, dtype=np.int32) // r


# ------------------------------------------------------------------------------------------------
# The vote inside each group.


def _members(leaf: jax.Array, r: int) -> list[jax.Array]:
    """``[n, ...]`` -> ``r`` arrays ``[n / r, ...]``: member ``a`` of every group."""
    grouped = leaf.reshape((leaf.shape[0] // r, r) + leaf.shape[1:])
    return [grouped[:, a] for a in range(r)]


def _agreement(members_per_leaf: list[list[jax.Array]], r: int) -> list[list[jax.Array]]:
    """``eq[a][b]``: ``[n / r]`` bool, members ``a`` and ``b`` sent exactly the same update."""
    groups = members_per_leaf[0][0].shape[0]
    eq = [[jnp.ones((groups,), bool) for _ in range(r)] for _ in range(r)]
    for a, b in itertools.combinations(range(r), 2):
        flags = [jnp.all((m[a] == m[b]).reshape(groups, -1), axis=1) for m in members_per_leaf]
        eq[a][b] = eq[b][a] = functools.reduce(jnp.logical_and, flags)
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


@_spec.declare("preaggregator", register=False, reference=(DETOX, DRACO), cost="O(r n d)",
               rows_out=lambda n, hparams: n // hparams["r"])
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
    r = check_group_size(n, r, "group_vote")
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


@_spec.declare("aggregator", register=False, reference=DRACO, cost="O(r n d)",
               note="Needs r >= 2f + 1 and r | n, checked when called (the bound depends on r).")
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
    voted = group_vote(updates, r=check_group_size(n, r, "repetition_code"), fallback=fallback)
    return jax.tree.map(tree_util.mean_rows, voted)


# ------------------------------------------------------------------------------------------------
# DETOX: the vote, then a hierarchical robust aggregation of the group winners.


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


def detox_needs_key(stage2: str | Stage2 = "median_of_means", *,
                    shuffle: bool | None = None) -> bool:
    """Whether :func:`detox` with this stage 2 draws at random, and so needs a key.

    The presets permute the group winners when ``shuffle`` says so; ``shuffle=None`` follows the
    DETOX reference, which permutes them every step for ``"median_of_means"`` and
    ``"multi_krum"`` and not for ``"bulyan"`` (one bucket). A callable stage 2 says it itself
    (its declaration, e.g. ``hierarchical(..., shuffle=...)``), and then ``shuffle`` must stay
    ``None``.

    Args:
      stage2: a preset name or a stage-2 rule.
      shuffle: ``None`` (the reference's choice), ``True`` or ``False``; presets only.

    Returns:
      ``True`` when a key is needed.

    Example:
      >>> detox_needs_key(), detox_needs_key("bulyan"), detox_needs_key(shuffle=False)
      (True, False, False)
    """
    checks.require(shuffle is None or isinstance(shuffle, bool), "detox",
                   f"shuffle must be None, True or False; got shuffle={shuffle!r}.")
    if callable(stage2):
        checks.require(
            shuffle is None,
            "detox",
            f"shuffle={shuffle} applies to the preset stage 2s; a callable stage2 shuffles as it "
            "was built (hierarchical(..., shuffle=...)). Drop shuffle.",
        )
        return _spec.resolve(stage2, "aggregator", "detox")[0].key
    checks.require(
        stage2 in STAGE2_PRESETS,
        "detox",
        f"unknown stage2 {stage2!r}; use one of {STAGE2_PRESETS} or a callable (e.g. from "
        "rbyz.aggregators.hierarchical).",
    )
    return REFERENCE_SHUFFLES[stage2] if shuffle is None else shuffle


@_spec.declare("aggregator", register=False, constraint=_spec.KRUM,
               name="multi_krum(m=rows-f-2)")
def _multi_krum_in_bucket(bucket, *, f: int):
    """Multi-Krum selecting ``m = rows - f - 2`` vectors, as DETOX's reference does."""
    rows = tree_util.num_workers(bucket, "detox")
    return aggregators.multi_krum(bucket, f=f, m=rows - f - 2)


def _preset(name: str, groups: int, f_eff: int, buckets: int | None, shuffle: bool) -> Stage2:
    """The reference code's stage-2 modes, checked against the number of groups."""
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
        return hierarchical(plain(aggregators.mean), aggregators.median, buckets=k,
                            shuffle=shuffle)
    if name == "multi_krum":
        k = buckets or 2
        smallest = groups // k
        checks.require(
            smallest >= 2 * f_eff + 3,
            "detox",
            f"multi_krum needs every bucket to hold >= 2 f_eff + 3 groups; {where}, "
            f"buckets={k} (smallest {smallest}). Use fewer buckets or more workers.",
        )
        return hierarchical(_multi_krum_in_bucket, plain(aggregators.mean), buckets=k,
                            shuffle=shuffle)
    checks.require(buckets is None, "detox",
                   f"the {name} stage 2 runs on all winners (one bucket); got buckets={buckets}. "
                   "Drop buckets.")
    if name == "sign_majority":
        checks.require(
            groups > 2 * f_eff,
            "detox",
            f"sign_majority needs n/r > 2 f_eff (the honest winners must outvote the adversary's); "
            f"{where}. Use more workers or a smaller r.",
        )
        return hierarchical(aggregators.sign_majority, plain(aggregators.mean), buckets=1,
                            shuffle=shuffle)
    checks.require(
        groups >= 4 * f_eff + 3,
        "detox",
        f"bulyan needs n/r >= 4 f_eff + 3; {where}. Use more workers or a smaller r.",
    )
    return hierarchical(aggregators.bulyan, plain(aggregators.mean), buckets=1, shuffle=shuffle)


def _check_key(declared: _spec.Spec, key, preset: bool) -> None:
    """A key exactly when stage 2 draws at random."""
    if declared.key and key is None:
        fix = "pass shuffle=False" if preset else "build it with hierarchical(..., shuffle=False)"
        raise ValueError(
            f"detox: stage 2 ({declared.name}) draws at random (the presets permute the group "
            "winners every step, as the DETOX reference does) and needs a key; pass key=... (a "
            f"fresh one each step), or {fix} to keep the group order."
        )
    if not declared.key and key is not None:
        raise ValueError(
            f"detox: stage 2 ({declared.name}) draws nothing at random (no shuffle); drop "
            f"key={key!r}" + (", or pass shuffle=True to permute the winners." if preset else ".")
        )


def detox(updates, *, f: int, r: int, stage2: str | Stage2 = "median_of_means",
          buckets: int | None = None, fallback: str = "median", shuffle: bool | None = None,
          key=None):
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
    - ``"sign_majority"``: DETOX paired with signSGD (the authors' rebuttal, "D-signSGD"): the
      majority vote of the winners' signs, ``sign(sum_g sign(w_g))`` with ``sign(0) = 0``
      (:func:`rbyz.aggregators.sign_majority`), on all winners. The output is in
      ``{-1, 0, 1}``; the vote inside each group is on the raw updates, which for honest members
      are identical, so it equals the vote on their signs. Needs ``n / r > 2 f_eff``.
    - a callable: a declared stage-2 rule ``stage2(winners, *, f)`` or, declared ``key=True``,
      ``stage2(winners, *, f, key)``, e.g. from :func:`rbyz.aggregators.hierarchical`.

    Randomness: as the DETOX reference does every step, the ``"median_of_means"`` and
    ``"multi_krum"`` presets permute the winners at random before bucketing (``shuffle=None``
    or ``True``), and then need a ``key``, a fresh one each step; ``shuffle=False`` keeps the
    group order and takes no key. ``"bulyan"`` has one bucket and does not shuffle unless told
    to, nor does ``"sign_majority"``. :func:`detox_needs_key` says which.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``, workers ordered by group
        (:func:`group_assignment`).
      f: number of Byzantine workers (Python int).
      r: group size; needs ``r | n``.
      stage2: a preset name or a callable, see above.
      buckets: number of stage-2 buckets for ``"median_of_means"`` and ``"multi_krum"``
        (default as above).
      fallback: group vote without a majority, see :func:`group_vote`.
      shuffle: presets only: permute the winners at random before bucketing; ``None`` follows
        the reference (see above).
      key: PRNG key or int seed, required exactly when stage 2 draws at random.

    Returns:
      The aggregated pytree (leaves ``[...]``), input dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> honest = jnp.arange(15.0).reshape(15, 1)  # one gradient per group
      >>> x = jnp.repeat(honest, 3, axis=0).at[0:2].set(1e30)  # 2 Byzantine workers in group 0
      >>> detox(x, f=2, r=3, shuffle=False)  # median of the means of 3 buckets: 2e29, 7, 12
      Array([12.], dtype=float32)
      >>> detox(x, f=2, r=3, key=jax.random.key(0)).shape  # the winners permuted first
      (1,)

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
      More Robust Gradient Aggregation`, NeurIPS 2019.
    """
    n = tree_util.num_workers(updates, "detox")
    r = check_group_size(n, r, "detox")
    f = checks.byzantine_count(f, n, "detox", "0 <= f < n", lambda n, f: f < n)
    f_eff = effective_byzantine_groups(f, r)
    shuffles = detox_needs_key(stage2, shuffle=shuffle)
    preset = not callable(stage2)
    if preset:
        stage2 = _preset(stage2, n // r, f_eff, buckets, shuffles)
    else:
        checks.require(buckets is None, "detox",
                       f"buckets={buckets} sets the presets' bucket count; a callable stage2 has "
                       "its own. Drop buckets.")
    declared, run = bind_stage(stage2, "detox", "stage2")
    _check_key(declared, key, preset)
    winners = group_vote(updates, r=r, fallback=fallback)
    return run(winners, f_eff, None if key is None else checks.as_key(key, "detox"))


__all__ = (
    "FALLBACKS",
    "STAGE2_PRESETS",
    "detox",
    "detox_needs_key",
    "effective_byzantine_groups",
    "group_assignment",
    "group_vote",
    "repetition_code",
)
