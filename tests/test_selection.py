"""Selection v0: budgets, rankings, seeded random draws and filter rules (pure functions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.selection.budget import random_select, rank_select, resolve_budget
from engine.selection.filters import Rule, RuleError, first_matching_reason


def test_budget_rows_and_fractions() -> None:
    assert resolve_budget(None, 40) == 40
    assert resolve_budget(500, 40) == 40
    assert resolve_budget(10, 40) == 10
    assert resolve_budget(0.1, 45) == 4
    assert resolve_budget(0.3, 10) == 3  # no float drift: 0.3 * 10 = 2.9999999999999996
    assert resolve_budget(1.0, 45) == 45


def test_rank_select_breaks_ties_by_id_and_puts_nan_last() -> None:
    ids = np.array(["d", "c", "b", "a", "e"])
    scores = np.array([5.0, 7.0, 5.0, np.nan, 5.0])
    eligible = np.array([True, True, True, True, True])
    chosen = rank_select(scores, ids, eligible, 3)
    assert set(ids[chosen]) == {"c", "b", "d"}
    assert set(ids[rank_select(scores, ids, eligible, 5)]) == set(ids)
    ascending = rank_select(scores, ids, eligible, 2, descending=False)
    assert set(ids[ascending]) == {"b", "d"}


def test_rank_select_only_takes_eligible_rows() -> None:
    ids = np.array(["a", "b", "c"])
    chosen = rank_select(np.array([9.0, 1.0, 2.0]), ids, np.array([False, True, True]), 1)
    assert ids[chosen].tolist() == ["c"]


def test_random_select_is_seeded_and_order_independent() -> None:
    ids = np.array([f"id{i:04d}" for i in range(1000)])
    eligible = np.ones(1000, dtype=bool)
    eligible[::7] = False
    first = set(ids[random_select(ids, eligible, 100, seed=3, salt="s")])
    perm = np.random.default_rng(0).permutation(1000)
    second = set(ids[perm][random_select(ids[perm], eligible[perm], 100, seed=3, salt="s")])
    other_seed = set(ids[random_select(ids, eligible, 100, seed=4, salt="s")])
    other_salt = set(ids[random_select(ids, eligible, 100, seed=3, salt="t")])
    assert first == second and len(first) == 100
    assert first != other_seed and first != other_salt
    assert not first & set(ids[~eligible])


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(allow_nan=True, allow_infinity=False, width=32), max_size=60),
    k=st.integers(min_value=0, max_value=80),
    data=st.data(),
)
def test_never_over_budget_and_only_eligible(scores: list[float], k: int, data) -> None:
    n = len(scores)
    ids = np.array([f"r{i}" for i in range(n)])
    eligible = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    for mask in (
        rank_select(np.array(scores), ids, eligible, k),
        random_select(ids, eligible, k, seed=1, salt="x"),
    ):
        assert mask.sum() == min(k, eligible.sum())
        assert not (mask & ~eligible).any()


def test_rules_parse_and_first_match_wins() -> None:
    frame = pd.DataFrame(
        {
            "empty_response": [True, False, False, False],
            "assistant_words": [0, 2, 50, np.nan],
            "refusal": [False, False, True, False],
        }
    )
    rules = [
        Rule.parse("empty_response == true", "empty_response"),
        Rule.parse("assistant_words < 3", "too_short"),
        Rule.parse("refusal == true", "refusal"),
    ]
    reasons = first_matching_reason(frame, rules)
    assert reasons.tolist() == ["empty_response", "too_short", "refusal", None]


@pytest.mark.parametrize("bad", ["assistant_words", "x ~ 3", "x < banana", "< 3"])
def test_bad_rules_are_refused(bad: str) -> None:
    with pytest.raises(RuleError):
        Rule.parse(bad, "r")
