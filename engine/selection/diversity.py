"""Diversity-aware selection: DEITA's representation filter, k-center greedy, facility location.

Pure functions over arrays. `vectors` are L2-normalised embeddings (cosine == inner product);
rows with non-finite vectors never take part (treat them as ineligible). Every choice is
deterministic: scores rank NaN last, ties go to the smallest id, and seeded choices use
`budget.hash_keys`, so the same rows give the same selection whatever their order.

Each selector also has its paper's reference behaviour as named options, beside Winnow's:
  - k-center, `first="random"`: MoDS (`diverse-data-selection/kcenter_greedy.py`, Google's
    active-learning k-center): the first centre is `np.random.choice` over the rows in input
    order (seeded here: `np.random.RandomState(seed)`), then the row farthest in Euclidean
    distance from its nearest centre, ties to the first in input order (`np.argmax`). That
    depends on the input order, as the reference does.
  - facility location, `similarity="euclidean"`: Superfiltering.D (`code_diversity_fla/do_fla.py`:
    submodlib `FacilityLocationFunction(mode="dense", metric="euclidean")`, `LazyGreedy`): the
    kernel is submodlib's "euclidean similarity" exp(-||a - b|| / dim) stored as float32 (diagonal
    1), always exact, and equal gains are resolved as submodlib's LazyGreedy resolves them: its
    max-heap of (gain, index) pops the larger index first and takes a popped row when its fresh
    gain is >= the next stale bound; indices are positions in the reference's input order (rows
    sorted best score first after the `prefilter`, else input order). `prefilter` keeps the best
    rows by score first (Superfiltering's `ifd_num`).
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


# DEITA's threshold 0.9 was set in a 7B LLM's embedding space; it is the causal_lm default. It
# does not carry over to small models or to MiniLM. Measured on 3,000 Alpaca rows (seed 0), share
# of rows DEITA's walk flags too_similar (README, "DEITA's threshold"): the built-in SmolLM2-135M
# with DEITA's pooling and prompt flags 99.4% at 0.9 (its last-token states are nearly collinear:
# median nearest-neighbour cosine 0.990; 0.995 flags 4.2%), so it gives no usable target; MiniLM
# on the instruction flags 0.37% at 0.9 (deita is then top-k by score), 2.2% at 0.8, 8.2% at 0.7.
# MiniLM's default is 0.8: at ~2% flagged the two spaces agree on the flagged rows most above
# chance (Jaccard 0.05 vs 0.01 for random sets) while the filter still acts.
DEITA_THRESHOLDS = {"causal_lm": 0.9, "sentence_transformers": 0.8}


def deita_threshold(configured: float | None, backend: str) -> float:
    """The DEITA threshold in use: the configured one, else the calibrated default of the
    embedding backend."""
    if configured is not None:
        return float(configured)
    if backend not in DEITA_THRESHOLDS:
        raise ValueError(f"no calibrated DEITA threshold for embedding backend {backend!r}")
    return DEITA_THRESHOLDS[backend]


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


KCENTER_FIRST = ("score", "random")


def kcenter_select(
    vectors: np.ndarray,
    ids: np.ndarray,
    eligible: np.ndarray,
    k: int,
    seed: int = 0,
    scores: np.ndarray | None = None,
    descending: bool = True,
    first: str = "score",
) -> np.ndarray:
    """Mask of `k` eligible rows chosen by k-center greedy (MoDS).

    first="score" (Winnow): the first center is the best score when `scores` are given (NaN last,
    ties by id), else the smallest seeded hash key (`hash_keys(ids, seed, "kcenter")`); then
    repeatedly the eligible row farthest from its nearest center, distance = 1 - cosine (on
    normalised vectors this orders rows exactly as L2 distance does, since |a-b|^2 = 2 - 2 cos);
    ties by id. Independent of row order.

    first="random" (MoDS' `kCenterGreedy.select_batch_`): see `_kcenter_mods`; `scores` are not
    used, and the result depends on the row order, as the reference's does.
    One matrix-vector product per center: O(n k d) time, O(n) extra memory.
    """
    if first not in KCENTER_FIRST:
        raise ValueError(f"unknown kcenter first {first!r}; known: {', '.join(KCENTER_FIRST)}")
    ids = np.asarray(ids)
    mask = np.zeros(len(ids), dtype=bool)
    data, candidates = _usable(vectors, eligible)
    k = min(int(k), candidates.size)
    if k <= 0:
        return mask
    points = data[candidates]
    if first == "random":
        mask[candidates[_kcenter_mods(points, k, seed)]] = True
        return mask
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


def _kcenter_mods(points: np.ndarray, k: int, seed: int) -> list[int]:
    """MoDS' k-center greedy over `points` (rows in input order): positions of the centers.

    First center `np.random.RandomState(seed).choice(np.arange(n))` (what the reference's
    unseeded `np.random.choice` draws after `np.random.seed(seed)`); then `np.argmax` of each
    row's Euclidean distance to its nearest center (sklearn's `pairwise_distances`, computed as
    sqrt(|x|^2 + |c|^2 - 2 x.c) in float64), so ties go to the first row in input order. The
    reference would pick a center twice once every distance is 0 (it asserts); here a center is
    never picked again.
    """
    x = points.astype(np.float64)
    squared = np.einsum("ij,ij->i", x, x)
    center = int(np.random.RandomState(seed).choice(np.arange(len(x))))
    nearest = np.full(len(x), np.inf)
    centers: list[int] = []
    taken = np.zeros(len(x), dtype=bool)
    for _ in range(k):
        centers.append(center)
        taken[center] = True
        if len(centers) == k:
            break
        distance = np.sqrt(np.maximum(squared + squared[center] - 2.0 * (x @ x[center]), 0.0))
        np.minimum(nearest, distance, out=nearest)
        center = int(np.argmax(np.where(taken, -np.inf, nearest)))
    return centers


FACILITY_SIMILARITIES = ("cosine", "euclidean")


def submodlib_euclidean_kernel(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """submodlib's dense "euclidean" similarity exp(-||a - b|| / dim) as float32, the way its
    C++ `create_square_kernel_dense` stores it (float32, so the LazyGreedy gains built from it
    are exact sums). Distances in float64 from the Gram matrix; a distance that rounds to 0 (the
    diagonal, exact duplicates) gives 1.0 as the reference's diagonal does.

    Computed in row blocks with in-place operations in the same order as the one-shot formula
    (so the same values): at 4,000 x 4,000 the one-shot version spent 11.5 of its 15 s on passes
    over 128 MB float64 temporaries (load ~13), the blocks stay in cache."""
    a = rows.astype(np.float64)
    b = columns.astype(np.float64)
    row_norms = np.einsum("ij,ij->i", a, a)
    column_norms = np.einsum("ij,ij->i", b, b)
    gamma = float(np.float32(1.0 / a.shape[1]))  # C++: float gamma = 1.0 / v1.size()
    kernel = np.empty((len(a), len(b)), dtype=np.float32)
    step = max(1, 2**19 // max(len(b), 1))  # ~4 MB of float64 per block
    for start in range(0, len(a), step):
        stop = min(start + step, len(a))
        block = row_norms[start:stop, None] + column_norms[None, :]
        block -= 2.0 * (a[start:stop] @ b.T)
        np.maximum(block, 0.0, out=block)
        np.sqrt(block, out=block)
        block *= -gamma  # == -(distance) * gamma: negation and the product commute exactly
        np.exp(block, out=block)
        kernel[start:stop] = block
    return kernel


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
    similarity: str = "cosine",
    scores: np.ndarray | None = None,
    descending: bool = True,
    prefilter: int | None = None,
) -> np.ndarray:
    """Mask of `k` eligible rows greedily maximising facility location
    f(S) = sum_i max_{j in S} s(i, j) over the pool rows i.

    The pool: the eligible rows, or with `prefilter` (needs `scores`) only the `prefilter` best
    of them by score (NaN never; ties by id), as Superfiltering.D keeps its `ifd_num` top rows
    before facility location.

    similarity="cosine" (Winnow): s = max(0, cos); ties by id, independent of row order. Up to
    `dense_max_rows` pool rows the similarity matrix is dense and exact. Above, it is a sparse
    kNN graph from FAISS: row i is only covered by its `neighbors` nearest rows (and itself), so
    far-away similarities count as 0 (an approximation of f that keeps memory at
    O(n * neighbors)); `index`/`flat_max_rows`/`seed` choose the kNN index as in semantic dedup.

    similarity="euclidean" (Superfiltering.D, submodlib): s = exp(-||a - b|| / dim) in float32
    (`submodlib_euclidean_kernel`); always exact: dense up to `dense_max_rows`, above that each
    column is recomputed from the vectors when needed (O(n d) per gain, O(n) memory). Equal gains
    go as submodlib's LazyGreedy sends them (`_lazy_greedy`), positions being the pool's order in
    the reference (sorted best score first when `scores` are given, else input order). The gains
    are sums of float32 kernel values in float64, exact whatever the order of summation, so
    equal gains really are equal, as in the C++.

    Both run lazy greedy (stale gains are upper bounds, by submodularity): the plain greedy
    choice, largest gain first.
    """
    if similarity not in FACILITY_SIMILARITIES:
        known = ", ".join(FACILITY_SIMILARITIES)
        raise ValueError(f"unknown facility-location similarity {similarity!r}; known: {known}")
    ids = np.asarray(ids)
    mask = np.zeros(len(ids), dtype=bool)
    data, candidates = _usable(vectors, eligible)
    if prefilter is not None:
        if scores is None:
            raise ValueError("a facility-location prefilter needs scores")
        ranked = best_first(scores, ids, candidates, descending)
        ranked = ranked[~np.isnan(np.asarray(scores, dtype=np.float64)[ranked])]
        candidates = ranked[: max(int(prefilter), 0)]  # the reference's order: best first
    elif similarity == "euclidean" and scores is not None:
        candidates = best_first(scores, ids, candidates, descending)
    k = min(int(k), candidates.size)
    if k <= 0:
        return mask
    points = data[candidates]
    m = candidates.size
    if similarity == "euclidean":
        # submodlib's max-heap of (gain, index) pops the larger index first on equal gains.
        ranks = np.arange(m, 0, -1, dtype=np.int64)
    else:
        ranks = _id_ranks(ids[candidates])
    columns = _facility_columns(
        points, similarity, dense_max_rows, neighbors, index, flat_max_rows, seed
    )
    chosen = _lazy_greedy(columns, m, k, ranks, submodlib_ties=similarity == "euclidean")
    mask[candidates[np.asarray(chosen)]] = True
    return mask


Column = Callable[[int], tuple[np.ndarray | slice, np.ndarray]]


def _facility_columns(
    points: np.ndarray,
    similarity: str,
    dense_max_rows: int,
    neighbors: int,
    index: str,
    flat_max_rows: int,
    seed: int,
) -> Column:
    """column(j) -> (rows covered by j, their similarity to j); similarities are symmetric."""
    m = len(points)
    everyone = slice(None)
    if similarity == "euclidean":
        if m <= dense_max_rows:
            kernel = submodlib_euclidean_kernel(points, points)
            np.fill_diagonal(kernel, 1.0)  # as the C++ kernel sets it
            # float32 columns: gains promote them to float64 exactly (no per-call copy).
            return lambda j: (everyone, kernel[j])

        def fresh(j: int) -> tuple[np.ndarray | slice, np.ndarray]:
            column = submodlib_euclidean_kernel(points, points[j : j + 1])[:, 0]
            column[j] = 1.0
            return everyone, column.astype(np.float64)

        return fresh
    if m <= dense_max_rows:
        matrix = points.astype(np.float64)
        dense = np.maximum(matrix @ matrix.T, 0.0)
        return lambda j: (everyone, dense[j])  # symmetric: row j == column j
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
    return lambda j: (covered[ptr[j] : ptr[j + 1]], weight[ptr[j] : ptr[j + 1]])


def _lazy_greedy(
    column: Column, m: int, k: int, ranks: np.ndarray, submodlib_ties: bool = False
) -> list[int]:
    """Lazy greedy facility location over `m` rows: `k` positions, largest gain first.

    Equal gains: the heap pops the smallest `ranks` first. Winnow takes a popped row only when
    its fresh (gain, rank) still beats the next entry, so ties always go to the smallest rank;
    submodlib (`submodlib_ties`) takes it when its fresh gain is >= the next stale bound,
    whatever the ranks (`LazyGreedyOptimizer.cpp`), which can differ on exact ties.
    """
    coverage = np.zeros(m, dtype=np.float64)

    def gain(j: int) -> float:
        who, weights = column(j)
        return float(np.maximum(weights - coverage[who], 0.0).sum())

    heap = [(-gain(j), int(ranks[j]), j) for j in range(m)]
    heapq.heapify(heap)
    chosen: list[int] = []
    while len(chosen) < k:
        _, rank, j = heapq.heappop(heap)
        fresh = (-gain(j), rank, j)
        if heap and (fresh[0] > heap[0][0] if submodlib_ties else fresh > heap[0]):
            heapq.heappush(heap, fresh)  # a stale bound beat it: look again
            continue
        chosen.append(j)
        who, weights = column(j)
        coverage[who] = np.maximum(coverage[who], weights)
    return chosen
