"""Benchmark: semantic dedup (k-means lists) + DEITA selection at 1M rows, and brute-force baselines

Synthetic, seeded, clustered unit vectors (default 1,000,000 x 384 float32): 2,000 gaussian
clusters (cosine within a cluster ~0.5-0.75; one cluster in ten tight, ~0.9-0.94, so DEITA's 0.9
filter has work) plus 5% planted near-duplicates (a copy of another row plus small noise, cosine
~0.99). Runs, timing each and sampling peak RSS:
  1. semantic_groups(threshold 0.95, index "ivf")      on all rows; its recall: the share of the
     exact above-threshold pairs of --recall-sample rows (float64, against every row) whose two
     rows end up in one group (sweep --nprobe to choose it)
  2. deita_select(k 10,000, threshold 0.9)              on all rows, best score first
Then on the first --small-rows rows (20,000): a brute-force numpy baseline (full similarity
matrix -> threshold graph -> components, and DEITA one candidate at a time against all rows
selected so far, as DEITA's reference code does) against this implementation (auto = exact flat
index at that size), checking both give the same result and printing the speed-up measured in the
same run. CPU seconds are printed beside wall seconds: on a loaded machine CPU / cores is the
better estimate of the quiet wall time. Not part of `make test`.

Run: .venv/bin/python jobs/bench/diversity_scale.py [--rows N] [--out result.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from engine.selection.dedup import semantic_groups
from engine.selection.diversity import best_first, deita_select
from engine.selection.faiss_index import configure_threads, default_nlist
from engine.selection.groups import connected_components


class PeakRss:
    """Samples this process's RSS while a phase runs."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, me.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_vectors(
    rows: int, dim: int, clusters: int, dup_share: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors with planted near-duplicates; returns (vectors, planted_of) where
    planted_of[i] is the row that row i copies (-1 for an original)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Noise per dimension s gives cosine ~ 1 / (1 + s^2 dim) between two members of a cluster.
    spread = rng.uniform(0.03, 0.06, clusters).astype(np.float32)
    tight = rng.random(clusters) < 0.1
    spread[tight] = rng.uniform(0.013, 0.016, tight.sum()).astype(np.float32)
    member_of = rng.integers(0, clusters, rows)
    vectors = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 100_000):
        part = member_of[start : start + 100_000]
        noise = rng.standard_normal((part.size, dim), dtype=np.float32)
        vectors[start : start + part.size] = centres[part] + noise * spread[part, None]
    planted_of = np.full(rows, -1, dtype=np.int64)
    copies = np.flatnonzero(rng.random(rows) < dup_share)
    originals = np.setdiff1d(np.arange(rows), copies)  # never a copy of a copy
    planted_of[copies] = originals[rng.integers(0, originals.size, copies.size)]
    noise = rng.standard_normal((copies.size, dim), dtype=np.float32) * np.float32(0.004)
    vectors[copies] = vectors[planted_of[copies]] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, planted_of


