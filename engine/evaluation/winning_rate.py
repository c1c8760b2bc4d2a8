"""The pairwise "winning rate" of the instruction-data-selection literature (AlpaGasus, Cherry LLM,
Superfiltering), as `../shared/data/README.md` states it.

Each test prompt's two answers (model 1's and model 2's) are judged twice, the second time with
their order swapped. A judgement is `(s1, s2, s1_swapped, s2_swapped)`: model 1's and model 2's
scores in the first order, then model 1's and model 2's scores when shown in swapped order. Each
order gives model 1 a win, tie or loss; the pair of them decides the prompt:
  win+win, win+tie, tie+win     -> win
  win+lose, lose+win, tie+tie   -> tie
  anything else                 -> loss
winning rate = (wins - losses) / (wins + ties + losses) + 1, in [0, 2]; 1 means "as good".

A judgement with a missing score (None or NaN: the judge's verdict could not be read) is counted
as `unparsed` and left out of the rate, never taken for a tie.

Swapping the models turns each judgement `(a, b, c, d)` into `(d, c, b, a)`, wins into losses, and
the rate into 2 - rate (tested as a property).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

Judgement = tuple[float | None, float | None, float | None, float | None]


class Outcome(StrEnum):
    WIN = "win"
    TIE = "tie"
    LOSS = "loss"
    UNPARSED = "unparsed"


_WIN_PAIRS = {("win", "win"), ("win", "tie"), ("tie", "win")}
_TIE_PAIRS = {("win", "lose"), ("lose", "win"), ("tie", "tie")}


def _order(first: float, second: float) -> str:
    """Model 1's result in one order: its score against model 2's."""
    if first > second:
        return "win"
    if first == second:
        return "tie"
    return "lose"


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def outcome(judgement: Judgement) -> Outcome:
    """Model 1's outcome on one prompt (see the module docstring)."""
    if any(_missing(v) for v in judgement):
        return Outcome.UNPARSED
    s1, s2, s1_swapped, s2_swapped = (float(v) for v in judgement)  # type: ignore[arg-type]
    pair = (_order(s1, s2), _order(s1_swapped, s2_swapped))
    if pair in _WIN_PAIRS:
        return Outcome.WIN
    if pair in _TIE_PAIRS:
        return Outcome.TIE
    return Outcome.LOSS


@dataclass(frozen=True)
class _Counts:
    """Model 1's wins, ties and losses over the judged prompts, and the unreadable ones."""

    wins: int
    ties: int
    losses: int
    unparsed: int = 0

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses


@dataclass(frozen=True)
class WinningRate(_Counts):
    """Counts of model 1's outcomes and the winning rate over the parsed ones (NaN if none)."""

    @property
    def rate(self) -> float:
        if not self.judged:
            return math.nan
        return (self.wins - self.losses) / self.judged + 1

    def __add__(self, other: WinningRate) -> WinningRate:
        return WinningRate(
            self.wins + other.wins,
            self.ties + other.ties,
            self.losses + other.losses,
            self.unparsed + other.unparsed,
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "unparsed": self.unparsed,
            "rate": self.rate,
        }


def _count(outcomes: Iterable[Outcome]) -> WinningRate:
    counts = dict.fromkeys(Outcome, 0)
    for o in outcomes:
        counts[o] += 1
    return WinningRate(
        counts[Outcome.WIN], counts[Outcome.TIE], counts[Outcome.LOSS], counts[Outcome.UNPARSED]
    )


def winning_rate(judgements: Iterable[Judgement]) -> WinningRate:
    """Wins, ties, losses (and unparsed) of model 1 over `judgements`, and its winning rate."""
    return _count(outcome(j) for j in judgements)


def winning_rates_by_set(
    judgements: Mapping[str, Sequence[Judgement]],
) -> tuple[dict[str, WinningRate], WinningRate]:
    """Per evaluation set, and pooled: the counts are added over the sets, then the rate is taken
    (as the papers report it), not an average of the per-set rates."""
    per_set = {name: winning_rate(js) for name, js in judgements.items()}
    pooled = sum(per_set.values(), WinningRate(0, 0, 0, 0))
    return per_set, pooled


