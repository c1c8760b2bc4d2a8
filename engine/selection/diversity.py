"""Diversity-aware selection: DEITA's representation filter, k-center greedy, facility location.

Pure functions over arrays. `vectors` are L2-normalised embeddings (cosine == inner product);
rows with non-finite vectors never take part (treat them as ineligible). Every choice is
deterministic: scores rank NaN last, ties go to the smallest id, and seeded choices use
`budget.hash_keys`, so the same rows give the same selection whatever their order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

from engine.selection.budget import hash_keys
from engine.selection.faiss_index import as_float32, build_index, flat_index, knn_search


def _usable(vectors: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 vectors, and the eligible rows whose vectors are all finite."""
    data = as_float32(vectors)
    finite = np.isfinite(data).all(axis=1) if data.size else np.ones(len(data), dtype=bool)
    return data, np.flatnonzero(np.asarray(eligible, dtype=bool) & finite)


def best_first(
    scores: np.ndarray, ids: np.ndarray, rows: np.ndarray, descending: bool = True
) -> np.ndarray:
    """`rows` ordered best score first, NaN last, ties by id."""
    values = np.asarray(scores, dtype=np.float64)[rows]
    key = -values if descending else values
    key = np.where(np.isnan(key), np.inf, key)
    return rows[np.lexsort((np.asarray(ids)[rows].astype(str), key))]


def _id_ranks(ids: np.ndarray) -> np.ndarray:
    """Position of each id in sorted order: the deterministic tie-breaker."""
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[np.argsort(np.asarray(ids).astype(str), kind="stable")] = np.arange(len(ids))
    return ranks


def deita_select(
    vectors: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    eligible: np.ndarray,
    k: int,
    threshold: float = 0.9,
    descending: bool = True,
    chunk: int = 4_096,
) -> tuple[np.ndarray, np.ndarray]:
    """(selected, too_similar) masks of DEITA's representation filter.

    Definition: walk eligible rows best-first (NaN last, ties by id); a row whose cosine to ANY
    already selected row is > threshold is flagged too_similar, otherwise selected; stop once `k`
    are selected (later rows are neither).

    Implementation: rows are taken in chunks; each chunk is searched in one batched call against
    an incremental FAISS flat index of the rows selected so far (max similarity, k=1), and the
    survivors are then resolved exactly and in order against the rows accepted earlier in the same
    chunk (their Gram matrix). That is the sequential definition, at BLAS speed: cost ~ rows
    walked x rows selected x d. Chunks shrink to ~2x the remaining budget so little is walked past
    the stop.
    """
    ids = np.asarray(ids)
    n = len(ids)
    selected = np.zeros(n, dtype=bool)
    too_similar = np.zeros(n, dtype=bool)
    data, candidates = _usable(vectors, eligible)
    if k <= 0 or candidates.size == 0:
        return selected, too_similar
    order = best_first(scores, ids, candidates, descending)
    index = flat_index(data.shape[1])
    count, start = 0, 0
    while start < order.size and count < k:
        size = int(min(chunk, max(64, 2 * (k - count))))
        rows = order[start : start + size]
        start += size
        block = data[rows]
        if index.ntotal:
            nearest, _ = index.search(block, 1)
            blocked = nearest[:, 0] > threshold
        else:
            blocked = np.zeros(rows.size, dtype=bool)
        survivors = np.flatnonzero(~blocked)
        conflict = (block[survivors] @ block[survivors].T) > threshold
        accepted_here = np.zeros(survivors.size, dtype=bool)
        survivor_pos = np.full(rows.size, -1, dtype=np.int64)
        survivor_pos[survivors] = np.arange(survivors.size)
        newly: list[int] = []
        for position in range(rows.size):
            if count == k:
                break
            s = survivor_pos[position]
            if s < 0 or conflict[s, :s][accepted_here[:s]].any():
                too_similar[rows[position]] = True
                continue
            accepted_here[s] = True
            newly.append(position)
            count += 1
        if newly:
            chosen = rows[np.asarray(newly)]
            selected[chosen] = True
            index.add(np.ascontiguousarray(data[chosen]))
    return selected, too_similar


