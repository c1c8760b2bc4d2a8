"""Per-group budgets (proportional, capped, min share), selection within groups, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.selection.budget import rank_select
from engine.selection.diversity import deita_select
from engine.selection.normalize import normalize_within
from engine.selection.quotas import allocate, select_with_quotas

group_sizes = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3), st.integers(0, 300), min_size=1, max_size=8
)


def test_proportional_uses_largest_remainder_with_ties_by_name() -> None:
    assert allocate({"a": 100, "b": 10, "c": 1}, 50) == {"a": 45, "b": 5, "c": 0}
    # 3 equal groups, 4 rows: the extra row goes to the first name.
    assert allocate({"y": 5, "x": 5, "z": 5}, 4) == {"x": 2, "y": 1, "z": 1}
    assert allocate({"a": 3, "b": 2}, 100) == {"a": 3, "b": 2}


def test_capped_water_fills_and_stops_at_what_caps_allow() -> None:
    assert allocate({"a": 100, "b": 10, "c": 1}, 50, "capped", cap=0.5) == {
        "a": 25,
        "b": 10,
        "c": 1,
    }
    # a is capped at 20; the freed budget goes to b and c in proportion to their sizes.
    assert allocate({"a": 1000, "b": 300, "c": 100}, 60, "capped", cap=20) == {
        "a": 20,
        "b": 20,
        "c": 20,
    }
    assert allocate({"a": 1000, "b": 30, "c": 10}, 100, "capped", cap=40) == {
        "a": 40,
        "b": 30,
        "c": 10,
    }
    assert allocate({"a": 10, "b": 10}, 5, "capped", cap=0) == {"a": 0, "b": 0}


def test_min_share_floors_then_proportional_and_scales_down() -> None:
    assert allocate({"a": 1000, "b": 50, "c": 2}, 100, "min_share", min_share=0.1) == {
        "a": 84,
        "b": 14,
        "c": 2,
    }
    # Floors of 60 each exceed the budget of 100: scaled down fairly.
    assert allocate({"a": 500, "b": 500}, 100, "min_share", min_share=0.6) == {"a": 50, "b": 50}


def test_bad_mode_and_missing_parameters_raise() -> None:
    with pytest.raises(ValueError):
        allocate({"a": 1}, 1, "weird")
    with pytest.raises(ValueError):
        allocate({"a": 1}, 1, "capped")
    with pytest.raises(ValueError):
        allocate({"a": 1}, 1, "min_share")


@settings(max_examples=300, deadline=None)
@given(group_sizes, st.integers(0, 1_500))
def test_proportional_properties(sizes: dict[str, int], k: int) -> None:
    budgets = allocate(sizes, k)
    total = sum(sizes.values())
    assert sum(budgets.values()) == min(k, total)
    for group, size in sizes.items():
        assert 0 <= budgets[group] <= size
        if k <= total and total:
            share = k * size / total
            assert math.floor(share) <= budgets[group] <= math.ceil(share)


@settings(max_examples=300, deadline=None)
@given(group_sizes, st.integers(0, 1_500), st.one_of(st.integers(0, 400), st.floats(0.01, 1.0)))
def test_capped_properties(sizes: dict[str, int], k: int, cap: int | float) -> None:
    budgets = allocate(sizes, k, "capped", cap=cap)
    cap_rows = math.floor(cap * k + 1e-9) if isinstance(cap, float) else cap
    achievable = min(k, sum(min(size, cap_rows) for size in sizes.values()))
    assert sum(budgets.values()) == achievable
    for group, size in sizes.items():
        assert 0 <= budgets[group] <= min(size, cap_rows)
    # Water-filling: a group below both its cap and its size is never starved relative to a
    # smaller group (budgets with room left follow size order).
    free = [g for g in sizes if budgets[g] < min(sizes[g], cap_rows)]
    for a in free:
        for b in sizes:
            if sizes[a] > sizes[b]:
                assert budgets[a] >= budgets[b] - 1


@settings(max_examples=300, deadline=None)
@given(group_sizes, st.integers(0, 1_500), st.floats(0.01, 1.0))
def test_min_share_properties(sizes: dict[str, int], k: int, share: float) -> None:
    budgets = allocate(sizes, k, "min_share", min_share=share)
    total = min(k, sum(sizes.values()))
    assert sum(budgets.values()) == total
    floors = {g: min(s, math.ceil(share * k - 1e-9)) for g, s in sizes.items()}
    for group, size in sizes.items():
        assert 0 <= budgets[group] <= size
        if sum(floors.values()) <= total:
            assert budgets[group] >= floors[group]
        else:  # scaled down fairly: within one row of the proportional share of the floors
            fair = total * floors[group] / sum(floors.values())
            assert math.floor(fair) <= budgets[group] <= math.ceil(fair)


def test_select_with_quotas_budgets_each_group_in_sorted_order() -> None:
    groups = np.array(["en"] * 6 + ["de"] * 3 + [None] * 2, dtype=object)
    scores = np.arange(11, dtype=np.float64)
    ids = np.array([f"r{i:02d}" for i in range(11)])
    eligible = np.ones(11, dtype=bool)
    eligible[0] = False
    calls: list[tuple[list[int], int]] = []

    def top(mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((np.flatnonzero(mask).tolist(), k))
        return rank_select(scores, ids, mask, k), np.zeros(len(mask), dtype=bool)

    selected, flagged = select_with_quotas(groups, eligible, 5, "proportional", None, None, top)
    # Eligible sizes en 5, de 3, None 2; 5 rows -> shares 2.5 / 1.5 / 1.0: en and de tie on the
    # remainder, "de" sorts first and gets the extra row. Calls go "None", "de", "en".
    assert [k for _, k in calls] == [1, 2, 2]
    assert [rows for rows, _ in calls] == [[9, 10], [6, 7, 8], [1, 2, 3, 4, 5]]
    assert np.flatnonzero(selected).tolist() == [4, 5, 7, 8, 10]
    assert not flagged.any()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1_000), st.integers(1, 80), st.integers(0, 90))
def test_select_with_quotas_with_deita_never_exceeds_budgets(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = rng.choice(np.array(["x", "y", "z"]), n)
    ids = np.array([f"id{i}" for i in range(n)])
    scores = rng.random(n)
    eligible = rng.random(n) < 0.9

    def diverse(mask: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
        return deita_select(vectors, scores, ids, mask, budget, 0.8)

    selected, flagged = select_with_quotas(groups, eligible, k, "capped", 0.5, None, diverse)
    names, sizes = np.unique(groups[eligible], return_counts=True)
    budgets = allocate(dict(zip(names, sizes.tolist(), strict=True)), k, "capped", cap=0.5)
    assert not ((selected | flagged) & ~eligible).any()
    assert not (selected & flagged).any()
    for name, budget in budgets.items():
        assert (selected & (groups == name)).sum() <= budget
    assert selected.sum() <= k


def test_normalize_rank_percentiles_with_ties_nan_and_singletons() -> None:
    values = np.array([1.0, 2.0, 2.0, 3.0, np.nan, 5.0, 7.0, np.nan])
    groups = np.array(["a", "a", "a", "a", "a", "b", None, None], dtype=object)
    ranked = normalize_within(values, groups, "rank")
    expected = [0.0, 0.5, 0.5, 1.0, np.nan, 1.0, 1.0, np.nan]
    np.testing.assert_array_equal(ranked, expected)


def test_normalize_zscore_population_std_and_constant_groups() -> None:
    values = np.array([1.0, 2.0, 3.0, np.nan, 4.0, 4.0])
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    z = normalize_within(values, groups, "zscore")
    np.testing.assert_allclose(z[:3], [-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert np.isnan(z[3])
    assert z[4:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        normalize_within(values, groups, "minmax")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["en", "de", "fr"]), st.one_of(st.none(), st.integers(-5, 5))),
        min_size=1,
        max_size=60,
    )
)
def test_normalize_properties(rows: list[tuple[str, int | None]]) -> None:
    groups = np.array([g for g, _ in rows])
    values = np.array([np.nan if v is None else float(v) for _, v in rows])
    ranked = normalize_within(values, groups, "rank")
    z = normalize_within(values, groups, "zscore")
    assert np.array_equal(np.isnan(ranked), np.isnan(values))
    assert np.array_equal(np.isnan(z), np.isnan(values))
    for name in set(groups.tolist()):
        inside = (groups == name) & ~np.isnan(values)
        if not inside.any():
            continue
        r, x, zz = ranked[inside], values[inside], z[inside]
        assert ((r >= 0) & (r <= 1)).all()
        # Order-preserving within the group, equal values equal ranks.
        for i in range(len(x)):
            for j in range(len(x)):
                if x[i] < x[j]:
                    assert r[i] < r[j] and zz[i] < zz[j]
                if x[i] == x[j]:
                    assert r[i] == r[j] and zz[i] == zz[j]
        assert abs(zz.mean()) < 1e-9
    # Rows of other groups do not move a group's normalised values.
    only_en = groups == "en"
    if only_en.any():
        alone = normalize_within(values[only_en], groups[only_en], "rank")
        np.testing.assert_array_equal(alone, ranked[only_en])
