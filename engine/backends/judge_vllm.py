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

Token ids of the scale values are the bare digits, as in the transformers backend. Generation is
one token when the log-probabilities decide the score, else `max_new_tokens` greedy tokens whose
text is parsed. A prompt longer than `max_length` tokens is not submitted: its reply is empty.
The CPU engine settings and shutdown are those of `engine.backends.vllm_lm`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from engine.backends.base import JudgeReply
from engine.backends.judge_transformers import render_chat, score_token_ids
from engine.backends.vllm_lm import (
    cuda_available,
    shutdown_engine,
    start_engine,
)

log = logging.getLogger(__name__)

TOP_LOGPROBS_FALLBACK = 20


class VllmJudge:
    """`JudgeBackend` on a vLLM engine (see the module docstring)."""

    name = "vllm"

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
    ) -> None:
        from transformers import AutoTokenizer

        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.always_generate = always_generate
        self.on_gpu = cuda_available()
        self._token_ids_supported = True
        self.llm: Any = None
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=trust_remote_code
        )
        self.llm, self._workdir = start_engine(
            self.on_gpu,
            model=model_path,
            dtype=dtype,
            max_model_len=max_length + max_new_tokens,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            seed=seed,
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

    def judge(
        self, prompts: Sequence[list[dict[str, str]]], score_tokens: Sequence[str]
    ) -> list[JudgeReply]:
        if self.llm is None:
            raise RuntimeError("the vLLM judge is closed")
        ids = score_token_ids(self.tokenizer, score_tokens)
        generate = self.always_generate or not ids
        encoded = [render_chat(self.tokenizer, p) for p in prompts]
        todo = [i for i, e in enumerate(encoded) if 0 < len(e) <= self.max_length]
        replies = [JudgeReply("", None) for _ in prompts]
        if not todo:
            return replies
        inputs = [{"prompt_token_ids": encoded[i]} for i in todo]
        try:
            outputs = self.llm.generate(inputs, self._params(ids, generate), use_tqdm=False)
        except (TypeError, ValueError, NotImplementedError):
            if not (ids and self._token_ids_supported):
                raise
            log.warning("vLLM refused logprob_token_ids; using top-%d", TOP_LOGPROBS_FALLBACK)
            self._token_ids_supported = False
            outputs = self.llm.generate(inputs, self._params(ids, generate), use_tqdm=False)
        if len(outputs) != len(todo):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(todo)} prompts")
        by_id = {v: k for k, v in ids.items()}
        for i, out in zip(todo, outputs, strict=True):
            if list(out.prompt_token_ids) != encoded[i]:
                raise RuntimeError(f"vLLM output {out.request_id} is not prompt {i}")
            completion = out.outputs[0]
            score: dict[str, float] | None = None
            if ids and completion.logprobs:
                first = completion.logprobs[0]
                score = {by_id[tid]: float(lp.logprob) for tid, lp in first.items() if tid in by_id}
            replies[i] = JudgeReply(text=completion.text, score_logprobs=score or None)
        return replies

    def close(self) -> None:
        llm, self.llm = self.llm, None
        workdir, self._workdir = self._workdir, None
        shutdown_engine(llm, self.on_gpu, workdir)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if getattr(self, "llm", None) is not None or getattr(self, "_workdir", None):
                self.close()