def kcenter_select(
    vectors: np.ndarray,
    ids: np.ndarray,
    eligible: np.ndarray,
    k: int,
    seed: int = 0,
    scores: np.ndarray | None = None,
    descending: bool = True,
) -> np.ndarray:
    """Mask of `k` eligible rows chosen by k-center greedy (MoDS).

    First center: the best score when `scores` are given (NaN last, ties by id), else the smallest
    seeded hash key (`hash_keys(ids, seed, "kcenter")`). Then repeatedly the eligible row farthest
    from its nearest center, distance = 1 - cosine (on normalised vectors this orders rows exactly
    as L2 distance does, since |a-b|^2 = 2 - 2 cos); ties by id. One matrix-vector product per
    center: O(n k d) time, O(n) extra memory.
    """
    ids = np.asarray(ids)
    mask = np.zeros(len(ids), dtype=bool)
    data, candidates = _usable(vectors, eligible)
    k = min(int(k), candidates.size)
    if k <= 0:
        return mask
    points = data[candidates]
    ranks = _id_ranks(ids[candidates])
    if scores is not None:
        first = int(
            np.flatnonzero(candidates == best_first(scores, ids, candidates, descending)[0])[0]
        )
    else:
        keys = hash_keys(ids[candidates], seed, "kcenter")
        first = int(np.lexsort((ranks, keys))[0])
    nearest = np.full(candidates.size, -np.inf, dtype=np.float32)  # max cosine to a center
    is_center = np.zeros(candidates.size, dtype=bool)
    center = first
    for _ in range(k):
        is_center[center] = True
        np.maximum(nearest, points @ points[center], out=nearest)
        if is_center.all():
            break
        # Farthest = smallest max-cosine; ties by id.
        farthest = np.where(is_center, np.inf, nearest)
        tied = np.flatnonzero(farthest == farthest.min())
        center = int(tied[np.argmin(ranks[tied])])
    mask[candidates[is_center]] = True
    return mask


def facility_location_select(
    vectors: np.ndarray,
    ids: np.ndarray,
    eligible: np.ndarray,
    k: int,
    seed: int = 0,
    neighbors: int = 32,
    dense_max_rows: int = 4_096,
    index: str = "auto",
    flat_max_rows: int = 50_000,
) -> np.ndarray:
    """Mask of `k` eligible rows greedily maximising facility location
    f(S) = sum_i max_{j in S} max(0, cos(i, j)) over the eligible rows i.

    Up to `dense_max_rows` eligible rows the similarity matrix is dense and exact. Above, it is a
    sparse kNN graph from FAISS: row i is only covered by its `neighbors` nearest rows (and
    itself), so far-away similarities count as 0 (an approximation of f that keeps memory at
    O(n * neighbors)); `index`/`flat_max_rows`/`seed` choose the kNN index as in semantic dedup.
    Lazy greedy (stale gains are upper bounds, by submodularity) gives exactly the plain greedy
    choice: largest gain, ties by id.
    """
    ids = np.asarray(ids)
    mask = np.zeros(len(ids), dtype=bool)
    data, candidates = _usable(vectors, eligible)
    k = min(int(k), candidates.size)
    if k <= 0:
        return mask
    points = data[candidates]
    m = candidates.size
    ranks = _id_ranks(ids[candidates])
    coverage = np.zeros(m, dtype=np.float64)

    column: Callable[[int], tuple[np.ndarray | slice, np.ndarray]]
    if m <= dense_max_rows:
        similarity = np.maximum(points.astype(np.float64) @ points.astype(np.float64).T, 0.0)
        everyone = slice(None)

        def column(j: int) -> tuple[np.ndarray | slice, np.ndarray]:
            return everyone, similarity[j]  # symmetric: row j == column j

    else:
        sims, labels = knn_search(
            build_index(points, index, flat_max_rows, seed=seed), points, neighbors + 1
        )
        covered = np.repeat(np.arange(m, dtype=np.int64), labels.shape[1])
        by = labels.ravel()
        weight = np.maximum(sims.ravel().astype(np.float64), 0.0)
        keep = (by >= 0) & (by != covered)
        # Every row covers itself with similarity 1 (a duplicate may have displaced it).
        covered = np.concatenate([covered[keep], np.arange(m)])
        by = np.concatenate([by[keep], np.arange(m)])
        weight = np.concatenate([weight[keep], np.ones(m)])
        order = np.argsort(by, kind="stable")
        covered, weight = covered[order], weight[order]
        ptr = np.searchsorted(by[order], np.arange(m + 1))

        def column(j: int) -> tuple[np.ndarray | slice, np.ndarray]:
            return covered[ptr[j] : ptr[j + 1]], weight[ptr[j] : ptr[j + 1]]

    def gain(j: int) -> float:
        who, weights = column(j)
        return float(np.maximum(weights - coverage[who], 0.0).sum())

    heap = [(-gain(j), int(ranks[j]), j) for j in range(m)]
    heapq.heapify(heap)
    chosen: list[int] = []
    while len(chosen) < k:
        _, rank, j = heapq.heappop(heap)
        fresh = (-gain(j), rank, j)
        if heap and fresh > heap[0]:
            heapq.heappush(heap, fresh)  # a stale bound beat it: look again
            continue
        chosen.append(j)
        who, weights = column(j)
        coverage[who] = np.maximum(coverage[who], weights)
    mask[candidates[np.asarray(chosen)]] = True
    return mask
