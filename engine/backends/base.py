"""The interfaces backends implement, one per kind, and the one way every backend is closed.

Kinds (each a `Protocol` with `name` and `close()`; the factories in `engine.backends` return
them):
  TokenScorer    per-token NLL of the scored positions (LM scoring: perplexity, IFD)
  JudgeBackend   judge replies with score-token log-probabilities (LLM judges)
  Embedder       L2-normalised float32 sentence embeddings
  Generator      greedy replies to chat prompts or raw strings (evaluation)

Scorers never tokenize or template: `engine.signals.lm` builds the token-id sequences, so every
scorer scores exactly the same tokens and their numbers can be compared one to one. Judges and
generators take chat message lists and render them with the model's chat template
(`engine.backends.chat`); both also take `RawPrompt`s, strings fed without a template.

`Closable` is the base class of every backend: `close()` is idempotent and runs the backend's
`_release()` hook once; a closed backend raises `RuntimeError("the <name> backend is closed")`
from `_check_open()`; backends are context managers and close quietly when collected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

import numpy as np

if TYPE_CHECKING:
    from engine.signals.lm import ScoredSequence


class Closable:
    """Base class of every backend: one idempotent `close()`, one check for "closed".

    Subclasses set `name`, free what they hold in `_release()` (called at most once, also after
    a constructor that failed half-way, so it must tolerate missing attributes) and call
    `_check_open()` at the top of every public method that needs the model.
    """

    name: str = "backend"
    _closed: bool = False  # a class default: __del__ after a failed __init__ still works

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the model (or client); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:
        """Free what the backend holds (model, engine, client). Runs once."""

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.name} backend is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No module globals here (contextlib, logging): at interpreter exit they may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


class TokenScorer(Protocol):
    """Holds one model; returns, per sequence, the NLL (natural log, float64) of each token at
    positions `score_from .. len-1`, each given every token before it."""

    name: str

    def token_nll(self, sequences: Sequence[ScoredSequence]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RawPrompt:
    """A prompt that is one string, fed to the model without any chat template: the backend
    tokenises it with `tokenizer.encode(text)` (the tokenizer's own special tokens, e.g. Llama's
    BOS), as DEITA's scorers do with the template they were fine-tuned on. `special_tokens`
    False: none added (the evaluation arms' prompts, tokenised as they were trained on)."""

    text: str
    special_tokens: bool = True


# A judge or generator prompt: chat messages (rendered with the model's chat template) or a raw
# string (`RawPrompt`).
Prompt = list[dict[str, str]] | RawPrompt


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
    """Holds one judge model (or a client of a served one); prompts are built by
    engine.signals.judge, never corpus text alone: chat message lists, or `RawPrompt`s (a
    backend that cannot feed a raw string, e.g. a chat endpoint, raises TypeError for one).

    With `score_tokens` the reply carries their log-probabilities at the first generated
    position (a backend that holds the model raises ValueError when one of them is not a single
    token of its vocabulary, rather than scoring without it); with none it generates the reply
    (up to its `max_new_tokens`) to be parsed."""

    name: str

    def judge(self, prompts: Sequence[Prompt], score_tokens: Sequence[str]) -> list[JudgeReply]: ...

    def close(self) -> None: ...


class Embedder(Protocol):
    """Holds one sentence-embedding model: texts in, an (n, dim) float32 matrix of unit-length
    rows out (a dot product is the cosine similarity); an empty text still gets its vector."""

    name: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def close(self) -> None: ...


class Generator(Protocol):
    """Holds one chat model: the greedy reply (temperature 0, up to the backend's
    `max_new_tokens`, stopping at EOS, special tokens removed) to each prompt (chat messages,
    or a `RawPrompt` such as an Alpaca-template string), in order. A prompt longer than the
    backend's `max_length` tokens gets the empty string. `generate_counted` also gives each
    reply's generated token count (a final EOS not counted): the answer length the evaluation
    reports."""

    name: str

    def generate(self, prompts: Sequence[Prompt]) -> list[str]: ...

    def generate_counted(self, prompts: Sequence[Prompt]) -> list[tuple[str, int]]: ...

    def close(self) -> None: ...


class RewardModel(Protocol):
    """Holds one reward model: (instruction, response) pairs in, one float64 reward per pair."""

    name: str

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray: ...

    def close(self) -> None: ...
