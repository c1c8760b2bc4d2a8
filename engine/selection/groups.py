"""Duplicate groups: connected components of candidate pairs, and which member each group keeps.

Pure functions over arrays (no Spark, no Ray, no FAISS), shared by the near-duplicate (MinHash)
and semantic-duplicate (embedding) paths, so "keep the best-scored member, ties by id" means the
same thing for both.
"""

from __future__ import annotations

import numpy as np


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Component label of each of `n` nodes given undirected edges (left[i], right[i]).

    The label is the smallest node index of the component, so it does not depend on edge order.
    Union-find with path halving, vectorised by repeated min-label propagation.
    """
    labels = np.arange(n, dtype=np.int64)
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    if left.size == 0:
        return labels
    while True:
        # Hook each edge's larger root onto the smaller, then compress paths fully.
        a, b = labels[left], labels[right]
        low, high = np.minimum(a, b), np.maximum(a, b)
        changed = low != high
        if not changed.any():
            return labels
        np.minimum.at(labels, high[changed], low[changed])
        while True:
            parent = labels[labels]
            if np.array_equal(parent, labels):
                break
            labels = parent


def keep_best(
    groups: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    descending: bool = True,
) -> np.ndarray:
    """Index of the kept member of each row's group (itself for keepers), -1 for no group.

    `groups` holds a group label per row (any integers; -1 means the row is in no group). The
    kept member is the best score (NaN ranks last), ties broken by the smallest id.
    """
    groups = np.asarray(groups)
    n = len(groups)
    keeper = np.full(n, -1, dtype=np.int64)
    members = np.flatnonzero(groups >= 0)
    if members.size == 0:
        return keeper
    values = np.asarray(scores, dtype=np.float64)[members]
    key = -values if descending else values
    key = np.where(np.isnan(key), np.inf, key)
    order = np.lexsort((ids[members].astype(str), key, groups[members]))
    sorted_members = members[order]
    sorted_groups = groups[sorted_members]
    first = np.ones(sorted_members.size, dtype=bool)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    best_of_run = sorted_members[first][np.cumsum(first) - 1]
    keeper[sorted_members] = best_of_run
    return keeper
