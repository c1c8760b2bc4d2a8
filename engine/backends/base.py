"""The interface every LM backend implements: per-token NLL of scored positions.

Backends never tokenize or template: `engine.signals.lm` builds the token-id sequences, so every
backend scores exactly the same tokens and their numbers can be compared one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from engine.signals.lm import ScoredSequence


class TokenScorer(Protocol):
    """Holds one model; returns, per sequence, the NLL (natural log, float64) of each token at
    positions `score_from .. len-1`, each given every token before it."""

    name: str

    def token_nll(self, sequences: Sequence[ScoredSequence]) -> list[np.ndarray]: ...

    def close(self) -> None: ...
