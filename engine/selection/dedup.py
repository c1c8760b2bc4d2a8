"""Semantic duplicates: groups of rows whose embeddings are within a cosine threshold.

A group is a connected component of the graph "i ~ j iff cos(i, j) >= threshold" (cosine in
float64 of the float32 vectors). The graph comes from `threshold_join`: for index "flat" every
pair is compared (blocked bf16/fp32 GEMM as a filter with a proven error margin, then an exact
check), so the graph is exact, with no neighbour limit (the former FAISS kNN search stopped
widening at 4,096 neighbours). For index "ivf" (SemDeDup-style) rows are compared only with the
members of their `nprobe` nearest k-means lists: a pair is missed only when neither row probes
the other's list, which for duplicate-level similarities (>= 0.9) is rare because near-identical
vectors fall in the same or adjacent cells; recall against the exact graph is measured by
jobs/bench/diversity_scale.py. Pairs it does return are exact.
"""

from __future__ import annotations

import numpy as np

from engine.selection.faiss_index import as_float32
from engine.selection.groups import connected_components, keep_best
from engine.selection.threshold_join import dense_pairs, partitioned_pairs


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
    nprobe: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges (left < right) between rows with cosine >= threshold.

    "flat": every pair (`threshold_join.dense_pairs`, exact). "ivf": pairs within shared probed
    k-means lists (`threshold_join.partitioned_pairs`). Both check each pair in float64.
    """
    if index not in ("auto", "flat", "ivf"):
        raise ValueError(f"index must be auto, flat or ivf, not {index!r}")
    data, _ = _finite_rows(vectors)
    n = len(data)
    if n < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if index == "flat" or (index == "auto" and n <= flat_max_rows):
        return dense_pairs(data, threshold)
    return partitioned_pairs(data, threshold, nprobe=nprobe, seed=seed)


def semantic_groups(
    vectors: np.ndarray,
    threshold: float = 0.95,
    index: str = "auto",
    flat_max_rows: int = 200_000,
    seed: int = 0,
    nprobe: int = 8,
) -> np.ndarray:
    """Group label per row (int64, the smallest row index of its group); -1 for a row with no
    neighbour at cosine >= threshold. Rows with non-finite vectors are never grouped.

    index: "flat" exact (every pair), "ivf" k-means lists (nlist = min(4 sqrt(n), sqrt(n nprobe)),
    `nprobe` probed per row), "auto" flat up to `flat_max_rows` rows, IVF above. See the module
    docstring for recall.
    """
    n = len(vectors)
    left, right = threshold_edges(vectors, threshold, index, flat_max_rows, seed, nprobe)
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
    `semantic_groups` (index, flat_max_rows, seed, nprobe)."""
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
