"""Plain float64 NumPy references of FoolsGold (rbyz.aggregators.history), LASA and GAS
(rbyz.aggregators.layerwise).

Each takes one worker per row of a float64 ``[n, D]`` matrix and is written with loops over
workers, pairs, layers and chunks, independently of the JAX kernels: cosines are dot products
over norms, top-k thresholds come from ``np.sort``, medians from ``np.median``, Krum from sorted
rows of distances. LASA's layers are given as column counts (``sizes``); a row holding NaN/Inf,
or whose squared norm overflows, is hostile.
"""

from __future__ import annotations

import math

import numpy as np

# The registry-driven tests (tests/test_aggregator_properties.py) use a tree of two leaves,
# "b" [5] and "w" [3, 4], ravelled in that order: LASA's layers there.
PROPERTY_LAYERS = (5, 12)


def hostile_rows(x):
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.sum(x * x, axis=1)
    return ~np.isfinite(sq)


# ------------------------------------------------------------------------------------------------
# FoolsGold.


def ref_foolsgold_weights(history, valid, kappa=1.0):
    n = len(history)
    norms = np.array([math.sqrt(np.dot(h, h)) for h in history])
    finite = np.isfinite(norms)
    valid = valid & finite
    usable = finite & (norms > 0)
    cs = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                cs[i, j] = 0.0 if usable[i] else -1.0  # cosine_similarity(H) - I
            elif usable[i] and usable[j]:
                cs[i, j] = np.dot(history[i], history[j]) / (norms[i] * norms[j])
    top = cs.max(axis=1)
    pardoned = cs.copy()
    for i in range(n):
        for j in range(n):
            if i != j and top[i] < top[j]:
                pardoned[i, j] = cs[i, j] * top[i] / top[j]
    alpha = np.clip(1.0 - pardoned.max(axis=1), 0.0, 1.0)
    alpha[~valid] = 0.0
    if alpha.max() > 0:
        alpha = alpha / alpha.max()
    else:
        alpha = valid.astype(float)
    alpha[alpha == 1.0] = 0.99
    weights = np.zeros(n)
    for i in range(n):
        if valid[i] and alpha[i] > 0:
            weights[i] = min(max(kappa * (math.log(alpha[i] / (1.0 - alpha[i])) + 0.5), 0.0),
                             1.0)
    return weights


def ref_foolsgold_history(x, history=None):
    """The history after this step: the old one plus every non-hostile row."""
    history = np.zeros_like(x) if history is None else np.array(history, dtype=np.float64)
    bad = hostile_rows(x)
    for i in range(len(x)):
        if not bad[i]:
            history[i] = history[i] + x[i]
    return history


def ref_foolsgold(x, history=None, kappa=1.0):
    valid = ~hostile_rows(x)
    weights = ref_foolsgold_weights(ref_foolsgold_history(x, history), valid, kappa)
    out = np.zeros(x.shape[1])
    for i in range(len(x)):
        if weights[i] > 0:
            out += weights[i] * x[i]
    return out / weights.sum() if weights.sum() > 0 else out


# ------------------------------------------------------------------------------------------------
# LASA.


def ref_mz_kept(values, valid, bound):
    rows = [i for i in range(len(values)) if valid[i]]
    v = np.array([values[i] for i in rows])
    middle, std = np.median(v), np.std(v)
    kept = set()
    for i in rows:
        score = 0.0 if std == 0 else abs(values[i] - middle) / std
        if score < bound:
            kept.add(i)
    return kept


def ref_lasa(x, f, sizes=None, sparsity=0.3, lambda_n=1.0, lambda_s=1.0):
    del f  # the check only
    n, d = x.shape
    sizes = (d,) if sizes is None else tuple(sizes)
    assert sum(sizes) == d
    valid = ~hostile_rows(x)
    rows = [i for i in range(n) if valid[i]]
    norms = np.array([math.sqrt(np.dot(x[i], x[i])) if valid[i] else np.inf for i in range(n)])
    bound = np.sort(norms[rows])[(len(rows) - 1) // 2]  # torch's median: the lower one
    sparse = np.zeros_like(x)
    keep = max(int(d * (1.0 - sparsity)), 1)
    for i in rows:
        clipped = x[i] * (bound / norms[i] if norms[i] > bound else 1.0)
        threshold = np.sort(np.abs(x[i]))[d - keep] if sparsity > 0 and d > 0 else 0.0
        sparse[i] = np.where(np.abs(x[i]) >= threshold, clipped, 0.0)
    out = np.zeros(d)
    start = 0
    for size in sizes:
        layer = slice(start, start + size)
        start += size
        layer_norms = np.zeros(n)
        balance = np.zeros(n)
        for i in rows:
            s = sparse[i, layer]
            layer_norms[i] = math.sqrt(np.dot(s, s))
            signs = np.sign(s)
            balance[i] = signs.sum() / np.abs(signs).sum() if np.abs(signs).sum() > 0 else 0.0
        kept = ref_mz_kept(layer_norms, valid, lambda_n) & ref_mz_kept(balance, valid,
                                                                         lambda_s)
        kept = sorted(kept) if kept else rows
        if kept:
            out[layer] = np.mean([sparse[i, layer] for i in kept], axis=0)
    return out


# ------------------------------------------------------------------------------------------------
# GAS with Krum (or the median).


def ref_krum_pick(x, f):
    """Index of Krum's choice: the least sum of squared distances to the n - f - 2 nearest
    other rows; non-finite distances count as +inf."""
    n = len(x)
    scores = []
    for i in range(n):
        with np.errstate(over="ignore", invalid="ignore"):
            dist = [np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i]
        dist = sorted(v if np.isfinite(v) else np.inf for v in dist)
        scores.append(sum(dist[: n - f - 2]))
    return int(np.argmin(scores))


def ref_gas(x, f, p=1000, order=None, base="krum"):
    """GAS with Krum (or ``base="median"``, the midpoint median of each coordinate, NaN
    last); ``order``: the permutation of the coordinates split into chunks (the leaves' order
    when ``None``)."""
    n, d = x.shape
    width = -(-d // min(p, d))
    split = x if order is None else x[:, np.asarray(order)]
    scores = np.zeros(n)
    for start in range(0, d, width):
        chunk = split[:, start:start + width]
        if base == "krum":
            center = chunk[ref_krum_pick(chunk, f)]
        else:
            ordered = np.sort(np.where(np.isnan(chunk), np.inf, chunk), axis=0)
            center = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        for i in range(n):
            with np.errstate(over="ignore", invalid="ignore"):
                dist = math.sqrt(np.sum((chunk[i] - center) ** 2))
            scores[i] += dist if np.isfinite(dist) else np.inf
    chosen = np.argsort(scores, kind="stable")[: n - f]
    return x[chosen].mean(axis=0)


# REFERENCES_LAYERWISE[name](x, f, state), as REFERENCES in tests/references.py: FoolsGold's
# state is the ravelled [n, D] history.
REFERENCES_LAYERWISE = {
    "foolsgold": lambda x, f, state: ref_foolsgold(x, state),
    "gas": lambda x, f, state: ref_gas(x, f),
    "lasa": lambda x, f, state: ref_lasa(x, f, PROPERTY_LAYERS),
}
