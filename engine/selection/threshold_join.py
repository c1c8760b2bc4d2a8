"""All pairs of rows with cosine >= threshold: blocked GEMM, bf16 where the CPU has it, exact check.

Why not FAISS: its flat `range_search` runs at ~5 GFLOP/s here and its flat kNN (BLAS sgemm) at
~25 GFLOP/s on 2 loaded cores, while a bf16 GEMM through torch/oneDNN on an avx512_bf16 CPU runs
at ~115 GFLOP/s on the same cores (measured side by side, load ~14). The bf16 product is only a
filter: every pair it passes at `threshold - margin` is recomputed in float64 and kept iff that
is >= threshold, and the margin bounds the bf16 error, so the result is the exact threshold graph
(float64 cosine of the float32 vectors), not an approximation.

bf16 error bound for vectors of norm <= r: rounding both inputs to bf16 (unit roundoff u = 2^-8)
moves each product a_i*b_i by at most (2u + u^2)|a_i b_i|, in all <= (2u + u^2) r^2 (Cauchy-
Schwarz), accumulation is float32 (negligible at d <= 4096), and rounding the output to bf16 adds
<= u r^2: <= 0.0118 r^2 in all; the margin is 0.016 r^2. Without avx512_bf16/amx_bf16 (where
bf16 GEMM is emulated and slow) the filter is a float32 GEMM with margin 1e-4 r^2.

Two searches:
  - `dense_pairs`: every pair (upper-triangle tiles only): exact.
  - `partitioned_pairs`: SemDeDup/IVF-style: k-means lists (FAISS, seeded sample), each row
    compared with the members of its `nprobe` nearest lists. A pair is found when either row
    probes the other's list; pairs across lists neither probes are missed (recall measured in
    jobs/bench/diversity_scale.py). Pairs it returns are exact (same float64 check).
"""

from __future__ import annotations

import functools
import math

import faiss
import numpy as np
import torch

from engine.selection.faiss_index import as_float32, configure_threads, default_nlist

_RECHECK_CHUNK = 16_384


@functools.cache
def native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (avx512_bf16 or AMX), so bf16 GEMM is fast."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _filter_dtype(precision: str) -> torch.dtype:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision == "bf16" or (precision == "auto" and native_bf16()):
        return torch.bfloat16
    return torch.float32


def _max_norm2(data: np.ndarray) -> float:
    """Largest squared row norm (1 for unit rows), floored so bounds never vanish."""
    norm2 = float(np.einsum("ij,ij->i", data, data).max()) if data.size else 1.0
    return max(norm2, 1e-12)


def _margin(dtype: torch.dtype, data: np.ndarray) -> float:
    """Bound on |filter product - exact product| for these rows (see the module docstring)."""
    return (0.016 if dtype == torch.bfloat16 else 1e-4) * _max_norm2(data)


def _candidates(sims: torch.Tensor, low_bar: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) positions of `sims` >= low_bar.

    For bf16 products and a positive bar this compares the raw bits as int16 in numpy: positive
    bf16 values order as their bit patterns, negatives (sign bit set) fall below any positive
    bar. torch's bf16 `>=` + `nonzero` took 2x the GEMM itself (90 ms vs 50 ms on a 4,000 x 500
    block), the int16 compare 0.4 ms. The bar is rounded down to a bf16 value, so only extra
    candidates (later rejected by the exact check) can come from the rounding.
    """
    if sims.dtype == torch.bfloat16 and low_bar > 0:
        bar = torch.tensor([low_bar], dtype=torch.float32).to(torch.bfloat16)
        bits = int(bar.view(torch.int16)[0])
        if float(bar[0]) > low_bar:
            bits -= 1  # the next smaller positive bf16
        return np.nonzero(sims.view(torch.int16).numpy() >= bits)
    return np.nonzero(sims.float().numpy() >= low_bar)


def _exact(
    data: np.ndarray, left: np.ndarray, right: np.ndarray, threshold: float, band: float
) -> np.ndarray:
    """Mask of candidate pairs whose float64 cosine is >= threshold, in bounded-memory chunks.

    float32 first (a dense product of the distinct rows when candidates are dense, as in a tight
    cluster, else per-pair dots), float64 only for pairs within `band` of the threshold (float32
    dot error <= d 2^-24 r^2, 2.3e-5 at d = 384; band = max(1e-4, 2 d 2^-24) r^2). Gathering
    float64 rows for every pair was the largest part of the 1M-row run's profile.
    """
    keep = np.empty(left.size, dtype=bool)
    for start in range(0, left.size, _RECHECK_CHUNK):
        i = left[start : start + _RECHECK_CHUNK]
        j = right[start : start + _RECHECK_CHUNK]
        rows_i, at_i = np.unique(i, return_inverse=True)
        rows_j, at_j = np.unique(j, return_inverse=True)
        if rows_i.size * rows_j.size <= 4 * i.size:
            sims = (data[rows_i] @ data[rows_j].T)[at_i, at_j]
        else:
            sims = np.einsum("ij,ij->i", data[i], data[j])
        near = np.flatnonzero(np.abs(sims - threshold) <= band)
        decided = sims >= threshold
        if near.size:
            a, b = data[i[near]].astype(np.float64), data[j[near]].astype(np.float64)
            decided[near] = np.einsum("ij,ij->i", a, b) >= threshold
        keep[start : start + _RECHECK_CHUNK] = decided
    return keep


def _unique_pairs(lefts: list[np.ndarray], rights: list[np.ndarray], n: int) -> tuple:
    """Sorted unique (low, high) pairs, via one int64 key per pair (n^2 < 2^63 for n < 3e9)."""
    if not lefts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    left, right = np.concatenate(lefts), np.concatenate(rights)
    low, high = np.minimum(left, right), np.maximum(left, right)
    keys = np.unique(low * np.int64(n) + high)
    return keys // n, keys % n


def dense_pairs(
    data: np.ndarray, threshold: float, tile: int = 4_096, precision: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (left < right) with float64 cosine >= threshold; exact."""
    data = as_float32(data)
    n = len(data)
    dtype = _filter_dtype(precision)
    low_bar = threshold - _margin(dtype, data)
    band = max(1e-4, 2 * data.shape[1] * 2.0**-24) * _max_norm2(data)
    matrix = torch.from_numpy(data).to(dtype)
    lefts, rights = [], []
    for a in range(0, n, tile):
        block = matrix[a : a + tile]
        for b in range(a, n, tile):
            i, j = _candidates(block @ matrix[b : b + tile].T, low_bar)
            i, j = i + a, j + b
            upper = i < j
            i, j = i[upper], j[upper]
            keep = _exact(data, i, j, threshold, band)
            lefts.append(i[keep])
            rights.append(j[keep])
    return _unique_pairs(lefts, rights, n)


