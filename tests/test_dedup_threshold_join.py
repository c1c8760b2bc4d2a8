"""threshold_join: the bf16-filtered GEMM pair search is exact against a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.selection.threshold_join import dense_pairs, partition_lists, partitioned_pairs


def brute_pairs(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    v = vectors.astype(np.float64)
    left, right = np.nonzero(np.triu(v @ v.T >= threshold, 1))
    return set(zip(left.tolist(), right.tolist(), strict=True))


def near_threshold(seed: int, n: int, dim: int, threshold: float) -> np.ndarray:
    """Unit vectors in pairs whose cosine sits within +-0.008 of the threshold (inside the bf16
    error band, so the filter alone would decide some of them wrongly), plus random rows."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ortho = rng.normal(size=(n, dim))
    ortho -= np.einsum("ij,ij->i", ortho, base)[:, None] * base
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    cos = np.clip(threshold + rng.uniform(-0.008, 0.008, n), -1, 1)
    partner = cos[:, None] * base + np.sqrt(1 - cos**2)[:, None] * ortho
    return np.concatenate([base, partner]).astype(np.float32)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.integers(2, 48), st.floats(0.5, 0.99))
def test_dense_pairs_are_exact_near_the_threshold(
    precision: str, seed: int, n: int, dim: int, threshold: float
) -> None:
    vectors = near_threshold(seed, n, dim, threshold)
    left, right = dense_pairs(vectors, threshold, tile=32, precision=precision)
    assert set(zip(left.tolist(), right.tolist(), strict=True)) == brute_pairs(vectors, threshold)
    assert np.all(left < right)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 80), st.floats(0.5, 0.99), st.integers(1, 6))
def test_partitioned_pairs_probing_every_list_are_exact(
    seed: int, n: int, threshold: float, nlist: int
) -> None:
    vectors = near_threshold(seed, n, 16, threshold)
    left, right = partitioned_pairs(
        vectors, threshold, nlist=nlist, nprobe=nlist, seed=seed, query_tile=16
    )
    assert set(zip(left.tolist(), right.tolist(), strict=True)) == brute_pairs(vectors, threshold)


def test_partitioned_pairs_are_a_subset_and_find_close_duplicates() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(600, 32)).astype(np.float32)
    copies = base[:200] + rng.normal(scale=0.01, size=(200, 32)).astype(np.float32)
    vectors = np.concatenate([base, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = brute_pairs(vectors, 0.95)
    left, right = partitioned_pairs(vectors, 0.95, nlist=20, nprobe=2, seed=0)
    found = set(zip(left.tolist(), right.tolist(), strict=True))
    assert found <= exact
    assert {(i, 600 + i) for i in range(200)} <= found  # cosine ~0.998: same list


def test_partition_lists_is_seeded_and_nearest_first() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assign, probes = partition_lists(vectors, 10, 3, seed=1, precision="fp32")
    again, _ = partition_lists(vectors, 10, 3, seed=1, precision="fp32")
    assert np.array_equal(assign, again)
    assert probes.shape == (500, 3) and np.array_equal(assign, probes[:, 0])
    assert all(len(set(row)) == 3 for row in probes.tolist())