def bootstrap_interval(
    judgements: Mapping[str, Sequence[Judgement]],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled winning rate: prompts resampled with
    replacement within each set (so every set keeps its size and weight); unparsed judgements
    stay out, as in the rate. NaN bounds when nothing was judged."""
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    rng = np.random.default_rng(seed)
    # +1 win, 0 tie, -1 loss per judged prompt; the rate of a sample is mean + 1.
    values = {
        name: np.array(
            [
                {Outcome.WIN: 1.0, Outcome.TIE: 0.0, Outcome.LOSS: -1.0}[o]
                for o in map(outcome, js)
                if o is not Outcome.UNPARSED
            ]
        )
        for name, js in judgements.items()
    }
    values = {name: v for name, v in values.items() if len(v)}
    if not values:
        return math.nan, math.nan
    total = sum(len(v) for v in values.values())
    sums = np.zeros(resamples)
    for v in values.values():
        picks = rng.integers(0, len(v), size=(resamples, len(v)))
        sums += v[picks].sum(axis=1)
    rates = sums / total + 1
    tail = (1 - level) / 2
    low, high = np.quantile(rates, [tail, 1 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# The rates other papers report, over the same two-order judgements (shown beside the winning
# rate; the winning rate above is the one the selection papers compare).


def _verdict(first: float | None, second: float | None) -> str | None:
    """Who one judge call preferred: "model_1", "model_2", "tie", or None (unreadable)."""
    if _missing(first) or _missing(second):
        return None
    a, b = float(first), float(second)  # type: ignore[arg-type]
    if a > b:
        return "model_1"
    if a < b:
        return "model_2"
    return "tie"


@dataclass(frozen=True)
class FastChatRate(_Counts):
    """FastChat's pairwise result for model 1 (lm-sys/FastChat `fastchat/llm_judge/
    show_result.py`, `display_result_pairwise`): per prompt one win, tie or loss; a prompt with
    an unreadable verdict in either order ("error") is dropped (counted here as `unparsed`).

    `win_rate` = wins / judged; `rate` = FastChat's `win_rate_adjusted` = (wins + ties / 2) /
    judged, in [0, 1] (0.5 means "as good")."""

    @property
    def win_rate(self) -> float:
        return self.wins / self.judged if self.judged else math.nan

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "unparsed": self.unparsed,
            "win_rate": self.win_rate,
            "rate": self.rate,
        }


def fastchat_rate(judgements: Iterable[Judgement]) -> FastChatRate:
    """Model 1's FastChat counts over two-order judgements.

    FastChat's rule (`display_result_pairwise`): a prompt is a tie when the first game is a
    tie or the two games disagree (`g1_winner == "tie" or g1_winner != g2_winner`), else the
    consistent winner wins. Differences from the selection papers' rule (`outcome`): a win in
    one order and a tie in the other is a tie here (a win there); win + loss is a tie in both.
    FastChat's verdicts are [[A]]/[[B]]/[[C]]; scored judgements (Cherry's two scores) are
    read as a verdict per order by which score is higher (equal: tie)."""
    wins = ties = losses = unparsed = 0
    for s1, s2, s1_swapped, s2_swapped in judgements:
        g1, g2 = _verdict(s1, s2), _verdict(s1_swapped, s2_swapped)
        if g1 is None or g2 is None:
            unparsed += 1
        elif g1 == "tie" or g1 != g2:
            ties += 1
        elif g1 == "model_1":
            wins += 1
        else:
            losses += 1
    return FastChatRate(wins, ties, losses, unparsed)


@dataclass(frozen=True)
class AlpacaEvalRate:
    """AlpacaEval's head-to-head win rate of model 1 (tatsu-lab/alpaca_eval `src/alpaca_eval/
    metrics/winrate.py` `get_winrate` -> `metrics/helpers.py` `describe_head2head`): every
    judge call is one annotation, preference 2 (model 1 preferred), 1 (model 2) or 1.5 (draw);
    annotations that are not a preference are dropped (here `unparsed`).

    `rate` = mean(preference - 1) = (wins + ties / 2) / judged, in [0, 1] (AlpacaEval prints
    it x 100); `standard_error` is the sample standard error of that mean (pandas `sem`, ddof
    1), NaN below two annotations. The counts are of annotations (two per prompt), not prompts."""

    wins: int
    ties: int
    losses: int
    unparsed: int = 0

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else math.nan

    @property
    def standard_error(self) -> float:
        n = self.judged
        if n < 2:
            return math.nan
        mean = self.rate
        squares = (
            self.wins * (1 - mean) ** 2 + self.ties * (0.5 - mean) ** 2 + self.losses * mean**2
        )
        return math.sqrt(squares / (n - 1)) / math.sqrt(n)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "unparsed": self.unparsed,
            "rate": self.rate,
            "standard_error": self.standard_error,
        }


def alpacaeval_rate(judgements: Iterable[Judgement]) -> AlpacaEvalRate:
    """Model 1's AlpacaEval win rate over two-order judgements.

    AlpacaEval judges each pair once, in a random order, and averages the preferences; here
    both orders are annotations of their own (a consistent judge gives the same verdict twice,
    a position-biased one splits its vote). Differences from the selection papers' rule: no
    per-prompt combination of the two orders (win + tie is 1.5 wins of 2, not one win), and an
    unreadable order drops that annotation only, not the prompt."""
    wins = ties = losses = unparsed = 0
    for s1, s2, s1_swapped, s2_swapped in judgements:
        for verdict in (_verdict(s1, s2), _verdict(s1_swapped, s2_swapped)):
            if verdict is None:
                unparsed += 1
            elif verdict == "model_1":
                wins += 1
            elif verdict == "model_2":
                losses += 1
            else:
                ties += 1
    return AlpacaEvalRate(wins, ties, losses, unparsed)
