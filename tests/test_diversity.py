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


# ---- the papers' reference behaviours -----------------------------------------------------


def mods_reference(features: np.ndarray, k: int, seed: int) -> list[int]:
    """MoDS' `kCenterGreedy.select_batch_` (diverse-data-selection/kcenter_greedy.py), its loop
    written out: global np.random seeded, sklearn's pairwise_distances, np.argmax."""
    from sklearn.metrics import pairwise_distances

    np.random.seed(seed)
    already: list[int] = []
    min_distances = None
    for _ in range(k):
        if not already:
            ind = np.random.choice(np.arange(features.shape[0]))
        else:
            ind = int(np.argmax(min_distances))
        dist = pairwise_distances(features, features[[ind]], metric="euclidean")
        min_distances = (
            np.min(dist, axis=1).reshape(-1, 1)
            if min_distances is None
            else np.minimum(min_distances, dist)
        )
        already.append(int(ind))
    return already


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 80), st.integers(1, 30))
def test_kcenter_random_first_is_mods_reference(seed: int, n: int, k: int) -> None:
    vectors = clustered(seed, n, 8, 4, 0.5)
    # Distinct points only: the reference asserts once every distance is 0.
    assume(len(np.unique(vectors.round(5), axis=0)) == n)
    k = min(k, n)
    ids = make_ids(n, seed)
    expected = mods_reference(vectors.astype(np.float64), k, seed)
    chosen = kcenter_select(vectors, ids, np.ones(n, bool), k, seed=seed, first="random")
    assert set(np.flatnonzero(chosen)) == set(expected)
    # Ineligible rows are left out before the draw: the reference run on the eligible rows.
    eligible = np.random.default_rng(seed).random(n) < 0.7
    assume(eligible.sum() >= 1)
    rows = np.flatnonzero(eligible)
    sub = mods_reference(vectors[rows].astype(np.float64), min(k, rows.size), seed)
    got = kcenter_select(vectors, ids, eligible, k, seed=seed, first="random")
    assert set(np.flatnonzero(got)) == set(rows[sub])


def test_kcenter_random_hand_worked() -> None:
    """Points on a line at 0, 1, 3, 10 (unit length does not matter to the reference)."""
    points = np.array([[0.0, 0], [1, 0], [3, 0], [10, 0]], dtype=np.float32)
    ids = np.array(["d", "c", "b", "a"])
    first = int(np.random.RandomState(7).choice(np.arange(4)))
    chosen = kcenter_select(points, ids, np.ones(4, bool), 2, seed=7, first="random")
    farthest = {0: 3, 1: 3, 2: 3, 3: 0}[first]  # 10 is farthest from 0, 1, 3; 0 from 10
    assert set(np.flatnonzero(chosen)) == {first, farthest}
    # Equal distances go to the first row in input order (np.argmax), not to the smallest id.
    tie = np.array([[0.0, 0], [-1, 0], [1, 0]], dtype=np.float32)
    seed = next(s for s in range(100) if np.random.RandomState(s).choice(np.arange(3)) == 0)
    got = kcenter_select(tie, np.array(["z", "y", "x"]), np.ones(3, bool), 2, seed, first="random")
    assert np.flatnonzero(got).tolist() == [0, 1]


def submodlib_reference(vectors: np.ndarray, k: int) -> list[int]:
    """submodlib's FacilityLocation (dense, metric="euclidean") + LazyGreedyOptimizer, written
    from the C++: kernel exp(-||a-b|| * float(1/dim)) per pair in float32 (diagonal 1); a max-heap
    of (gain, index); the popped element is taken when its fresh gain >= the next stale bound."""
    n, dim = vectors.shape
    gamma = np.float32(1.0 / dim)
    kernel = np.ones((n, n), dtype=np.float32)
    for r in range(n):
        for c in range(r + 1, n):
            distance = np.float32(np.linalg.norm(vectors[r].astype(np.float64) - vectors[c]))
            kernel[r, c] = kernel[c, r] = np.float32(np.exp(-np.float64(distance * gamma)))
    nearest = np.zeros(n, dtype=np.float32)

    def gain(j: int) -> float:
        return float(np.sum(np.maximum(kernel[:, j].astype(np.float64) - nearest, 0.0)))

    heap = sorted(((gain(j), j) for j in range(n)), reverse=True)  # max first, larger index
    chosen: list[int] = []
    while len(chosen) < k:
        _, j = heap.pop(0)
        fresh = gain(j)
        if not heap or fresh >= heap[0][0]:
            chosen.append(j)
            nearest = np.maximum(nearest, kernel[:, j])
        else:
            heap.append((fresh, j))
            heap.sort(reverse=True)
    return chosen


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 15))
def test_facility_location_euclidean_is_submodlib(seed: int, n: int, k: int) -> None:
    vectors = clustered(seed, n, 6, 4, 0.5)
    ids = make_ids(n, seed)
    k = min(k, n)
    expected = submodlib_reference(vectors, k)
    for dense_max_rows in (4_096, 0):  # dense kernel, and columns recomputed on demand
        chosen = facility_location_select(
            vectors, ids, np.ones(n, bool), k, similarity="euclidean", dense_max_rows=dense_max_rows
        )
        assert set(np.flatnonzero(chosen)) == set(expected)


