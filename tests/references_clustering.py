"""Plain float64 NumPy references of the clustering aggregators (rbyz.aggregators.clustering).

Each takes one worker per row of a float64 ``[n, D]`` matrix and is written with loops over
workers, clusters and edges, independently of the JAX kernels: clusters are lists of members
and linkage distances are recomputed from the member-to-member distances at every merge.
"""

from __future__ import annotations

import numpy as np


def ref_norms(x):
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.sum(x * x, axis=1))
    norms = np.where(np.isnan(norms), np.inf, norms)
    return norms, np.isfinite(norms)


def ref_cosine_distances(x, hostile):
    """``1 - cos`` in ``[0, 2]``; a zero row has similarity 0; non-finite rows at ``hostile``."""
    n = len(x)
    norms, finite = ref_norms(x)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if not (finite[i] and finite[j]):
                dist[i, j] = hostile
            elif norms[i] == 0 or norms[j] == 0:
                dist[i, j] = 1.0
            else:
                cos = np.dot(x[i], x[j]) / (norms[i] * norms[j])
                dist[i, j] = min(max(1.0 - cos, 0.0), 2.0)
    return dist


def ref_clip(x, norms, finite, bound):
    """Rows scaled to norm at most ``bound``; non-finite rows zeroed (they are never kept)."""
    out = np.zeros_like(x)
    for i in range(len(x)):
        if finite[i]:
            out[i] = x[i] * (bound / norms[i] if norms[i] > bound else 1.0)
    return out


def ref_clipped_mean(x, kept, norms, finite, bound):
    rows = [i for i in range(len(x)) if kept[i] and finite[i]]
    if not rows:
        return np.zeros(x.shape[1])
    return ref_clip(x, norms, finite, bound)[rows].mean(axis=0)


def ref_agglomerate(dist, linkage, clusters):
    """Lists of members after merging the two closest clusters until ``clusters`` are left
    (the first pair in list order among equal distances; lists kept in order of least
    member)."""
    groups = [[i] for i in range(len(dist))]
    reduce = {"average": np.mean, "single": np.min, "complete": np.max}[linkage]
    while len(groups) > clusters:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = reduce([dist[i, j] for i in groups[a] for j in groups[b]])
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return groups


def ref_larger_cluster(dist, groups):
    """Members of the larger of two groups; on equal sizes the smaller mean within-group
    distance; both on a tie of that too."""
    if len(groups) == 1:
        return set(groups[0])

    def spread(g):
        pairs = [dist[i, j] for i in g for j in g if i != j]
        return sum(pairs) / max(len(g) * (len(g) - 1), 1)

    a, b = groups
    if len(a) != len(b):
        return set(a if len(a) > len(b) else b)
    sa, sb = spread(a), spread(b)
    if sa == sb:
        return set(a) | set(b)
    return set(a if sa < sb else b)


def ref_clipped_clustering(x, f, linkage="average", max_tau=1e5):
    del f
    norms, finite = ref_norms(x)
    tau = min(np.median(norms), max_tau)
    dist = ref_cosine_distances(x, 2.0)
    kept = ref_larger_cluster(dist, ref_agglomerate(dist, linkage, 2))
    return ref_clipped_mean(x, [i in kept for i in range(len(x))], norms, finite, tau)


def ref_sign_features(x, finite):
    feats = np.zeros((len(x), 3))
    for i in range(len(x)):
        if finite[i] and x.shape[1]:
            feats[i] = [np.mean(x[i] > 0), np.mean(x[i] == 0), np.mean(x[i] < 0)]
    top = np.max(feats[finite], axis=0) if finite.any() else np.zeros(3)
    return feats / (top + 1e-8)


def ref_two_means(points, valid, iterations, tie=1e-5):
    """Relative differences below ``tie`` are ties (the first centre; all farthest points)."""
    idx = [i for i in range(len(points)) if valid[i]]
    first = np.array([np.sort(points[idx, k])[(len(idx) - 1) // 2] for k in range(3)])
    far = [np.sum((points[i] - first) ** 2) for i in idx]
    farthest = [i for i, d in zip(idx, far) if d >= (1 - tie) * max(far)]
    for k in range(3):  # equally far points: the lexicographically largest
        top = max(points[i, k] for i in farthest)
        farthest = [i for i in farthest if points[i, k] >= top - tie * abs(top)]
    centres = [first, points[farthest].mean(axis=0)]

    def assign(centres):
        return {i: int(np.sum((points[i] - centres[1]) ** 2)
                       < (1 - tie) * np.sum((points[i] - centres[0]) ** 2)) for i in idx}

    for _ in range(iterations):
        labels = assign(centres)
        for c in (0, 1):
            members = [i for i in idx if labels[i] == c]
            if members:
                centres[c] = points[members].mean(axis=0)
    labels = assign(centres)
    ones = sum(labels.values())
    winner = 1 if ones > len(idx) - ones else 0
    return {i for i in idx if labels[i] == winner}


def ref_signguard(x, f, lower=0.1, upper=3.0, iterations=10):
    del f
    n = len(x)
    norms, finite = ref_norms(x)
    middle = np.median(norms)
    by_norm = {i for i in range(n) if finite[i] and lower * middle < norms[i] < upper * middle}
    by_sign = ref_two_means(ref_sign_features(x, finite), finite, iterations)
    kept = (by_norm & by_sign) or by_norm
    bound = np.sort(norms)[(n - 1) // 2]
    return ref_clipped_mean(x, [i in kept for i in range(n)], norms, finite, bound)


def ref_flame_distances(x, distance="cosine"):
    cos = ref_cosine_distances(x, np.inf)
    if distance == "cosine":
        return cos
    _, finite = ref_norms(x)
    rows = np.where(np.isfinite(cos), cos, 2.0)
    n = len(x)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                dist[i, j] = (np.linalg.norm(rows[i] - rows[j]) if finite[i] and finite[j]
                              else np.inf)
    return dist


def ref_majority_cluster(dist):
    """Kruskal's single linkage, a whole height at a time: the first component that holds
    ``n // 2 + 1`` rows."""
    n = len(dist)
    size = n // 2 + 1
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    def big():
        roots = [find(i) for i in range(n)]
        for r in set(roots):
            members = {i for i in range(n) if roots[i] == r}
            if len(members) >= size:
                return members
        return None

    if big() is not None:
        return big()
    edges = sorted((dist[i, j], i, j) for i in range(n) for j in range(i + 1, n)
                   if np.isfinite(dist[i, j]))
    k = 0
    while k < len(edges):
        height = edges[k][0]
        while k < len(edges) and edges[k][0] == height:
            _, i, j = edges[k]
            parent[find(j)] = find(i)
            k += 1
        found = big()
        if found is not None:
            return found
    return set()


def ref_flame(x, f, distance="cosine"):
    del f
    norms, finite = ref_norms(x)
    kept = ref_majority_cluster(ref_flame_distances(x, distance))
    return ref_clipped_mean(x, [i in kept for i in range(len(x))], norms, finite,
                            np.median(norms))


REFERENCES_CLUSTERING = {
    "clipped_clustering": lambda x, f, state: ref_clipped_clustering(x, f),
    "flame": lambda x, f, state: ref_flame(x, f),
    "signguard": lambda x, f, state: ref_signguard(x, f),
}