def baseline_groups(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Full n x n similarity matrix, threshold, connected components (-1 for singletons)."""
    sim = vectors @ vectors.T
    left, right = np.nonzero(np.triu(sim >= threshold, 1))
    del sim
    labels = connected_components(len(vectors), left, right)
    sizes = np.bincount(labels, minlength=len(vectors))
    labels[sizes[labels] < 2] = -1
    return labels


def baseline_deita(
    vectors: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int, threshold: float
) -> np.ndarray:
    """DEITA's loop: each candidate, best first, against every row selected so far."""
    order = best_first(scores, ids, np.arange(len(vectors)))
    chosen = np.empty((k, vectors.shape[1]), dtype=np.float32)
    rows: list[int] = []
    for row in order:
        if len(rows) == k:
            break
        if rows and float((chosen[: len(rows)] @ vectors[row]).max()) > threshold:
            continue
        chosen[len(rows)] = vectors[row]
        rows.append(int(row))
    mask = np.zeros(len(vectors), dtype=bool)
    mask[rows] = True
    return mask


def sampled_pair_recall(
    vectors: np.ndarray, groups: np.ndarray, threshold: float, sample: int, seed: int
) -> tuple[float, int]:
    """Share of exact above-threshold pairs (a sampled row x every row) whose two rows the
    approximate grouping puts in one group; and how many such pairs there were."""
    rng = np.random.default_rng(seed + 7)
    rows = np.sort(rng.choice(len(vectors), min(sample, len(vectors)), replace=False))
    found = total = 0
    for start in range(0, rows.size, 256):
        part = rows[start : start + 256]
        # float32 product as a filter (error << 1e-4 on unit vectors), float64 to decide.
        i, j = np.nonzero(vectors[part] @ vectors.T >= threshold - 1e-4)
        i = part[i]
        exact = np.einsum("ij,ij->i", vectors[i].astype(np.float64), vectors[j].astype(np.float64))
        other = (i != j) & (exact >= threshold)
        i, j = i[other], j[other]
        total += i.size
        found += int(((groups[i] >= 0) & (groups[i] == groups[j])).sum())
    return (found / total if total else 1.0), total


CPU_SECONDS: dict[str, float] = {}


def timed(fn, *args, **kwargs) -> tuple[object, float, int]:
    """(result, wall seconds, peak RSS); the process CPU seconds go to CPU_SECONDS[fn name],
    which on a loaded machine says more than the wall time (CPU / cores ~ quiet wall time)."""
    with PeakRss() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    CPU_SECONDS[fn.__name__] = time.process_time() - cpu
    return result, seconds, memory.peak


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal groupings up to label names (labels are smallest member index in both here)."""
    return bool(np.array_equal(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--small-rows", type=int, default=20_000)
    parser.add_argument("--dedup-threshold", type=float, default=0.95)
    parser.add_argument("--deita-threshold", type=float, default=0.9)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--recall-sample", type=int, default=1_000, help="rows whose exact pairs check IVF recall"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    threads = configure_threads()
    print(f"cores: {os.cpu_count()}, faiss threads: {threads}, load avg: {os.getloadavg()}")

    start = time.perf_counter()
    vectors, planted_of = synthetic_vectors(args.rows, args.dim, args.clusters, 0.05, args.seed)
    ids = np.array([f"{i:09d}" for i in range(args.rows)])
    scores = np.random.default_rng(args.seed + 1).random(args.rows)
    print(
        f"data: {args.rows} x {args.dim} float32 ({vectors.nbytes / 2**30:.2f} GiB), "
        f"{(planted_of >= 0).sum()} planted duplicates, {time.perf_counter() - start:.1f}s"
    )
    results: dict[str, dict] = {}

    groups, dedup_s, dedup_rss = timed(
        semantic_groups,
        vectors,
        args.dedup_threshold,
        index="ivf",
        seed=args.seed,
        nprobe=args.nprobe,
    )
    copies = np.flatnonzero(planted_of >= 0)
    found = groups[copies] >= 0
    found &= groups[copies] == groups[planted_of[copies]]
    recall, exact_pairs = sampled_pair_recall(
        vectors, groups, args.dedup_threshold, args.recall_sample, args.seed
    )
    dedup_cpu = CPU_SECONDS["semantic_groups"]
    results["dedup_ivf"] = {
        "cpu_seconds": dedup_cpu,
        "pair_recall_vs_exact": recall,
        "exact_pairs_in_sample": exact_pairs,
        "recall_sample_rows": args.recall_sample,
        "rows": args.rows,
        "seconds": dedup_s,
        "peak_rss_gib": dedup_rss / 2**30,
        "nlist": min(default_nlist(args.rows), round((args.rows * args.nprobe) ** 0.5)),
        "nprobe": args.nprobe,
        "grouped_rows": int((groups >= 0).sum()),
        "planted_pairs_found": float(found.mean()),
    }
    eligible = np.ones(args.rows, dtype=bool)
    (selected, too_similar), deita_s, deita_rss = timed(
        deita_select, vectors, scores, ids, eligible, args.k, args.deita_threshold
    )
    results["deita"] = {
        "cpu_seconds": CPU_SECONDS["deita_select"],
        "rows": args.rows,
        "k": args.k,
        "seconds": deita_s,
        "peak_rss_gib": deita_rss / 2**30,
        "selected": int(selected.sum()),
        "too_similar": int(too_similar.sum()),
    }

    n = min(args.small_rows, args.rows)
    small, small_ids, small_scores = vectors[:n], ids[:n], scores[:n]
    small_k = min(args.k, n // 2)
    base_groups, base_dedup_s, _ = timed(baseline_groups, small, args.dedup_threshold)
    ours_groups, ours_dedup_s, _ = timed(semantic_groups, small, args.dedup_threshold)
    base_sel, base_deita_s, _ = timed(
        baseline_deita, small, small_scores, small_ids, small_k, args.deita_threshold
    )
    (ours_sel, _), ours_deita_s, _ = timed(
        deita_select,
        small,
        small_scores,
        small_ids,
        np.ones(n, bool),
        small_k,
        args.deita_threshold,
    )
    results["small"] = {
        "rows": n,
        "k": small_k,
        "baseline_dedup_s": base_dedup_s,
        "ours_dedup_s": ours_dedup_s,
        "dedup_speedup": base_dedup_s / ours_dedup_s,
        "dedup_same_groups": same_partition(base_groups, ours_groups),
        "baseline_deita_s": base_deita_s,
        "ours_deita_s": ours_deita_s,
        "deita_speedup": base_deita_s / ours_deita_s,
        "deita_same_selection": bool(np.array_equal(base_sel, ours_sel)),
    }

    r = results
    print(f"\n{'phase':44}{'rows':>10}{'seconds':>10}{'peak RSS':>12}")
    dedup_name = f"semantic dedup, IVF {r['dedup_ivf']['nlist']} lists, nprobe {args.nprobe}"
    print(f"{dedup_name:44}{args.rows:10d}{dedup_s:10.1f}{dedup_rss / 2**30:8.2f} GiB")
    print(
        f"{'deita k=' + str(args.k) + ' threshold ' + str(args.deita_threshold):44}"
        f"{args.rows:10d}{deita_s:10.1f}{deita_rss / 2**30:8.2f} GiB"
    )
    print(
        f"  dedup: {r['dedup_ivf']['grouped_rows']} rows in groups, planted pairs found "
        f"{100 * r['dedup_ivf']['planted_pairs_found']:.2f}%, exact pairs of "
        f"{args.recall_sample} sampled rows grouped {100 * recall:.2f}% ({exact_pairs}); "
        f"deita: {int(selected.sum())} selected, {int(too_similar.sum())} too similar"
    )
    s = r["small"]
    title = f"same {n} rows (k={small_k})"
    print(f"\n{title:30}{'baseline s':>12}{'ours s':>10}{'speed-up':>10}  same result")
    print(
        f"{'dedup (full matrix vs flat)':30}{base_dedup_s:12.2f}{ours_dedup_s:10.2f}"
        f"{s['dedup_speedup']:9.1f}x  {s['dedup_same_groups']}"
    )
    print(
        f"{'deita (loop vs chunked)':30}{base_deita_s:12.2f}{ours_deita_s:10.2f}"
        f"{s['deita_speedup']:9.1f}x  {s['deita_same_selection']}"
    )
    print(
        f"CPU seconds (all threads): dedup {dedup_cpu:.1f}, deita {r['deita']['cpu_seconds']:.1f}"
    )
    print(f"load avg at the end: {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
