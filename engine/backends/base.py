"""The interfaces backends implement: per-token NLL of scored positions (LM scoring), and judge
replies with score-token log-probabilities (LLM judges).

Backends never tokenize or template: `engine.signals.lm` builds the token-id sequences, so every
backend scores exactly the same tokens and their numbers can be compared one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.signals.lm import ScoredSequence


class TokenScorer(Protocol):
    """Holds one model; returns, per sequence, the NLL (natural log, float64) of each token at
    positions `score_from .. len-1`, each given every token before it."""

    name: str

    def token_nll(self, sequences: Sequence[ScoredSequence]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class JudgeReply:
    """What a judge backend returns for one prompt.

    `text` is the generated reply (possibly empty). `score_logprobs` maps each scale token the
    backend could see (e.g. "1".."6") to its log-probability at the first generated position, or
    is None when the backend gives no log-probabilities (then the text is parsed).
    """

    text: str
    score_logprobs: dict[str, float] | None = None


class JudgeBackend(Protocol):
    """Holds one judge model (or a client of a served one); prompts are finished chat strings or
    message lists built by engine.signals.judge, never corpus text alone."""

    name: str

    def judge(
        self, prompts: Sequence[list[dict[str, str]]], score_tokens: Sequence[str]
    ) -> list[JudgeReply]: ...

    def close(self) -> None: ...
