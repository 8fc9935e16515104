"""Election Coding (sign domain): allocation matrices, local majorities and the master's vote.

An allocation matrix ``G`` (``n`` workers x ``k`` data partitions) says which partitions each
worker holds (:func:`bernoulli_code`, :func:`deterministic_code`, :func:`identity_code`); a
worker sends the majority of its partitions' gradient signs (:func:`local_majorities`) and the
master takes the majority of the workers' messages (:func:`election_vote`). The Byzantine rows
of the messages are written through :func:`rbyz.attacks.inject`, the one injection path.

References:
  Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD against
  Byzantine Attacks`, NeurIPS 2020.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rbyz import attacks
from rbyz._src import checks
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util

ELECTION_CODING = _spec.Reference(
    "Sohn, Han, Choi, Moon",
    "Election Coding for Distributed Learning: Protecting SignSGD against Byzantine Attacks",
    "NeurIPS", 2020,
)


def check_code(G, rule: str, *, partitions: int | None = None) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------------
# Allocation matrices.


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
      key: PRNG key or int seed (required).
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
    the vote (checked exhaustively by :func:`rbyz.coding.vote_failures`).

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
    G = check_code(G, "redundancy")
    checks.require(batch_ratio > 0, "redundancy", f"needs batch_ratio > 0; got {batch_ratio}.")
    r = float(G.sum()) / G.shape[0]
    return Redundancy(r, r * batch_ratio)


# ------------------------------------------------------------------------------------------------
# The vote.


def check_byzantine(byzantine: Sequence[int], n: int, rule: str) -> tuple[int, ...]:
    """Distinct static indices in ``[0, n)`` that leave an honest worker, else ``ValueError``."""
    byzantine = tuple(int(j) for j in byzantine)
    checks.require(
        len(set(byzantine)) == len(byzantine) and all(0 <= j < n for j in byzantine)
        and len(byzantine) < n,
        rule,
        f"byzantine must list distinct worker indices in [0, {n}) and leave an honest worker; "
        f"got {byzantine}.",
    )
    return byzantine


def resolve_attack(attack: str | Callable | None) -> Callable | None:
    """An attack function from a registered name (``ValueError`` listing the known ones)."""
    if attack is None or callable(attack):
        return attack
    return attacks.get(attack)


def check_noise(noise_std, key, rule: str) -> float:
    """``noise_std`` as a finite float ``>= 0`` (a key needed when ``> 0``), else ValueError."""
    checks.require(
        isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool)
        and bool(np.isfinite(noise_std)) and noise_std >= 0,
        rule,
        f"noise_std must be a finite number >= 0 (the std of the Gaussian noise added to every "
        f"partition gradient before its sign); got noise_std={noise_std!r}.",
    )
    checks.require(
        noise_std == 0 or key is not None,
        rule,
        f"noise_std={noise_std} draws Gaussian noise and needs key=... (an int seed or a jax key, "
        "a fresh one each step).",
    )
    return float(noise_std)


def local_majorities(partition_grads, G, *, noise_std: float = 0.0, key=None):
    """Every worker's message ``M_j = sign(sum_i G[j, i] sign(g_i + s xi_ji))`` (``sign(0) = 0``).

    With ``noise_std = s > 0`` every worker adds its own Gaussian noise ``s xi_ji``,
    ``xi_ji ~ N(0, I)`` independent per (worker, partition, step), to each partition gradient
    it computes, before the sign: the noisy-gradient experiment of the authors' rebuttal and of
    their code's ``--noisy_gradient --variance s`` (``s`` used as a std; the rebuttal's
    "variance 1e-8" is ``s = 1e-4``). ``xi_ji`` is drawn from ``fold_in(fold_in(key, j), i)``
    (one split per leaf). ``s = 0`` (default) draws nothing and needs no key.

    Args:
      partition_grads: stacked pytree, every leaf ``[k, ...]``: one gradient per partition.
      G: allocation matrix ``[n, k]`` (concrete).
      noise_std: ``s >= 0``, the std of the noise before the signs (static).
      key: PRNG key or int seed, required when ``noise_std > 0``.

    Returns:
      Stacked pytree, every leaf ``[n, ...]`` float32 in ``{-1, 0, 1}`` (exact integer sums).

    Example:
      >>> import jax.numpy as jnp
      >>> local_majorities(jnp.array([[1.0], [-2.0], [3.0]]), [[1, 1, 1], [1, 1, 0]])
      Array([[1.],
             [0.]], dtype=float32)
      >>> local_majorities(jnp.array([[1.0], [-2.0], [3.0]]), [[1, 1, 1], [1, 1, 0]],
      ...                  noise_std=1e-4, key=0)  # noise far below |g|: the same signs
      Array([[1.],
             [0.]], dtype=float32)

    References:
      Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD
      against Byzantine Attacks`, NeurIPS 2020.
    """
    k = tree_util.num_workers(partition_grads, "election_vote")
    G = check_code(G, "election_vote", partitions=k)
    noise_std = check_noise(noise_std, key, "election_vote")
    leaves, treedef = jax.tree.flatten(partition_grads)
    leaf_keys = ([None] * len(leaves) if noise_std == 0
                 else list(jax.random.split(checks.as_key(key, "election_vote"), len(leaves))))

    def leaf_messages(leaf, leaf_key):
        leaf = leaf.astype(jnp.float32)
        if leaf_key is None:
            signs = tree_util.rows(jnp.sign(leaf))
            return jnp.stack([
                jnp.sign(tree_util.sum_rows([signs[i] for i in np.flatnonzero(row)])) for row in G
            ])
        rows = tree_util.rows(leaf)

        def noisy_sign(j, i):
            xi = jax.random.normal(jax.random.fold_in(jax.random.fold_in(leaf_key, j), i),
                                   rows[i].shape, jnp.float32)
            return jnp.sign(rows[i] + noise_std * xi)

        return jnp.stack([
            jnp.sign(tree_util.sum_rows([noisy_sign(j, int(i)) for i in np.flatnonzero(row)]))
            for j, row in enumerate(G)
        ])

    return jax.tree.unflatten(treedef, [leaf_messages(leaf, k_) for leaf, k_ in zip(leaves,
                                                                                   leaf_keys)])


def election_vote(partition_grads, G, *, byzantine: Sequence[int] = (),
                  attack: str | Callable | None = "sign_reverse", key=None,
                  noise_std: float = 0.0):
    """Election Coding: workers vote on their partitions' signs, the master on the workers'.

    ``M_j = sign(sum_i G[j, i] sign(g_i))`` (:func:`local_majorities`; with ``noise_std`` each
    worker perturbs its partition gradients first), the Byzantine rows of
    ``M`` replaced by the attack (through :func:`rbyz.attacks.inject` at the given positions,
    the attack knowing only the Byzantine workers' own messages), then ``v = sign(sum_j M_j)``
    with ``sign(0) = 0`` (a tie does not move the coordinate). Sums are exact integers in
    float32. ``G = I`` is SignSGD with majority vote.

    Args:
      partition_grads: stacked pytree, every leaf ``[k, ...]``: one gradient per partition.
      G: allocation matrix ``[n, k]`` (concrete): 0/1, no empty row.
      byzantine: static indices of the Byzantine workers (the reference draws them once).
      attack: a sign-domain attack from ``rbyz.attacks`` (name or function
        ``attack(own, *, f=b, key=...) -> [b, ...]``), given the Byzantine workers' own honest
        messages ``own``; default ``"sign_reverse"``, the reference's (each sends the negation
        of its honest message). ``None``: no attack.
      key: PRNG key for a random attack (e.g. ``"sign_random"``), split by ``inject``, or for
        the noise; with both, ``k_noise, k_attack = jax.random.split(key)``.
      noise_std: std of the Gaussian noise each worker adds to every partition gradient before
        its sign (:func:`local_majorities`); ``0`` (default): none.

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
    noise_std = check_noise(noise_std, key, "election_vote")
    noise_key = None
    if noise_std > 0:
        noise_key, key = jax.random.split(checks.as_key(key, "election_vote"))
    messages = local_majorities(partition_grads, G, noise_std=noise_std, key=noise_key)
    byzantine = check_byzantine(byzantine, np.asarray(G).shape[0], "election_vote")
    attack = resolve_attack(attack)
    if byzantine and attack is not None:
        messages = attacks.inject(messages, attack, f=len(byzantine), positions=byzantine,
                                  omniscient=False, key=key).updates
    return jax.tree.map(
        lambda m, g: jnp.sign(tree_util.sum_rows(m)).astype(g.dtype), messages, partition_grads
    )


__all__ = (
    "Redundancy",
    "bernoulli_code",
    "check_noise",
    "deterministic_code",
    "election_vote",
    "identity_code",
    "local_majorities",
    "redundancy",
)
