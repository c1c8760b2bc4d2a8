"""Fallback peer for semantic dedup: what a user writes with FAISS alone. An exact inner-product
index (`IndexFlatIP`), one `range_search` of every row at the cosine threshold, the pairs'
connected components (scipy). Run with the project's .venv/bin/python.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, required=True, help=".npy, unit rows")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--out", type=Path, required=True, help=".npy group label per row")
    args = parser.parse_args()
    import faiss
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    vectors = np.ascontiguousarray(np.load(args.vectors), dtype=np.float32)
    n = len(vectors)
    start = time.perf_counter()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    limits, _, neighbours = index.range_search(vectors, args.threshold)
    rows = np.repeat(np.arange(n), np.diff(limits.astype(np.int64)))
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, neighbours)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    labels = np.where(sizes[labels] > 1, labels, -1)
    seconds = time.perf_counter() - start
    np.save(args.out, labels)
    emit(
        n,
        seconds,
        {"index": "faiss IndexFlatIP range_search", "threshold": args.threshold},
        quality={"grouped": int((labels >= 0).sum())},
        faiss_threads=faiss.omp_get_max_threads(),
    )


if __name__ == "__main__":
    main()
