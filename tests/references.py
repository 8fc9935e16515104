"""Plain float64 NumPy references for every rule, shared by the tests.

Each reference takes one worker per row of a float64 ``[n, D]`` matrix (the ravelled pytree) and
is written plainly (loops, ``np.sort``), independently of rbyz's kernels.
"""

from __future__ import annotations

import itertools

import numpy as np

# ------------------------------------------------------------------------------------------------
# Aggregators: one worker per row of a [n, D] matrix (the ravelled pytree).


def sorted_columns(x):
    return np.sort(np.where(np.isnan(x), np.inf, x), axis=0)


def ref_mean(x):
    return x.mean(axis=0)


def ref_median(x, even="midpoint"):
    s = sorted_columns(x)
    n = len(x)
    lo, hi = (n - 1) // 2, n // 2
    if even == "lower":
        return s[lo]
    if even == "upper":
        return s[hi]
    return (s[lo] + s[hi]) / 2


def ref_trimmed_mean(x, f):
    return sorted_columns(x)[f:len(x) - f].mean(axis=0)


def ref_mean_around_median(x, keep):
    """Per coordinate, the mean of the ``keep`` values nearest the median.

    The ``keep`` nearest values form a run of the sorted column; among equally tight runs (ties
    in distance) the lowest one is taken, the convention the library documents.
    """
    s = sorted_columns(x)
    n = len(x)
    center = (s[(n - 1) // 2] + s[n // 2]) / 2
    out = np.empty(x.shape[1])
    for k in range(x.shape[1]):
        spreads = [
            max(center[k] - s[a, k], s[a + keep - 1, k] - center[k]) for a in range(n - keep + 1)
        ]
        best = int(np.argmin(spreads))
        out[k] = s[best:best + keep, k].mean()
    return out


def ref_meamed(x, f):
    return ref_mean_around_median(x, len(x) - f)


def split_sum(values):
    """A sum compared as (number of infinite terms, sum of the finite ones)."""
    values = np.asarray(values, np.float64)
    return int(np.isinf(values).sum()), float(values[np.isfinite(values)].sum())


def ref_krum_scores(x, neighbours, squared=True, candidates=None):
    """Score keys: (sum over the nearest others, sum over all others, index) per candidate.

    Sums count their infinite terms first; the second key breaks structural ties (mutual
    nearest neighbours when neighbours = 1, all scores 0 when neighbours = 0) by centrality,
    as the library documents.
    """
    candidates = list(range(len(x))) if candidates is None else candidates
    keys = {}
    for i in candidates:
        dists = []
        for j in candidates:
            if j != i:
                with np.errstate(invalid="ignore", over="ignore"):
                    d = np.sqrt(np.sum((x[i] - x[j]) ** 2))
                d = np.inf if np.isnan(d) else d
                dists.append(d**2 if squared else d)
        keys[i] = (split_sum(sorted(dists)[:neighbours]), split_sum(dists), i)
    return keys


def ref_krum(x, f, neighbours=None, squared=True):
    neighbours = len(x) - f - 2 if neighbours is None else neighbours
    keys = ref_krum_scores(x, neighbours, squared)
    return x[min(keys, key=keys.get)]


def ref_multi_krum(x, f, m=None, neighbours=None, squared=True):
    n = len(x)
    neighbours = n - f - 2 if neighbours is None else neighbours
    m = n - f if m is None else m
    keys = ref_krum_scores(x, neighbours, squared)
    return x[sorted(keys, key=keys.get)[:m]].mean(axis=0)


def ref_bulyan(x, f, beta=None):
    n = len(x)
    theta = n - 2 * f
    beta = theta - 2 * f if beta is None else beta
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        keys = ref_krum_scores(x, max(len(remaining) - f - 2, 0), True, remaining)
        winner = min(keys, key=keys.get)
        chosen.append(winner)
        remaining.remove(winner)
    return ref_mean_around_median(x[chosen], beta)


def ref_mda(x, f):
    """Every subset of n - f rows; the least diameter wins, then the least sum of squared
    distances."""
    n = len(x)
    best, best_key = None, None
    for removed in itertools.combinations(range(n), f):
        kept = [i for i in range(n) if i not in removed]
        with np.errstate(invalid="ignore", over="ignore"):
            pairs = [np.sum((x[i] - x[j]) ** 2) for i in kept for j in kept]
        pairs = [np.inf if np.isnan(d) else d for d in pairs]
        key = (max(pairs), sum(pairs))
        if best is None or key < best_key:
            best, best_key = kept, key
    return x[best].mean(axis=0)


def ref_dnc(x, f, iterations=5, filter_frac=1.0):
    """DnC when every coordinate is in the subsample (d <= sub_dim): all iterations agree."""
    n = len(x)
    removed = int(np.floor(filter_frac * f))
    finite = np.all(np.isfinite(x), axis=1)
    rows = np.where(finite[:, None], x, 0.0)
    centred = np.where(finite[:, None], rows - rows[finite].mean(axis=0), 0.0)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    scores = np.where(finite, (centred @ top) ** 2, np.inf)
    kept = np.argsort(scores, kind="stable")[: n - removed]
    return x[np.sort(kept)].mean(axis=0)


def ref_geometric_median(x, iterations=4, nu=1e-5, init="median", weights=None):
    n = len(x)
    alpha = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if init == "median":
        v = ref_median(x)
    elif init == "mean":
        v = (alpha[:, None] * x).sum(axis=0) / alpha.sum()
    else:
        v = np.zeros(x.shape[1])
    for _ in range(iterations):
        beta = np.array([alpha[i] / max(nu, np.linalg.norm(v - x[i])) for i in range(n)])
        v = (beta[:, None] * x).sum(axis=0) / beta.sum()
    return v


def ref_centered_clipping(x, center=None, tau=100.0, iterations=1):
    n = len(x)
    v = np.zeros(x.shape[1]) if center is None else center
    for _ in range(iterations):
        step = np.zeros_like(v)
        for i in range(n):
            diff = x[i] - v
            norm = np.linalg.norm(diff)
            step += diff * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / n
    return v


def ref_sign_majority(x, zero_sign=0):
    votes = np.where(x > 0, 1.0, np.where(x < 0, -1.0, float(zero_sign)))
    tally = votes.sum(axis=0)
    return np.where(tally > 0, 1.0, np.where(tally < 0, -1.0, float(zero_sign)))
