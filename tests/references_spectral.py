"""Plain float64 NumPy references of CAF, SMEA, MoNNA and CGE (one worker per row of ``x``).

Written independently of rbyz's kernels: covariances are formed in ``d x d`` with ``np.cov``-
style loops and ``np.linalg.eigh``, distances and norms with ``np.linalg.norm``. A row is hostile
when it holds NaN/Inf or its squared norm overflows (``np.sum(x**2)`` is not finite).
"""

from __future__ import annotations

import itertools

import numpy as np


def hostile_rows(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return ~np.isfinite(np.sum(x * x, axis=1))


def covariance(rows, weights=None):
    """``(mean, Sigma)`` of ``rows`` with ``weights`` (uniform by default), built in d x d."""
    weights = np.ones(len(rows)) if weights is None else np.asarray(weights, np.float64)
    mu = (weights[:, None] * rows).sum(axis=0) / weights.sum()
    sigma = np.zeros((rows.shape[1], rows.shape[1]))
    for w, row in zip(weights, rows):
        sigma += w * np.outer(row - mu, row - mu)
    return mu, sigma / weights.sum()


def top_eigenvalue(rows):
    return np.linalg.eigh(covariance(rows)[1])[0][-1]


def ref_caf(x, f):
    """ByzFL's CAF loop (byzfl/aggregators/aggregators.py) with the exact top eigenvector and
    tau_max over rows of positive weight; hostile rows start at weight 0."""
    n = len(x)
    c = np.where(hostile_rows(x), 0.0, 1.0)
    rows = np.where(c[:, None] > 0, x, 0.0)
    best, best_lam = c.copy(), np.inf
    while c.sum() > n - 2 * f:
        mu, sigma = covariance(rows, c)
        evals, evecs = np.linalg.eigh(sigma)
        lam, v = evals[-1], evecs[:, -1]
        if lam < best_lam:
            best, best_lam = c.copy(), lam
        tau = np.array([((rows[i] - mu) @ v) ** 2 for i in range(n)])
        tau_max = max(tau[i] for i in range(n) if c[i] > 0)
        if tau_max == 0:
            break
        c = c * np.clip(1.0 - tau / tau_max, 0.0, 1.0)
    return (best[:, None] * rows).sum(axis=0) / best.sum()


def subset_key(x, kept):
    """(top eigenvalue, trace) of the covariance of rows ``kept``; inf if one is hostile."""
    if hostile_rows(x[kept]).any():
        return (np.inf, np.inf)
    sigma = covariance(x[kept])[1]
    return (np.linalg.eigh(sigma)[0][-1], np.trace(sigma))


def ref_smea_subset(x, f):
    n = len(x)
    best, best_key = None, None
    for removed in itertools.combinations(range(n), f):
        kept = [i for i in range(n) if i not in removed]
        key = subset_key(x, kept)
        if best is None or key < best_key:
            best, best_key = kept, key
    return best


def ref_smea(x, f):
    return x[ref_smea_subset(x, f)].mean(axis=0)


def ref_smea_filter_subset(x, f):
    """f times: drop the kept row with the largest squared projection of ``x_i - mu`` on the top
    eigenvector of the kept rows' d x d covariance (hostile rows first, lowest index)."""
    kept = list(range(len(x)))
    for _ in range(f):
        bad = [i for i in kept if hostile_rows(x[[i]])[0]]
        if bad:
            kept.remove(bad[0])
            continue
        mu, sigma = covariance(x[kept])
        v = np.linalg.eigh(sigma)[1][:, -1]
        scores = [float(((x[i] - mu) @ v) ** 2) for i in kept]
        kept.pop(int(np.argmax(scores)))
    return kept


def ref_smea_filter(x, f):
    return x[ref_smea_filter_subset(x, f)].mean(axis=0)


def ref_monna(x, f, pivot=0):
    n = len(x)
    bad = hostile_rows(x)
    with np.errstate(over="ignore", invalid="ignore"):
        dist = [np.inf if bad[pivot] or bad[i] else np.linalg.norm(x[i] - x[pivot]) ** 2
                for i in range(n)]
    dist = [np.inf if np.isnan(d) else d for d in dist]
    order = sorted(range(n), key=lambda i: (bool(bad[i]), dist[i], i))
    return x[sorted(order[: n - f])].mean(axis=0)


def ref_cge(x, f, reduction="mean"):
    n = len(x)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = [np.linalg.norm(x[i]) for i in range(n)]
    norms = [np.inf if not np.isfinite(v) else v for v in norms]
    kept = sorted(sorted(range(n), key=lambda i: (norms[i], i))[: n - f])
    total = x[kept].sum(axis=0)
    return total / (n - f) if reduction == "mean" else total
