"""Combinatorial failure analysis of the coding defences' votes.

:func:`vote_failures` counts exactly (or estimates) how often ``b`` Byzantine workers can flip
the Election Coding master's vote; :func:`detox_vote_failures` counts how many groups randomly
placed Byzantine workers win in DETOX's group vote. The exact counts enumerate; the Monte Carlo
estimates run under jit and need an explicit key.

References:
  Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD against
  Byzantine Attacks`, NeurIPS 2020.
  Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
  More Robust Gradient Aggregation`, NeurIPS 2019.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rbyz._src import checks
from rbyz._src import tree as tree_util
from rbyz.coding import election
from rbyz.coding import groups


def _method_key(method: str, sampled: bool, key, rule: str, exact_when: str):
    """The typed key of a Monte Carlo run; ``ValueError`` for a missing or an unused key."""
    if sampled:
        checks.require(key is not None, rule,
                       f"the Monte Carlo estimate (method={method!r}{exact_when}) draws at random "
                       "and needs key=... (an int seed or a jax key).")
        return checks.as_key(key, rule)
    checks.require(key is None or method == "auto", rule,
                   f"method='exact' enumerates and draws nothing; drop key={key!r}.")
    return None


# ------------------------------------------------------------------------------------------------
# Election Coding.


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


def vote_failures(G, b: int, *, method: str = "auto", samples: int = 1 << 16, key=None,
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
      key: PRNG key or int seed, required when the estimate is Monte Carlo (used by ``"auto"``
        only if it samples; ``"exact"`` takes none).
      max_exact: largest enumeration ``"auto"`` does exactly.

    Returns:
      :class:`VoteFailures`; ``failures == 0`` with ``exact=True`` proves the code tolerates
      any ``b`` Byzantine workers.

    Example:
      >>> from rbyz.coding import deterministic_code, identity_code
      >>> vote_failures(deterministic_code(5, 1), 1)
      VoteFailures(failures=0, trials=160, rate=0.0, exact=True)
      >>> vote_failures(identity_code(5), 1).failures > 0
      True

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    G = election.check_code(G, "vote_failures")
    n, k = G.shape
    b = checks.static_int(b, "vote_failures", "b", minimum=0)
    checks.require(b <= n, "vote_failures", f"needs 0 <= b <= n; got n={n}, b={b}.")
    checks.require(method in ("auto", "exact", "monte_carlo"), "vote_failures",
                   f"unknown method {method!r}; use 'auto', 'exact' or 'monte_carlo'.")
    size = 2**k * math.comb(n, b)
    sampled = method == "monte_carlo" or (method == "auto" and size > max_exact)
    key = _method_key(method, sampled, key, "vote_failures",
                      f", 2^k C(n, b) = {size} > max_exact = {max_exact}" if method == "auto"
                      else "")
    if sampled:
        samples = checks.static_int(samples, "vote_failures", "samples", minimum=1)
        failures, trials = _sampled_failures(jnp.asarray(G, jnp.float32), key, b=b,
                                             samples=samples)
    else:
        failures, trials = _exact_failures(
            jnp.asarray(G, jnp.float32), _all_patterns(k), _all_placements(n, b), float(b))
    failures, trials = int(failures), int(trials)
    return VoteFailures(failures, trials, failures / max(trials, 1), not sampled)


# ------------------------------------------------------------------------------------------------
# DETOX's group vote.


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
    return [ways.get((f, t), 0) for t in range(n // r + 1)]


@jax.jit(static_argnames=("n", "r", "f", "samples"))
def _sampled_bad_groups(key, *, n, r, f, samples):
    placed = _random_subsets(key, samples, n, f).reshape(samples, n // r, r)
    bad = placed.sum(axis=2) >= -(-r // 2)
    return bad.sum(), bad.any(axis=1).sum()


def detox_vote_failures(n: int, r: int, f: int, *, method: str = "exact",
                        samples: int = 1 << 16, key=None) -> GroupVoteFailures:
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
      key: PRNG key or int seed, required by (and only by) ``"monte_carlo"``.

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
    r = groups.check_group_size(n, r, "detox_vote_failures")
    f = checks.byzantine_count(f, n, "detox_vote_failures", "0 <= f <= n", lambda n, f: f <= n)
    checks.require(method in ("exact", "monte_carlo"), "detox_vote_failures",
                   f"unknown method {method!r}; use 'exact' or 'monte_carlo'.")
    key = _method_key(method, method == "monte_carlo", key, "detox_vote_failures", "")
    worst = min(groups.effective_byzantine_groups(f, r), n // r)
    if method == "exact":
        ways = _bad_group_distribution(n, r, f)
        total = math.comb(n, f)
        expected = sum(t * w for t, w in enumerate(ways)) / total
        return GroupVoteFailures(worst, expected, 1.0 - ways[0] / total, True)
    samples = checks.static_int(samples, "detox_vote_failures", "samples", minimum=1)
    bad, any_bad = _sampled_bad_groups(key, n=n, r=r, f=f, samples=samples)
    return GroupVoteFailures(worst, int(bad) / samples, int(any_bad) / samples, False)


__all__ = ("GroupVoteFailures", "VoteFailures", "detox_vote_failures", "vote_failures")
