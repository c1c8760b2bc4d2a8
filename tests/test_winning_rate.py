"""The winning-rate arithmetic: the rule table, hand-worked rates, and its properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.evaluation import (
    Outcome,
    WinningRate,
    alpacaeval_rate,
    bootstrap_interval,
    fastchat_rate,
    outcome,
    winning_rate,
    winning_rates_by_set,
)

# Model 1 wins, ties or loses an order by scoring above, equal to or below model 2.
WIN, TIE, LOSE = (8, 6), (7, 7), (5, 9)


@pytest.mark.parametrize(
    ("first", "swapped", "expected"),
    [
        (WIN, WIN, Outcome.WIN),
        (WIN, TIE, Outcome.WIN),
        (TIE, WIN, Outcome.WIN),
        (WIN, LOSE, Outcome.TIE),
        (LOSE, WIN, Outcome.TIE),
        (TIE, TIE, Outcome.TIE),
        (LOSE, LOSE, Outcome.LOSS),
        (LOSE, TIE, Outcome.LOSS),
        (TIE, LOSE, Outcome.LOSS),
    ],
)
def test_the_rule_table_of_shared_data_readme(first, swapped, expected) -> None:
    assert outcome((*first, *swapped)) is expected


def test_a_missing_score_is_unparsed_never_a_tie() -> None:
    assert outcome((8, None, 7, 7)) is Outcome.UNPARSED
    assert outcome((8, 6, math.nan, 7)) is Outcome.UNPARSED
    result = winning_rate([(8, 6, 8, 6), (None, None, None, None), (7, 7, 7, 7)])
    assert (result.wins, result.ties, result.losses, result.unparsed) == (1, 1, 0, 1)
    assert result.rate == pytest.approx((1 - 0) / 2 + 1)


def test_hand_worked_rates() -> None:
    # 3 wins, 1 tie, 1 loss: (3 - 1) / 5 + 1 = 1.4
    judgements = [
        (*WIN, *WIN),
        (*WIN, *TIE),
        (*TIE, *WIN),
        (*TIE, *TIE),
        (*LOSE, *LOSE),
    ]
    result = winning_rate(judgements)
    assert (result.wins, result.ties, result.losses) == (3, 1, 1)
    assert result.rate == pytest.approx(1.4)
    assert winning_rate([]).rate != winning_rate([]).rate  # NaN: nothing judged
    assert winning_rate([(*LOSE, *LOSE)] * 4).rate == 0.0
    assert winning_rate([(*WIN, *WIN)] * 4).rate == 2.0


def test_pooled_counts_add_over_sets_before_the_rate() -> None:
    sets = {
        "vicuna": [(*WIN, *WIN)] * 3,  # rate 2.0 on 3 prompts
        "koala": [(*LOSE, *LOSE)] * 1 + [(*TIE, *TIE)] * 6,  # rate 6/7 on 7 prompts
    }
    per_set, pooled = winning_rates_by_set(sets)
    assert per_set["vicuna"].rate == 2.0
    assert per_set["koala"].rate == pytest.approx(1 - 1 / 7)
    assert (pooled.wins, pooled.ties, pooled.losses) == (3, 6, 1)
    assert pooled.rate == pytest.approx((3 - 1) / 10 + 1)  # not the mean of 2.0 and 0.857


scores = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False), st.integers(1, 10))
judgements = st.lists(st.tuples(scores, scores, scores, scores), max_size=60)


def _mirror(j: tuple) -> tuple:
    """The same two judge calls seen with model 2 as model 1."""
    s1, s2, s1_swapped, s2_swapped = j
    return (s2_swapped, s1_swapped, s2, s1)


@given(judgements)
def test_swapping_the_models_gives_two_minus_the_rate(js: list) -> None:
    forward, backward = winning_rate(js), winning_rate([_mirror(j) for j in js])
    assert (backward.wins, backward.ties, backward.losses) == (
        forward.losses,
        forward.ties,
        forward.wins,
    )
    assert backward.unparsed == forward.unparsed
    if forward.judged:
        assert backward.rate == pytest.approx(2 - forward.rate)


@given(judgements)
def test_every_judgement_is_counted_once(js: list) -> None:
    result = winning_rate(js)
    assert result.judged + result.unparsed == len(js)
    if result.judged:
        assert 0 <= result.rate <= 2


def test_bootstrap_interval_brackets_the_rate_and_is_seeded() -> None:
    sets = {
        "a": [(*WIN, *WIN)] * 30 + [(*TIE, *TIE)] * 20 + [(*LOSE, *LOSE)] * 10,
        "b": [(*WIN, *TIE)] * 5 + [(*LOSE, *TIE)] * 15 + [(None, 1, 1, 1)] * 3,
    }
    _, pooled = winning_rates_by_set(sets)
    low, high = bootstrap_interval(sets, resamples=4000, seed=1)
    assert low < pooled.rate < high
    assert low >= 0 and high <= 2
    assert (low, high) == bootstrap_interval(sets, resamples=4000, seed=1)
    narrow = bootstrap_interval({k: v * 10 for k, v in sets.items()}, resamples=4000, seed=1)
    assert narrow[1] - narrow[0] < (high - low) / 2  # 10x the prompts: about 1/sqrt(10) wide
    assert all(map(math.isnan, bootstrap_interval({"a": [(None, 1, 1, 1)]})))
    # All wins: no spread at all.
    assert bootstrap_interval({"a": [(*WIN, *WIN)] * 5}) == (2.0, 2.0)


def test_winning_rate_as_dict_round_trips() -> None:
    result = WinningRate(2, 1, 1, 3)
    assert result.as_dict() == {"wins": 2, "ties": 1, "losses": 1, "unparsed": 3, "rate": 1.25}


# FastChat's and AlpacaEval's rates over the same judgements.


@pytest.mark.parametrize(
    ("first", "swapped", "expected"),
    [
        (WIN, WIN, "win"),
        (LOSE, LOSE, "loss"),
        # FastChat: a tie in the first game, or two games that disagree, is a tie.
        (WIN, TIE, "tie"),
        (TIE, WIN, "tie"),
        (WIN, LOSE, "tie"),
        (LOSE, WIN, "tie"),
        (TIE, TIE, "tie"),
        (LOSE, TIE, "tie"),
        (TIE, LOSE, "tie"),
    ],
)
def test_fastchat_rule_table(first, swapped, expected) -> None:
    result = fastchat_rate([(*first, *swapped)])
    counts = {"win": result.wins, "tie": result.ties, "loss": result.losses}
    assert counts == {k: int(k == expected) for k in counts}


def test_hand_worked_fastchat_and_alpacaeval_rates() -> None:
    judgements = [
        (*WIN, *WIN),  # FastChat win;  AlpacaEval win, win
        (*WIN, *TIE),  # FastChat tie;  AlpacaEval win, tie
        (*TIE, *TIE),  # FastChat tie;  AlpacaEval tie, tie
        (*LOSE, *LOSE),  # FastChat loss; AlpacaEval loss, loss
        (None, 3, *WIN),  # FastChat drops the prompt; AlpacaEval drops one annotation: win
    ]
    fc = fastchat_rate(judgements)
    assert (fc.wins, fc.ties, fc.losses, fc.unparsed) == (1, 2, 1, 1)
    assert fc.win_rate == pytest.approx(1 / 4)
    assert fc.rate == pytest.approx((1 + 2 / 2) / 4)  # FastChat's win_rate_adjusted
    ae = alpacaeval_rate(judgements)
    assert (ae.wins, ae.ties, ae.losses, ae.unparsed) == (4, 3, 2, 1)
    assert ae.rate == pytest.approx((4 + 3 / 2) / 9)
    values = [1.0] * 4 + [0.5] * 3 + [0.0] * 2  # preference - 1, as AlpacaEval averages it
    mean = sum(values) / 9
    sem = math.sqrt(sum((v - mean) ** 2 for v in values) / 8) / 3
    assert ae.standard_error == pytest.approx(sem)
    assert fc.as_dict()["rate"] == fc.rate and ae.as_dict()["standard_error"] == sem
    assert math.isnan(fastchat_rate([]).rate) and math.isnan(alpacaeval_rate([(None,) * 4]).rate)
    assert math.isnan(alpacaeval_rate([(*WIN, None, 1)]).standard_error)  # one annotation


@given(judgements)
def test_fastchat_and_alpacaeval_mirror_and_count_everything(js: list) -> None:
    fc, fc_back = fastchat_rate(js), fastchat_rate([_mirror(j) for j in js])
    ae, ae_back = alpacaeval_rate(js), alpacaeval_rate([_mirror(j) for j in js])
    assert fc.judged + fc.unparsed == len(js)
    assert ae.judged + ae.unparsed == 2 * len(js)
    for forward, backward in ((fc, fc_back), (ae, ae_back)):
        assert (backward.wins, backward.ties, backward.losses, backward.unparsed) == (
            forward.losses,
            forward.ties,
            forward.wins,
            forward.unparsed,
        )
        if forward.judged:
            assert 0 <= forward.rate <= 1
            assert backward.rate == pytest.approx(1 - forward.rate)
    # A prompt FastChat can read is one the papers' rule can read, and vice versa.
    assert fc.unparsed == winning_rate(js).unparsed
    # FastChat never counts more wins than the papers' rule (win + tie is a tie there).
    assert fc.wins <= winning_rate(js).wins
