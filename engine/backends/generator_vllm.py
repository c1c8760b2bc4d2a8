"""vLLM generator: greedy replies to chat prompts, every prompt in one `LLM.generate` call.

Prompts are rendered into token ids with the tokenizer's chat template (`add_generation_prompt`,
`engine.backends.chat`, as the transformers generator does; a `RawPrompt` with
`tokenizer.encode` and no template) and submitted with
`SamplingParams(temperature=0, max_tokens=max_new_tokens)`: greedy decoding that stops at the
model's EOS (vLLM takes the tokenizer's and the generation config's); the reply is vLLM's
detokenized text without special tokens. A prompt longer than `max_length` tokens is not
submitted: its reply is the empty string. The engine holds `max_length + max_new_tokens`
positions; its start and shutdown are those of `engine.backends.vllm_engine`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from engine.backends.base import Prompt
from engine.backends.chat import VllmChatModel

log = logging.getLogger(__name__)


class VllmGenerator(VllmChatModel):
    """`Generator` on a vLLM engine (see the module docstring). `dtype` goes to vLLM as is
    (see `engine.backends.vllm_engine.vllm_dtype` for the "auto" of a job spec)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        max_length: int = 2048,
        max_new_tokens: int = 256,
        enforce_eager: bool = True,
        trust_remote_code: bool = False,
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        super().__init__(
            model_path, dtype, enforce_eager, gpu_memory_utilization, trust_remote_code, seed
        )
        log.info("vllm generator: %s, %s", model_path, dtype)

    def _params(self) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0, max_tokens=self.max_new_tokens, skip_special_tokens=True
        )

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        """The greedy reply to each prompt, in order ("" for a prompt over `max_length`)."""
        return [text for text, _, _ in self._run(prompts)]

    def generate_counted(self, prompts: Sequence[Prompt]) -> list[tuple[str, int]]:
        """Each greedy reply with its generated token count, the final EOS (or generation-config
        stop token) not counted, as the transformers generator counts; 0 for a prompt over
        `max_length`."""
        return [(text, len(ids) - stopped) for text, ids, stopped in self._run(prompts)]

    def generate_token_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """The generated token ids of each prompt (a final EOS included), in order; [] for a
        prompt over `max_length`."""
        return [ids for _, ids, _ in self._run(prompts)]

    def _run(self, prompts: Sequence[Prompt]) -> list[tuple[str, list[int], int]]:
        """(text, token ids, 1 when the last id is the EOS or stop token that ended it)."""
        self._check_open()
        replies: list[tuple[str, list[int], int]] = [("", [], 0) for _ in prompts]
        for i, completion in self._completions(prompts, self._params).items():
            ids = [int(t) for t in completion.token_ids]
            # vLLM keeps the EOS / stop token id it stopped on (stop_reason None or that id);
            # a stop string (str) is not a token of its own. No stop strings are set here.
            stopped = int(
                bool(ids)
                and completion.finish_reason == "stop"
                and not isinstance(completion.stop_reason, str)
            )
            replies[i] = (completion.text, ids, stopped)
        return replies
