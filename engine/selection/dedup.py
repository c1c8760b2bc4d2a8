"""Semantic duplicates: groups of rows whose embeddings are within a cosine threshold.

A group is a connected component of the graph "i ~ j iff cos(i, j) >= threshold", found with a
FAISS k-nearest-neighbour search of every row against all rows (SemDeDup-style: exact flat
search for small inputs, IVF k-means partitions for large ones).

Recall trade-off: each row asks for its `k` nearest neighbours and keeps those at or above the
threshold. A row whose k-th neighbour still passes the threshold may have more, so it is searched
again with 4x as many neighbours, repeatedly, up to `max_k` (4,096): flat search is therefore exact
for every group in which no row has more than `max_k` above-threshold neighbours (and even then the
group stays connected through the edges found). IVF adds the usual approximation: a neighbour in a
list that the query does not probe (`nprobe` of ~4*sqrt(n) lists) is missed, which for duplicate-
level similarities (>= 0.9) is rare because near-identical vectors fall in the same or adjacent
k-means cells; a pair missed in one direction is often found from the other row.
"""

from __future__ import annotations

import numpy as np

from engine.selection.faiss_index import as_float32, build_index, knn_search
from engine.selection.groups import connected_components, keep_best

MAX_NEIGHBOURS = 4_096


def _finite_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 copy with non-finite rows zeroed (they then match nothing), and the finite mask."""
    data = as_float32(vectors)
    finite = np.isfinite(data).all(axis=1) if data.size else np.ones(len(data), dtype=bool)
    if not finite.all():
        data = data.copy()
        data[~finite] = 0.0
    return data, finite


def threshold_edges(
    vectors: np.ndarray,
    threshold: float,
    index: str = "auto",
    flat_max_rows: int = 200_000,
    seed: int = 0,
    k: int = 16,
    nprobe: int = 8,
    max_k: int = MAX_NEIGHBOURS,
) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges (left < right) between rows with cosine >= threshold, via kNN search."""
    data, _ = _finite_rows(vectors)
    n = len(data)
    if n < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    faiss_index = build_index(data, index, flat_max_rows, seed=seed, nprobe=nprobe)
    lefts, rights = [], []
    rows = np.arange(n, dtype=np.int64)
    want = min(k + 1, n)  # +1: a row finds itself
    while rows.size:
        sims, labels = knn_search(faiss_index, data[rows], want)
        hit = (sims >= threshold) & (labels >= 0) & (labels != rows[:, None])
        lefts.append(np.repeat(rows, hit.sum(axis=1)))
        rights.append(labels[hit])
        if want >= n or want >= max_k:
            break
        # Rows whose last neighbour still passes may have more: search them again, wider.
        rows = rows[(sims[:, -1] >= threshold) & (labels[:, -1] >= 0)]
        want = min(want * 4, n, max_k)
    left, right = np.concatenate(lefts), np.concatenate(rights)
    low, high = np.minimum(left, right), np.maximum(left, right)
    pairs = np.unique(np.stack([low, high], axis=1), axis=0) if low.size else np.empty((0, 2))
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def semantic_groups(
    vectors: np.ndarray,
    threshold: float = 0.95,
    index: str = "auto",
    flat_max_rows: int = 200_000,
    seed: int = 0,
    k: int = 16,
    nprobe: int = 8,
) -> np.ndarray:
    """Group label per row (int64, the smallest row index of its group); -1 for a row with no
    neighbour at cosine >= threshold. Rows with non-finite vectors are never grouped.

    index: "flat" exact search, "ivf" IVF-Flat (nlist ~ 4*sqrt(n), `nprobe` lists probed), "auto"
    flat up to `flat_max_rows` rows, IVF above. See the module docstring for recall.
    """
    n = len(vectors)
    left, right = threshold_edges(vectors, threshold, index, flat_max_rows, seed, k, nprobe)
    labels = connected_components(n, left, right)
    sizes = np.bincount(labels, minlength=n) if n else np.zeros(0, dtype=np.int64)
    labels[sizes[labels] < 2] = -1
    return labels


def semantic_duplicates(
    vectors: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    eligible: np.ndarray,
    threshold: float = 0.95,
    descending: bool = True,
    **index_opts: object,
) -> np.ndarray:
    """Per row, the index of the kept row it duplicates; -1 for kept rows, rows without a
    duplicate and ineligible rows. Only eligible rows are compared; each group keeps its best
    score (NaN last), ties by smallest id (`groups.keep_best`). `index_opts` go to
    `semantic_groups` (index, flat_max_rows, seed, k, nprobe)."""
    eligible = np.asarray(eligible, dtype=bool)
    members = np.flatnonzero(eligible)
    duplicate_of = np.full(len(eligible), -1, dtype=np.int64)
    if members.size < 2:
        return duplicate_of
    groups = semantic_groups(np.asarray(vectors)[members], threshold, **index_opts)  # type: ignore[arg-type]
    keeper = keep_best(groups, np.asarray(scores)[members], np.asarray(ids)[members], descending)
    is_duplicate = (keeper >= 0) & (keeper != np.arange(members.size))
    duplicate_of[members[is_duplicate]] = members[keeper[is_duplicate]]
    return duplicate_of
