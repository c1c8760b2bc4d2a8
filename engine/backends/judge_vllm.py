"""vLLM judge backend: every prompt in one `LLM.generate` call, score-token log-probabilities of
the first generated position.

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`) into token
ids and submitted together with `SamplingParams(temperature=0, max_tokens=..., logprob_token_ids=
<the scale tokens' ids>)`. `logprob_token_ids` (vLLM >= 0.32) returns the log-probability of
exactly those ids at each generated position, so no scale token is ever missing, unlike
`logprobs=20` where a token outside the top 20 would have to count as probability 0. They are the
engine's default `logprobs_mode="raw_logprobs"`: a log-softmax of the model's logits over the
whole vocabulary before temperature, penalties or `allowed_token_ids` masking, which is the same
quantity the transformers backend computes. (With `processed_logprobs` plus `allowed_token_ids`
they would come back already renormalised over the scale; the expected value is the same.)
Where `logprob_token_ids` is refused (older vLLM), the backend falls back to `logprobs=20` and
scale tokens outside the top 20 are left out (probability 0 before renormalisation).

Token ids of the scale values are the digits' ids after a prompt, as in the transformers backend
(`chat.score_token_ids`; one missing raises). Generation is one token when the log-probabilities
decide the score, else (no score tokens asked) `max_new_tokens` greedy tokens whose text is
parsed. A `RawPrompt` is tokenised with `tokenizer.encode` (no chat template), as the
transformers judge does. A prompt longer than `max_length` tokens is not submitted: its reply is
empty.
Prompts are rendered (and scale tokens looked up) by `engine.backends.chat`, as the transformers
judge does; the engine's start and shutdown are those of `engine.backends.vllm_engine`.

The engine starts with automatic prefix caching (`enable_prefix_caching=True`): a judge's
prompts share the chat header, system message and rubric (the fenced prompts put the row's
text last), so after the first prompt those KV blocks are found in the cache rather than
computed again (vLLM on CPU supports it for every model without MLA attention). Cached blocks
hold what a fresh prefill computes, so scores depend on it only to floating-point rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from engine.backends.base import JudgeReply, Prompt
from engine.backends.chat import VllmChatModel, score_token_ids

log = logging.getLogger(__name__)

TOP_LOGPROBS_FALLBACK = 20


class VllmJudge(VllmChatModel):
    """`JudgeBackend` on a vLLM engine (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        max_length: int = 2048,
        max_new_tokens: int = 8,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.85,
        trust_remote_code: bool = False,
        seed: int = 0,
        always_generate: bool = False,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.always_generate = always_generate
        self._token_ids_supported = True
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        super().__init__(
            model_path,
            dtype,
            enforce_eager,
            gpu_memory_utilization,
            trust_remote_code,
            seed,
            enable_prefix_caching=enable_prefix_caching,
        )
        log.info("vllm judge: %s, %s", model_path, dtype)

    def _params(self, ids: dict[str, int], generate: bool) -> Any:
        from vllm import SamplingParams

        tokens = self.max_new_tokens if generate else 1
        if ids and self._token_ids_supported:
            return SamplingParams(
                temperature=0.0, max_tokens=tokens, logprob_token_ids=sorted(ids.values())
            )
        return SamplingParams(
            temperature=0.0, max_tokens=tokens, logprobs=TOP_LOGPROBS_FALLBACK if ids else None
        )

    def _fall_back(self, ids: dict[str, int]) -> bool:
        """vLLM refused the sampling parameters: when they asked for `logprob_token_ids`, ask
        for the top-20 log-probabilities from now on and say to retry."""
        if not (ids and self._token_ids_supported):
            return False
        log.warning("vLLM refused logprob_token_ids; using top-%d", TOP_LOGPROBS_FALLBACK)
        self._token_ids_supported = False
        return True

    def judge(self, prompts: Sequence[Prompt], score_tokens: Sequence[str]) -> list[JudgeReply]:
        self._check_open()
        ids = score_token_ids(self.tokenizer, score_tokens)
        generate = self.always_generate or not ids
        completions = self._completions(
            prompts, lambda: self._params(ids, generate), lambda: self._fall_back(ids)
        )
        replies = [JudgeReply("", None) for _ in prompts]
        by_id = {v: k for k, v in ids.items()}
        for i, completion in completions.items():
            score: dict[str, float] | None = None
            if ids and completion.logprobs:
                first = completion.logprobs[0]
                score = {by_id[tid]: float(lp.logprob) for tid, lp in first.items() if tid in by_id}
            replies[i] = JudgeReply(text=completion.text, score_logprobs=score or None)
        return replies
