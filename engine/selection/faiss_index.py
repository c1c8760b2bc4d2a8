"""Small FAISS helpers: exact or IVF inner-product indexes, on GPU when faiss-gpu sees one.

Vectors are L2-normalised float32, so inner product == cosine similarity. Thread count follows
the CPUs this process may use (and OMP_NUM_THREADS when set, e.g. inside a Ray actor), because
over-subscribing the cores is far slower than using fewer.
"""

from __future__ import annotations

import math
import os

import faiss
import numpy as np

_GPU_RESOURCES: object | None = None


def available_cpus() -> int:
    """CPUs this process may run on, capped by OMP_NUM_THREADS when that is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        cpus = min(cpus, int(omp))
    return max(1, cpus)


def configure_threads() -> int:
    """Set FAISS's OpenMP threads to the available CPUs; returns the count."""
    threads = available_cpus()
    faiss.omp_set_num_threads(threads)
    return threads


def gpu_count() -> int:
    """GPUs faiss can use (0 for faiss-cpu builds)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _to_device(index: faiss.Index) -> faiss.Index:
    """Move an index to GPU 0 when faiss-gpu sees one; otherwise return it unchanged."""
    global _GPU_RESOURCES
    if gpu_count() == 0:
        return index
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """C-contiguous float32 view/copy, as FAISS requires."""
    return np.ascontiguousarray(vectors, dtype=np.float32)


def flat_index(dim: int) -> faiss.Index:
    """Empty exact inner-product index (IndexFlatIP), on GPU when available."""
    configure_threads()
    return _to_device(faiss.IndexFlatIP(dim))


def default_nlist(n: int) -> int:
    """IVF lists: about 4 * sqrt(n), at least 1 and at most n."""
    return int(max(1, min(n, round(4 * math.sqrt(max(n, 1))))))


def ivf_index(
    vectors: np.ndarray,
    nlist: int | None = None,
    nprobe: int = 8,
    seed: int = 0,
    train_points_per_list: int = 32,
    niter: int = 10,
) -> faiss.Index:
    """IVF-Flat inner-product index holding `vectors`, k-means trained on a seeded sample.

    The sample is `train_points_per_list * nlist` rows (all rows when fewer): k-means cost grows
    with sample x nlist, and 32 points per list with 10 iterations is plenty for partitioning
    (this is the SemDeDup k-means step; exactness within lists comes from the flat scan).
    """
    configure_threads()
    data = as_float32(vectors)
    n, dim = data.shape
    nlist = default_nlist(n) if nlist is None else int(max(1, min(nlist, n)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.cp.niter = int(niter)
    index.cp.min_points_per_centroid = 1
    index.cp.max_points_per_centroid = max(train_points_per_list, 1)
    sample_size = min(n, nlist * train_points_per_list)
    rng = np.random.default_rng(seed)
    sample = data if sample_size == n else data[np.sort(rng.choice(n, sample_size, replace=False))]
    index.train(sample)
    index = _to_device(index)
    index.add(data)
    set_nprobe(index, nprobe)
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Lists scanned per query (CPU and GPU IVF indexes spell this differently)."""
    if hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    else:  # pragma: no cover - only with faiss-gpu
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def build_index(
    vectors: np.ndarray,
    index: str = "auto",
    flat_max_rows: int = 200_000,
    seed: int = 0,
    nprobe: int = 8,
    nlist: int | None = None,
) -> faiss.Index:
    """Index holding `vectors`: exact flat for index="flat" (or "auto" and n <= flat_max_rows),
    IVF otherwise."""
    if index not in ("auto", "flat", "ivf"):
        raise ValueError(f"index must be auto, flat or ivf, not {index!r}")
    data = as_float32(vectors)
    if index == "flat" or (index == "auto" and len(data) <= flat_max_rows):
        flat = flat_index(data.shape[1])
        flat.add(data)
        return flat
    return ivf_index(data, nlist=nlist, nprobe=nprobe, seed=seed)


def knn_search(
    index: faiss.Index, queries: np.ndarray, k: int, batch: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, neighbour ids) of each query's k nearest rows, searched in batches so the
    distance buffers stay small; missing neighbours come back with id -1."""
    queries = as_float32(queries)
    k = int(max(1, min(k, index.ntotal)))
    sims = np.empty((len(queries), k), dtype=np.float32)
    labels = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch):
        stop = start + batch
        sims[start:stop], labels[start:stop] = index.search(queries[start:stop], k)
    return sims, labels
