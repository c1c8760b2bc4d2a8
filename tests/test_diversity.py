"""Diversity selection (DEITA filter, k-center greedy, facility location) against brute force."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.selection.budget import hash_keys
from engine.selection.diversity import (
    best_first,
    deita_select,
    facility_location_select,
    kcenter_select,
)

GAP = 2e-6  # float32 (FAISS/BLAS) vs float64 (references): skip cases this close to a tie


def clustered(seed: int, n: int, dim: int, clusters: int, spread: float) -> np.ndarray:
    """Unit vectors around a few random centres: many pairs near any threshold in (0, 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + rng.normal(scale=spread, size=(n, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def make_ids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return np.array([f"row-{v:08d}" for v in rng.permutation(10 * n + 10)[:n]])


def make_scores(n: int, seed: int) -> np.ndarray:
    """Few distinct values (ties by id matter) and some NaN (ranks last)."""
    rng = np.random.default_rng(seed + 2)
    scores = rng.integers(0, 4, n).astype(np.float64)
    scores[rng.random(n) < 0.15] = np.nan
    return scores


def cosine64(vectors: np.ndarray) -> np.ndarray:
    v = vectors.astype(np.float64)
    return v @ v.T


def deita_reference(vectors, scores, ids, eligible, k, threshold, descending=True):
    """The sequential definition, one row at a time, on a float64 similarity matrix."""
    sim = cosine64(vectors)
    order = best_first(scores, ids, np.flatnonzero(eligible), descending)
    chosen: list[int] = []
    too_similar: list[int] = []
    for row in order:
        if len(chosen) == k:
            break
        if chosen and sim[row, chosen].max() > threshold:
            too_similar.append(row)
        else:
            chosen.append(row)
    return chosen, too_similar


def margin_from(values: np.ndarray, threshold: float) -> float:
    return float(np.abs(values - threshold).min()) if values.size else 1.0


problem = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "n": st.integers(1, 120),
        "dim": st.integers(2, 12),
        "clusters": st.integers(1, 8),
        "spread": st.floats(0.05, 1.0),
        "threshold": st.floats(0.3, 0.99),
        "k": st.integers(0, 130),
        "chunk": st.integers(1, 70),
        "eligible_share": st.floats(0.3, 1.0),
    }
)


@settings(max_examples=60, deadline=None)
@given(problem, st.booleans())
def test_deita_chunked_equals_sequential_definition(p: dict, descending: bool) -> None:
    vectors = clustered(p["seed"], p["n"], p["dim"], p["clusters"], p["spread"])
    assume(margin_from(cosine64(vectors), p["threshold"]) > GAP)
    ids, scores = make_ids(p["n"], p["seed"]), make_scores(p["n"], p["seed"])
    eligible = np.random.default_rng(p["seed"] + 3).random(p["n"]) < p["eligible_share"]
    selected, too_similar = deita_select(
        vectors, scores, ids, eligible, p["k"], p["threshold"], descending, chunk=p["chunk"]
    )
    chosen, skipped = deita_reference(
        vectors, scores, ids, eligible, p["k"], p["threshold"], descending
    )
    assert set(np.flatnonzero(selected)) == set(chosen)
    assert set(np.flatnonzero(too_similar)) == set(skipped)
    # The properties themselves, independent of the reference.
    assert selected.sum() <= p["k"]
    assert not (selected & too_similar).any()
    assert not ((selected | too_similar) & ~eligible).any()
    sim = cosine64(vectors)
    picked = np.flatnonzero(selected)
    off_diagonal = sim[np.ix_(picked, picked)] - 2 * np.eye(picked.size)
    assert (off_diagonal <= p["threshold"]).all()
    walk = best_first(scores, ids, np.flatnonzero(eligible), descending)
    rank = {row: i for i, row in enumerate(walk)}
    for row in np.flatnonzero(too_similar):
        earlier = [s for s in picked if rank[s] < rank[row]]
        assert earlier and sim[row, earlier].max() > p["threshold"]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 80), st.integers(1, 40))