def test_facility_location_hand_worked_ties() -> None:
    """x2 = (0, 1) covers both others best; x0 = (1, 0) and x1 = (-1, 0) then gain the same.

    euclidean (submodlib): s = exp(-d / 2); initial gains x0 = x1 = 1 + e^-1 + e^(-sqrt2/2) <
    x2 = 1 + 2 e^(-sqrt2/2): x2 first. x0 and x1 both have the stale bound; the heap pops the
    larger index (x1) first, its fresh gain 1 - e^(-sqrt2/2) is below x0's stale bound, so it
    goes back; then x0 pops, its fresh gain equals x1's and `>=` takes it: the SMALLER index
    wins this tie (submodlib itself picks [2, 0] here, and [2, 1] with the rows reordered so
    that x1 comes first: checked against submodlib-py 0.0.3).
    cosine (Winnow): every column sums to 1 (cos 0 or -1 clip to 0): ties by id, a then b.
    """
    points = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ids = np.array(["a", "b", "c"])
    everyone = np.ones(3, bool)

    def picks(**options: object) -> list[int]:
        chosen = facility_location_select(points, ids, everyone, 2, **options)
        return np.flatnonzero(chosen).tolist()

    assert picks(similarity="euclidean") == [0, 2]
    assert submodlib_reference(points, 2) == [2, 0]
    assert picks(similarity="cosine") == [0, 1]
    # Sorted by score x1 (3), x2 (2), x0 (1): the reference's order is x1, x2, x0, so x1 is
    # now the smaller index and wins (submodlib on rows [x1, x2, x0] picks [x2, x1]).
    scores = np.array([1.0, 3.0, 2.0])
    assert picks(similarity="euclidean", scores=scores) == [1, 2]
    assert submodlib_reference(points[[1, 2, 0]], 2) == [1, 0]
    # The prefilter keeps the best 2 by score (x1, x2) before facility location.
    assert picks(similarity="euclidean", scores=scores, prefilter=2) == [1, 2]
    one = facility_location_select(points, ids, everyone, 1, scores=scores, prefilter=1)
    assert np.flatnonzero(one).tolist() == [1]


def test_facility_location_prefilter_skips_nan_and_keeps_the_best() -> None:
    vectors = clustered(5, 60, 8, 5, 0.5)
    ids = make_ids(60, 5)
    scores = np.random.default_rng(5).random(60)
    scores[:10] = np.nan
    scores[10] = 99.0  # the best row is in the pool
    eligible = np.ones(60, bool)
    eligible[11] = False
    for similarity in ("cosine", "euclidean"):
        chosen = facility_location_select(
            vectors, ids, eligible, 5, similarity=similarity, scores=scores, prefilter=20
        )
        pool = best_first(scores, ids, np.flatnonzero(eligible & ~np.isnan(scores)))[:20]
        assert chosen.sum() == 5 and set(np.flatnonzero(chosen)) <= set(pool)
        # The same pool without a prefilter, run on the pool alone, gives the same rows.
        alone = np.zeros(60, bool)
        alone[pool] = True
        again = facility_location_select(
            vectors, ids, alone, 5, similarity=similarity, scores=scores
        )
        assert set(np.flatnonzero(again)) == set(np.flatnonzero(chosen))


def test_submodlib_kernel_values() -> None:
    from engine.selection.diversity import submodlib_euclidean_kernel

    a = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    kernel = submodlib_euclidean_kernel(a, a)
    assert kernel.dtype == np.float32
    assert kernel[0, 0] == 1.0 and kernel[1, 1] == 1.0
    assert kernel[0, 1] == np.float32(np.exp(-np.sqrt(2.0) * np.float32(1 / 3)))


def test_deita_threshold_defaults_follow_the_backend() -> None:
    from engine.selection.diversity import DEITA_THRESHOLDS, deita_threshold

    assert deita_threshold(None, "causal_lm") == 0.9  # DEITA's own, in an LLM's space
    assert (
        deita_threshold(None, "sentence_transformers") == DEITA_THRESHOLDS["sentence_transformers"]
    )
    assert deita_threshold(0.8, "sentence_transformers") == 0.8