def partition_lists(
    data: np.ndarray,
    nlist: int,
    nprobe: int,
    seed: int = 0,
    train_points_per_list: int = 32,
    niter: int = 10,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """(list of each row, its `nprobe` nearest lists) from seeded k-means on a sample.

    k-means is FAISS's (spherical, inner product) on `train_points_per_list * nlist` sampled rows;
    assigning all rows is one blocked GEMM against the centroids (bf16 where native: only the
    partition depends on it, never a similarity that decides a pair).
    """
    configure_threads()
    n, dim = data.shape
    nlist = int(max(1, min(nlist, n)))
    nprobe = int(max(1, min(nprobe, nlist)))
    rng = np.random.default_rng(seed)
    size = min(n, nlist * train_points_per_list)
    sample = data if size == n else data[np.sort(rng.choice(n, size, replace=False))]
    kmeans = faiss.Kmeans(
        dim,
        nlist,
        niter=niter,
        seed=int(seed),
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=max(train_points_per_list, 1),
    )
    kmeans.train(np.ascontiguousarray(sample))
    dtype = _filter_dtype(precision)
    centroids = torch.from_numpy(np.ascontiguousarray(kmeans.centroids)).to(dtype)
    probes = np.empty((n, nprobe), dtype=np.int64)
    matrix = torch.from_numpy(data)
    for start in range(0, n, 65_536):
        sims = matrix[start : start + 65_536].to(dtype) @ centroids.T
        probes[start : start + 65_536] = torch.topk(sims.float(), nprobe, dim=1).indices.numpy()
    return probes[:, 0].copy(), probes


def partitioned_pairs(
    data: np.ndarray,
    threshold: float,
    nlist: int | None = None,
    nprobe: int = 8,
    seed: int = 0,
    precision: str = "auto",
    query_tile: int = 8_192,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (left < right) with float64 cosine >= threshold among rows that share a probed list.

    Every pair returned is exact; recall is below 1 only for pairs whose lists neither row
    probes. Cost ~ n * nprobe * (n / nlist) * d multiply-adds (bf16) plus the assignment
    n * nlist * d; nlist defaults to sqrt(n * nprobe), which balances the two, capped at the IVF
    default 4 * sqrt(n) (so nprobe >= 4 * sqrt(n) probes every list: exact).
    """
    data = as_float32(data)
    n = len(data)
    if nlist is None:
        nlist = min(default_nlist(n), max(1, round(math.sqrt(n * max(nprobe, 1)))))
    dtype = _filter_dtype(precision)
    low_bar = threshold - _margin(dtype, data)
    band = max(1e-4, 2 * data.shape[1] * 2.0**-24) * _max_norm2(data)
    assign, probes = partition_lists(data, nlist, nprobe, seed, precision=precision)
    nlist = int(max(1, min(nlist, n)))
    members = np.argsort(assign, kind="stable")
    member_ptr = np.searchsorted(assign[members], np.arange(nlist + 1))
    flat = probes.ravel()
    query_order = np.argsort(flat, kind="stable")
    queries = np.repeat(np.arange(n, dtype=np.int64), probes.shape[1])[query_order]
    query_ptr = np.searchsorted(flat[query_order], np.arange(nlist + 1))
    matrix = torch.from_numpy(data).to(dtype)
    # Rows grouped by list once, so each list's members are a slice, not a gather (the per-list
    # gather was 17% of the 1M-row profile).
    by_list = matrix[torch.from_numpy(members)]
    lefts, rights = [], []
    for c in range(nlist):
        inside = members[member_ptr[c] : member_ptr[c + 1]]
        asking = queries[query_ptr[c] : query_ptr[c + 1]]
        if inside.size == 0 or asking.size == 0:
            continue
        block = by_list[int(member_ptr[c]) : int(member_ptr[c + 1])]
        for start in range(0, asking.size, query_tile):
            rows = asking[start : start + query_tile]
            i, j = _candidates(matrix[torch.from_numpy(rows)] @ block.T, low_bar)
            i, j = rows[i], inside[j]
            other = i != j
            i, j = i[other], j[other]
            keep = _exact(data, i, j, threshold, band)
            lefts.append(i[keep])
            rights.append(j[keep])
    return _unique_pairs(lefts, rights, n)