def test_deita_ignores_row_order_and_is_repeatable(seed: int, n: int, k: int) -> None:
    vectors = clustered(seed, n, 6, 3, 0.4)
    ids, scores = make_ids(n, seed), make_scores(n, seed)
    eligible = np.ones(n, dtype=bool)
    first, flags = deita_select(vectors, scores, ids, eligible, k, 0.8, chunk=7)
    again, flags_again = deita_select(vectors, scores, ids, eligible, k, 0.8, chunk=7)
    assert np.array_equal(first, again) and np.array_equal(flags, flags_again)
    perm = np.random.default_rng(seed).permutation(n)
    shuffled, _ = deita_select(vectors[perm], scores[perm], ids[perm], eligible, k, 0.8, chunk=7)
    assert set(ids[perm][shuffled]) == set(ids[first])


def test_deita_skips_non_finite_vectors_and_stops_at_k() -> None:
    vectors = np.eye(4, dtype=np.float32)
    vectors[1] = np.nan
    ids = np.array(["a", "b", "c", "d"])
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    selected, too_similar = deita_select(vectors, scores, ids, np.ones(4, bool), 2, 0.9)
    assert ids[selected].tolist() == ["a", "c"]
    assert not too_similar.any()


def test_deita_larger_input_matches_reference() -> None:
    """Several full chunks and an incremental index of hundreds of rows."""
    n = 3_000
    vectors = clustered(7, n, 24, 40, 0.35)
    ids, scores = make_ids(n, 7), np.random.default_rng(7).random(n)
    eligible = np.ones(n, dtype=bool)
    selected, too_similar = deita_select(vectors, scores, ids, eligible, 900, 0.9, chunk=256)
    chosen, skipped = deita_reference(vectors, scores, ids, eligible, 900, 0.9)
    assert set(np.flatnonzero(selected)) == set(chosen)
    assert set(np.flatnonzero(too_similar)) == set(skipped)
    assert too_similar.sum() > 100  # the filter had work to do


def kcenter_reference(vectors, ids, eligible, k, first_row):
    distance = 1.0 - cosine64(vectors)
    candidates = list(np.flatnonzero(eligible))
    centers = [first_row]
    gaps = []
    while len(centers) < min(k, len(candidates)):
        rest = [c for c in candidates if c not in centers]
        far = {c: distance[c, centers].min() for c in rest}
        values = sorted(far.values(), reverse=True)
        if len(values) > 1:
            gaps.append(values[0] - values[1])
        best = max(rest, key=lambda c: (far[c], -np.argsort(np.argsort(ids))[c]))
        centers.append(best)
    return centers, min(gaps, default=1.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.integers(1, 30), st.booleans())
def test_kcenter_matches_brute_force(seed: int, n: int, k: int, with_scores: bool) -> None:
    vectors = clustered(seed, n, 8, 4, 0.5)
    ids = make_ids(n, seed)
    eligible = np.random.default_rng(seed).random(n) < 0.8
    assume(eligible.any())
    scores = make_scores(n, seed) if with_scores else None
    chosen = kcenter_select(vectors, ids, eligible, k, seed=seed, scores=scores)
    candidates = np.flatnonzero(eligible)
    if scores is not None:
        first = best_first(scores, ids, candidates)[0]
    else:
        keys = hash_keys(ids[candidates], seed, "kcenter")
        first = candidates[np.lexsort((ids[candidates], keys))[0]]
    centers, gap = kcenter_reference(vectors, ids, eligible, k, first)
    assume(gap > GAP)
    assert set(np.flatnonzero(chosen)) == set(centers)
    assert chosen.sum() == min(k, eligible.sum())
    perm = np.random.default_rng(seed + 5).permutation(n)
    again = kcenter_select(
        vectors[perm],
        ids[perm],
        eligible[perm],
        k,
        seed=seed,
        scores=None if scores is None else scores[perm],
    )
    assert set(ids[perm][again]) == set(ids[chosen])


