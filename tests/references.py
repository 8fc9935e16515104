"""Plain float64 NumPy references for every rule, shared by the tests.

Each reference takes one worker per row of a float64 ``[n, D]`` matrix (the ravelled pytree) and
is written plainly (loops, ``np.sort``), independently of rbyz's kernels.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import jax
import numpy as np
from references_clustering import REFERENCES_CLUSTERING
from references_layerwise import REFERENCES_LAYERWISE

import references_spectral

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


def ref_mean_around(x, keep, center):
    """Per coordinate, the mean of the ``keep`` values nearest ``center[k]``; equal distances
    go to the lower values (stable argsort of the sorted column)."""
    s = sorted_columns(x)
    out = np.empty(x.shape[1])
    for k in range(x.shape[1]):
        with np.errstate(invalid="ignore"):
            dist = np.abs(s[:, k] - center[k])
        nearest = np.argsort(np.where(np.isnan(dist), np.inf, dist), kind="stable")[:keep]
        out[k] = s[nearest, k].mean()
    return out


def ref_mean_around_median(x, keep):
    """Per coordinate, the mean of the ``keep`` values nearest the median."""
    s = sorted_columns(x)
    n = len(x)
    return ref_mean_around(x, keep, (s[(n - 1) // 2] + s[n // 2]) / 2)


def ref_meamed(x, f):
    return ref_mean_around_median(x, len(x) - f)


def ref_phocas(x, f):
    """Per coordinate, the mean of the n - f values nearest the trimmed mean (trim f per side)."""
    s = sorted_columns(x)
    n = len(x)
    return ref_mean_around(x, n - f, s[f:n - f].mean(axis=0))


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



# ------------------------------------------------------------------------------------------------
# rbyz.aggregators: every registered aggregator's reference, at its declared defaults.
#
# float64() switches jax_enable_x64 on inside a block only, so that the rest of the suite keeps
# JAX's defaults (``jax.enable_x64``, the config context manager of jax 0.10 and later; the old
# ``jax.experimental.enable_x64`` is gone).
#
# REFERENCES[name](x, f, state) -> float64 [D]: ``x`` the float64 [n, D] matrix of the ravelled
# updates, ``f`` the Byzantine count, ``state`` the ravelled state the rule declares (centered
# clipping's centre [D]; FoolsGold's history, one row per worker, [n, D]) or None. The
# registry-driven tests (tests/test_aggregator_properties.py) fail for a registered aggregator
# that has no entry here. DnC's entry holds when every coordinate is in the subsample
# (D <= sub_dim, the default 10 000).

@contextlib.contextmanager
def float64():
    """``jax_enable_x64`` inside the block only (jitted functions compile apart under it)."""
    with jax.enable_x64(True):
        yield


REFERENCES = {
    "bulyan": lambda x, f, state: ref_bulyan(x, f),
    "caf": lambda x, f, state: references_spectral.ref_caf(x, f),
    "centered_clipping": lambda x, f, state: ref_centered_clipping(x, state),
    "clipped_clustering": REFERENCES_CLUSTERING["clipped_clustering"],
    "cge": lambda x, f, state: references_spectral.ref_cge(x, f),
    "dnc": lambda x, f, state: ref_dnc(x, f),
    "flame": REFERENCES_CLUSTERING["flame"],
    "foolsgold": REFERENCES_LAYERWISE["foolsgold"],
    "gas": REFERENCES_LAYERWISE["gas"],
    "geometric_median": lambda x, f, state: ref_geometric_median(x),
    "krum": lambda x, f, state: ref_krum(x, f),
    "lasa": REFERENCES_LAYERWISE["lasa"],
    "mda": lambda x, f, state: ref_mda(x, f),
    "meamed": lambda x, f, state: ref_meamed(x, f),
    "mean": lambda x, f, state: ref_mean(x),
    "median": lambda x, f, state: ref_median(x),
    "monna": lambda x, f, state: references_spectral.ref_monna(x, f),
    "multi_krum": lambda x, f, state: ref_multi_krum(x, f),
    "phocas": lambda x, f, state: ref_phocas(x, f),
    "sign_majority": lambda x, f, state: ref_sign_majority(x),
    "signguard": REFERENCES_CLUSTERING["signguard"],
    "smea": lambda x, f, state: references_spectral.ref_smea(x, f),
    "trimmed_mean": lambda x, f, state: ref_trimmed_mean(x, f),
}


# ------------------------------------------------------------------------------------------------
# Coding defences (rbyz.coding): group votes, hierarchical aggregation, Election Coding and the
# failure analysis. Group rules take one worker per row of a [n, D] matrix, as above.


def ref_group_vote(x, r, fallback="median"):
    """[n, D] -> [n / r, D]: per group of r consecutive rows, a member equal to more than r / 2
    members (itself included), else the median (or Boyer-Moore's last candidate)."""
    out = []
    for g in range(len(x) // r):
        group = x[g * r:(g + 1) * r]
        same = [[a == b or np.array_equal(group[a], group[b]) for b in range(r)]
                for a in range(r)]
        if fallback == "boyer_moore":
            candidate, count = 0, 1
            for a in range(1, r):
                if count == 0:
                    candidate, count = a, 1
                elif same[candidate][a]:
                    count += 1
                else:
                    count -= 1
            out.append(group[candidate])
        else:
            winners = [a for a in range(r) if sum(same[a]) >= r // 2 + 1]
            out.append(group[winners[0]] if winners else ref_median(group))
    return np.stack(out)


def ref_hierarchical(x, inner, outer, buckets):
    """``outer`` of the ``inner`` results of ``np.array_split(x, buckets)``."""
    return outer(np.stack([inner(b) for b in np.array_split(x, buckets)]))


def ref_median_of_means(x, buckets):
    return ref_hierarchical(x, ref_mean, ref_median, buckets)


def ref_election_vote(S, G, byzantine, attack):
    """S: [k, D] partition gradients; the loops of the paper's code. ``attack``: "reverse"
    (a Byzantine worker negates its message) or "directional" (it sends -1)."""
    n, k = G.shape
    messages = np.zeros((n, S.shape[1]))
    for j in range(n):
        total = np.zeros(S.shape[1])
        for i in range(k):
            if G[j, i]:
                total += np.sign(S[i])
        messages[j] = np.sign(total)
    for j in byzantine:
        messages[j] = -messages[j] if attack == "reverse" else -1.0
    return np.sign(messages.sum(axis=0))


def ref_vote_failures(G, b):
    """(failures, trials) over every sign pattern with a decided majority and every b-subset."""
    n, k = G.shape
    failures = trials = 0
    for pattern in itertools.product((-1.0, 1.0), repeat=k):
        s = np.array(pattern)
        mu = np.sign(s.sum())
        if mu == 0:
            continue
        honest = np.sign(G @ s)
        for bad in itertools.combinations(range(n), b):
            m = honest.copy()
            m[list(bad)] = -mu
            trials += 1
            failures += np.sign(m.sum()) != mu
    return failures, trials


def ref_bad_groups(n, r, f):
    """(E[# groups with >= ceil(r/2) Byzantine members], P(any)) over every placement of f."""
    groups = np.arange(n) // r
    bad_counts = []
    for placement in itertools.combinations(range(n), f):
        per_group = np.bincount(groups[list(placement)], minlength=n // r)
        bad_counts.append(int(np.sum(per_group >= -(-r // 2))))
    return np.mean(bad_counts), np.mean(np.array(bad_counts) > 0)


# ------------------------------------------------------------------------------------------------
# Pre-aggregators (rbyz.preaggregators): one worker per row of a [n, D] matrix, [n', D] out.

F32_MAX = float(np.finfo(np.float32).max)


def is_hostile(row):
    """A row the rules treat as unmeasurable: non-finite, or a float32-overflowing norm."""
    return not np.all(np.isfinite(row)) or float(np.sum(row * row)) > F32_MAX


def ref_nnm(x, f):
    n = x.shape[0]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                hostile = is_hostile(x[i]) or is_hostile(x[j])
                dist[i, j] = np.inf if hostile else np.sum((x[i] - x[j]) ** 2)
    out = np.zeros_like(x)
    for i in range(n):
        order = sorted(range(n), key=lambda j: (j != i, dist[i, j], j))[: n - f]
        out[i] = np.mean(x[order], axis=0)
    return out


def ref_clip(x, c):
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        if not is_hostile(row):
            out[i] = row * min(1.0, c / max(np.linalg.norm(row), 1e-300))
    return out


def ref_arc(x, f):
    n = x.shape[0]
    k = math.floor(2 * (f / n) * (n - f) + 1e-9)
    norms = sorted(np.inf if is_hostile(row) else np.linalg.norm(row) for row in x)
    return ref_clip(x, norms[n - k - 1])


def ref_bucketing(x, perm, s):
    permuted = x[np.asarray(perm)]
    return np.stack([permuted[b: b + s].mean(axis=0) for b in range(0, x.shape[0], s)])
