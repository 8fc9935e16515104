"""Rules that remember: FoolsGold weighs each worker by how unlike the others its history is.

:func:`foolsgold` keeps, per worker, the sum of all the updates it has sent (its *history*) and
gives a worker a low weight when its history points the same way as another worker's: sybils
that push the same poisoned direction round after round end up with weight 0, while honest
workers, whose data differ, keep theirs. The history is the rule's state, one row per worker, so
it is started by ``spec.init(params, {"num_clients": n})`` (``rbyz.transforms.aggregate`` does it
with the ``num_clients`` given to it) and advanced by ``spec.apply``, which returns the new
history with the aggregate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz._src import reductions
from rbyz._src import spec as _spec
from rbyz._src import tree as tree_util
from rbyz.aggregators import _common
from rbyz.aggregators import selection as _selection

# What the original code sets a rescaled weight of exactly 1 to before the logit (ln(1/0) = inf).
LOGIT_CAP = 0.99


def _history_dtype(dtype) -> jnp.dtype:
    """Histories sum many updates: 16-bit leaves keep theirs in float32."""
    return tree_util.accumulation_dtype(dtype)


def _init_history(params, hparams):
    """``[num_clients, ...]`` zeros per leaf of ``params`` (one worker's update shape)."""
    rows = hparams.get("num_clients")
    checks.require(
        rows is not None,
        "foolsgold",
        "keeps one history row per worker, so its state is sized at init: pass "
        "num_clients=n (the number of rows it aggregates), e.g. "
        "rbyz.transforms.aggregate('foolsgold', num_clients=25).",
    )
    rows = checks.static_int(rows, "foolsgold", "num_clients", minimum=1)
    return jax.tree.map(
        lambda p: jnp.zeros((rows, *jnp.shape(p)), _history_dtype(jnp.result_type(p))), params)


def _advanced_by_apply(output, state):
    del output, state
    raise NotImplementedError(
        "foolsgold: the history is the sum of the updates, not of the outputs; it is advanced "
        "by spec.apply(updates, history, key, hparams), which returns (output, new_history).")


def _checked_history(history, updates, n: int):
    """The history as given (zeros when ``None``), checked against the updates' shapes."""
    if history is None:
        return jax.tree.map(
            lambda u: jnp.zeros(u.shape, _history_dtype(u.dtype)), updates)
    if jax.tree.structure(history) != jax.tree.structure(updates):
        raise ValueError(
            f"foolsgold: history must have the structure of the updates (one row per worker "
            f"in every leaf); got {jax.tree.structure(history)} for updates "
            f"{jax.tree.structure(updates)}. Start it with spec.init(params, "
            f"{{'num_clients': {n}}}).")
    for h, u in zip(jax.tree.leaves(history), jax.tree.leaves(updates)):
        if jnp.shape(h) != u.shape:
            raise ValueError(
                f"foolsgold: history leaves must be shaped like the updates [n, ...] (one row "
                f"per worker); got a history leaf of shape {jnp.shape(h)} for updates of shape "
                f"{u.shape}. Is num_clients the number of rows aggregated (here n={n})?")
    return history


def _cosines(history, usable) -> jax.Array:
    """``[n, n]`` cosine similarities of the histories, 0 with an unusable (zero or
    non-finite) one; the diagonal holds ``cos(H_i, H_i) - 1`` as the original code's
    ``cosine_similarity(H) - I``: 0, or -1 for an unusable history (scikit-learn gives a zero
    vector similarity 0 with itself).

    Computed as ``1 - ||u_i - u_j||^2 / 2`` on the unit rows with the accurate (centred)
    pairwise distances, so that the nearly parallel histories of sybils keep their digits.
    """
    norms = jnp.sqrt(reductions.row_sq_norms(history))
    dtype = norms.dtype
    inverse = jnp.where(usable, 1.0 / jnp.where(usable, norms, 1.0), 0.0)

    def unit(leaf):
        shape = (leaf.shape[0],) + (1,) * (leaf.ndim - 1)
        rows = jnp.where(usable.reshape(shape), leaf.astype(dtype), 0.0)
        return rows * inverse.reshape(shape)

    sq = reductions.pairwise_sq_distances(jax.tree.map(unit, history))
    both = usable[:, None] & usable[None, :]
    cos = jnp.where(both, jnp.clip(1.0 - sq / 2, -1.0, 1.0), 0.0)
    diagonal = jnp.where(usable, 0.0, -1.0).astype(dtype)
    eye = jnp.eye(cos.shape[0], dtype=bool)
    return jnp.where(eye, diagonal[:, None], cos)


def _weights(history, valid, kappa) -> jax.Array:
    """``[n]`` FoolsGold weights in ``[0, 1]`` (0 for rows not ``valid``)."""
    norms = jnp.sqrt(reductions.row_sq_norms(history))
    finite = jnp.isfinite(norms)
    valid = valid & finite
    cs = _cosines(history, finite & (norms > 0))
    n = cs.shape[0]
    eye = jnp.eye(n, dtype=bool)
    top = jnp.max(cs, axis=1)
    # Pardoning: a worker j more similar to someone than i is (v_j > v_i) has its similarity
    # with i scaled by v_i / v_j, so an honest worker is not punished for resembling a sybil.
    # Every v is >= 0 (the diagonal term), so v_j > v_i implies v_j > 0.
    safe = jnp.where(top > 0, top, 1.0)
    pardon = ~eye & (top[:, None] < top[None, :])
    cs = jnp.where(pardon, cs * top[:, None] / safe[None, :], cs)
    alpha = jnp.clip(1.0 - jnp.max(cs, axis=1), 0.0, 1.0)
    alpha = jnp.where(valid, alpha, 0.0)
    largest = jnp.max(alpha)
    # Every valid worker has a perfect twin (largest = 0, e.g. all send the same update): the
    # original code divides 0 by 0; FedML's floor (alpha <= 0 -> 1e-15) weighs them alike.
    alpha = jnp.where(largest > 0, alpha / jnp.where(largest > 0, largest, 1.0),
                      jnp.where(valid, 1.0, 0.0))
    alpha = jnp.where(alpha == 1.0, LOGIT_CAP, alpha)
    logit = kappa * (jnp.log(alpha / (1.0 - alpha)) + 0.5)
    return jnp.where(valid, jnp.clip(logit, 0.0, 1.0), 0.0)


def _foolsgold(updates, history, *, f, num_clients, kappa):
    """``(aggregate, new history, weights, their total)`` of one FoolsGold step."""
    n, f = _common.workers_and_f(updates, f, foolsgold.spec)
    if num_clients is not None:
        num_clients = checks.static_int(num_clients, "foolsgold", "num_clients", minimum=1)
        checks.require(
            num_clients == n,
            "foolsgold",
            f"keeps one history row per worker: got n={n} rows but num_clients={num_clients}. "
            f"Pass num_clients=n, the number of rows it aggregates (after any pre-aggregation).",
        )
    _common.check_positive(kappa, "foolsgold", "kappa")
    history = _checked_history(history, updates, n)
    # A row holding NaN/Inf, or whose norm overflows, is left out of this step and of the
    # history (which stays finite), as a row of weight 0.
    valid = jnp.isfinite(reductions.row_sq_norms(updates))

    def add(h, u):
        shape = (n,) + (1,) * (u.ndim - 1)
        return jnp.where(valid.reshape(shape), h + u.astype(h.dtype), h)

    history = jax.tree.map(add, history, updates)
    weights = _weights(history, valid, kappa)
    total = jnp.sum(weights)
    out = _common.weighted_mean(updates, weights, jnp.where(total > 0, total, 1.0))
    return _common.cast_like(out, updates), history, weights, total


@_spec.declare(
    "aggregator", register=False, reports=True, coordinate_slices=False,
    constraint=_spec.MINORITY, cost="O(n^2 d)",
    state=_spec.State(
        arg="history", init=_init_history, next=_advanced_by_apply, model_shaped=False,
        init_takes_hparams=True, rows="num_clients",
        doc="each worker's sum of its updates so far, [num_clients, ...] per leaf; zeros at "
            "the start"),
    reference=_spec.Reference(
        "Fung, Yoon, Beschastnikh",
        "The Limitations of Federated Learning in Sybil Settings", "RAID", 2020),
    note="Follows the authors' code (DistributedML/FoolsGold, foolsgold()): cosine similarities "
         "of the summed histories minus the identity (so every max includes a 0), pardoning, "
         "1 - max, rescaling by the largest weight, 1 -> 0.99, logit + 0.5 clipped to [0, 1], "
         "with the paper's confidence kappa (1, the code's value). Differences: the whole "
         "update is compared (the deep-learning code and FedML compare the output layer only, "
         "the ML code optionally weighs features by importance); the aggregate is the weighted "
         "mean sum_i a_i g_i / sum_i a_i (FedML's and np.average's; the paper and the ML code "
         "add sum_i a_i g_i, the deep-learning code divides that sum by n), so that the "
         "aggregate keeps the scale of one update; when every worker has a perfect twin (all "
         "weights 0, which the code divides 0 by 0 on) they are weighed alike, as FedML's "
         "floor does. Rows holding NaN/Inf, or whose norm overflows, get weight 0 and are not "
         "added to the history. FoolsGold bounds similarity, not magnitude: a lone large row "
         "keeps its weight (compose it after a norm clip, e.g. rbyz.preaggregators.clip).",
)
def foolsgold(updates, *, f: int = 0, num_clients: int | None = None, history=None,
              kappa: float = 1.0, report: bool = False):
    """FoolsGold: a mean weighted by how unlike the others each worker's history is.

    With ``H_i`` the sum of worker ``i``'s updates so far, this one included, and
    ``c_ij = cos(H_i, H_j)`` (``c_ii = 0``), ``v_i = max_j c_ij``; pardoning sets
    ``c_ij <- c_ij v_i / v_j`` where ``v_j > v_i``; ``a_i = clip(1 - max_j c_ij, 0, 1)``,
    ``a <- a / max_i a_i``, ``a_i <- 0.99`` where ``a_i = 1``, and
    ``w_i = clip(kappa (ln(a_i / (1 - a_i)) + 0.5), 0, 1)``. The aggregate is
    ``sum_i w_i g_i / sum_i w_i``. Workers whose histories are parallel (sybils repeating one
    direction) get weight 0. When every worker has a perfect twin (e.g. all send the same
    update) all are weighed alike, so identical updates aggregate to themselves.

    This function is one step from a given history (zeros by default: the first step); the
    history is the rule's state, advanced through the declaration:
    ``spec.init(params, {"num_clients": n})`` starts it (``[n, ...]`` zeros per leaf,
    float32 for 16-bit leaves) and ``spec.apply(updates, history, None, hparams)`` returns
    ``(aggregate, new_history)`` (``report=True``: ``(aggregate, new_history, selection)``);
    ``rbyz.transforms.aggregate("foolsgold", num_clients=n)`` carries it between steps. Not
    available with ``layout="coordinates"``: the history is not shaped like one worker's
    update.

    Hostile rows: a row holding NaN/Inf, or whose norm overflows the accumulation dtype, has
    weight 0 and is not added to its history. FoolsGold assumes no number of sybils (``f`` is
    accepted for a uniform call and not used) and bounds directions, not magnitudes: one large
    finite row unlike the others keeps its weight.

    Args:
      updates: stacked pytree, every leaf ``[n, ...]``.
      f: number of Byzantine workers (not used: FoolsGold needs no bound on the sybils).
      num_clients: the number of workers ``n`` whose histories are kept: needed to start the
        state; when given, the updates must have ``num_clients`` rows.
      history: the workers' summed updates of the previous steps, shaped like ``updates``;
        ``None`` for zeros.
      kappa: the paper's confidence parameter ``kappa > 0`` of the logit (1 in the code).
      report: also return the rows' :class:`~rbyz.aggregators.Selection` (``w_i / sum_j w_j``:
        0 for the sybils and the hostile rows), computed in the same pass.

    Returns:
      A pytree like one worker's update; with ``report=True``, ``(output, selection)``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [5.0, 5.0], [5.0, 5.0]])
      >>> foolsgold(g)  # the two identical rows (sybils) get weight 0
      Array([0.05696875, 0.62868744], dtype=float32)
      >>> declared = foolsgold.spec
      >>> history = declared.init(jnp.zeros(2), {"num_clients": 5})
      >>> out, history = declared.apply(g, history, None, {"num_clients": 5})
      >>> history.shape
      (5, 2)
      >>> _, selection = foolsgold(g, report=True)
      >>> selection.weights.tolist()[3:]
      [0.0, 0.0]

    References:
      Fung, Yoon, Beschastnikh, `The Limitations of Federated Learning in Sybil Settings`,
      RAID 2020.
    """
    out, _, weights, total = _foolsgold(updates, history, f=f, num_clients=num_clients,
                                        kappa=kappa)
    return _selection.returning(out, report, weights, total)


def _step(updates, history, key, hparams, report: bool = False):
    """``spec.apply`` of FoolsGold: the new history is the old one plus the updates;
    ``report=True`` adds the selection."""
    del key
    out, history, weights, total = _foolsgold(updates, history,
                                              **{**foolsgold.spec.hparams, **hparams})
    if report:
        return out, history, _selection.of_weights(weights, total)
    return out, history


# The history advances with the updates, not the output, so the declaration applies the rule
# through _step (the custom apply that compositions use too) before it is registered.
foolsgold.spec = dataclasses.replace(foolsgold.spec, applier=_step)
_spec.REGISTRIES["aggregator"].add(foolsgold.spec)