def test_kcenter_breaks_ties_by_id_and_seeds_first_center() -> None:
    vectors = np.eye(3, dtype=np.float32)
    ids = np.array(["c", "b", "a"])
    scores = np.array([9.0, 1.0, 1.0])
    chosen = kcenter_select(vectors, ids, np.ones(3, bool), 2, scores=scores)
    assert ids[chosen].tolist() == ["c", "a"]  # b and a tie at distance 1: smallest id
    firsts = {ids[kcenter_select(vectors, ids, np.ones(3, bool), 1, seed=s)][0] for s in range(12)}
    assert len(firsts) > 1  # the seed really changes the first center


def facility_value(sim: np.ndarray, chosen: list[int], rows: np.ndarray) -> float:
    return float(np.maximum(sim[np.ix_(rows, chosen)], 0).max(axis=1).sum()) if chosen else 0.0


def facility_reference(vectors, ids, eligible, k):
    """Plain greedy (all gains recomputed every step), largest gain, ties by id."""
    rows = np.flatnonzero(eligible)
    v = vectors[rows].astype(np.float64)
    sim = np.maximum(v @ v.T, 0.0)
    cover = np.zeros(len(rows))
    order = np.argsort(ids[rows])
    chosen: list[int] = []
    for _ in range(min(k, len(rows))):
        gains = {j: np.maximum(sim[j] - cover, 0.0).sum() for j in order if j not in chosen}
        best = max(gains, key=lambda j: (gains[j], -int(np.flatnonzero(order == j)[0])))
        chosen.append(best)
        cover = np.maximum(cover, sim[best])
    return rows[chosen]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.integers(0, 25))
def test_facility_location_lazy_greedy_equals_plain_greedy(seed: int, n: int, k: int) -> None:
    vectors = clustered(seed, n, 6, 5, 0.6)
    ids = make_ids(n, seed)
    eligible = np.random.default_rng(seed).random(n) < 0.85
    chosen = facility_location_select(vectors, ids, eligible, k)
    assert set(np.flatnonzero(chosen)) == set(facility_reference(vectors, ids, eligible, k))
    assert chosen.sum() == min(k, eligible.sum())
    perm = np.random.default_rng(seed + 9).permutation(n)
    again = facility_location_select(vectors[perm], ids[perm], eligible[perm], k)
    assert set(ids[perm][again]) == set(ids[chosen])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 9), st.integers(1, 3))
def test_facility_location_reaches_greedy_guarantee(seed: int, n: int, k: int) -> None:
    """Greedy on a monotone submodular function is within (1 - 1/e) of the best subset."""
    vectors = clustered(seed, n, 4, 3, 0.8)
    ids = make_ids(n, seed)
    rows = np.arange(n)
    sim = cosine64(vectors)
    chosen = list(np.flatnonzero(facility_location_select(vectors, ids, np.ones(n, bool), k)))
    best = max(facility_value(sim, list(c), rows) for c in itertools.combinations(rows, min(k, n)))
    assert facility_value(sim, chosen, rows) >= (1 - 1 / np.e) * best - 1e-9


def test_facility_location_sparse_graph_tracks_dense() -> None:
    """With a kNN graph (forced by dense_max_rows=0) the objective stays close to exact dense."""
    n = 400
    vectors = clustered(3, n, 16, 12, 0.5)
    ids = make_ids(n, 3)
    eligible = np.ones(n, dtype=bool)
    sim = cosine64(vectors)
    dense = list(np.flatnonzero(facility_location_select(vectors, ids, eligible, 20)))
    complete = facility_location_select(vectors, ids, eligible, 20, neighbors=n, dense_max_rows=0)
    sparse = facility_location_select(vectors, ids, eligible, 20, neighbors=16, dense_max_rows=0)
    rows = np.arange(n)
    exact = facility_value(sim, dense, rows)
    assert abs(facility_value(sim, list(np.flatnonzero(complete)), rows) - exact) <= 1e-3 * exact
    assert facility_value(sim, list(np.flatnonzero(sparse)), rows) >= 0.95 * exact
    assert sparse.sum() == 20
