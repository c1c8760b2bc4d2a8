"""Budgets and rankings: pure functions over arrays, deterministic whatever the row order.

Ties are broken by id, and random choices are keyed by a hash of (salt, seed, id), so the same
rows, config and seed give the same selection however the data was partitioned.
"""

from __future__ import annotations

import hashlib

import numpy as np


def resolve_budget(budget: int | float | None, eligible: int) -> int:
    """Rows to keep: an int is a row count, a float in (0, 1] a fraction of the eligible rows."""
    if budget is None:
        return eligible
    if isinstance(budget, int):
        return min(budget, eligible)
    return min(eligible, int(np.floor(budget * eligible + 1e-9)))


def rank_select(
    scores: np.ndarray, ids: np.ndarray, eligible: np.ndarray, k: int, descending: bool = True
) -> np.ndarray:
    """Mask of the `k` best eligible rows by score; NaN scores rank last; ties by id."""
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.flatnonzero(eligible)
    if k <= 0 or candidates.size == 0:
        return np.zeros(len(scores), dtype=bool)
    values = scores[candidates]
    key = -values if descending else values
    key = np.where(np.isnan(key), np.inf, key)
    order = np.lexsort((ids[candidates].astype(str), key))
    mask = np.zeros(len(scores), dtype=bool)
    mask[candidates[order[:k]]] = True
    return mask


def hash_keys(ids: np.ndarray, seed: int, salt: str) -> np.ndarray:
    """A seeded pseudo-random 64-bit key per id."""
    prefix = f"{salt}:{seed}:".encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(prefix + i.encode(), digest_size=8).digest(), "big")
            for i in ids.astype(str)
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def random_select(
    ids: np.ndarray, eligible: np.ndarray, k: int, seed: int, salt: str
) -> np.ndarray:
    """Mask of `k` eligible rows drawn uniformly, reproducibly, independent of row order."""
    candidates = np.flatnonzero(eligible)
    mask = np.zeros(len(ids), dtype=bool)
    if k <= 0 or candidates.size == 0:
        return mask
    keys = hash_keys(ids[candidates], seed, salt)
    order = np.lexsort((ids[candidates].astype(str), keys))
    mask[candidates[order[:k]]] = True
    return mask
