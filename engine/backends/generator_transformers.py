"""transformers generator: greedy replies to chat prompts (or raw strings), batched.

`TransformersGenerator.generate` renders each chat prompt with the tokenizer's chat template
(`add_generation_prompt=True`, `engine.backends.chat`; a `RawPrompt`, e.g. an Alpaca-template
string, is tokenised with `tokenizer.encode` and no template), sorts the prompts by length and runs
batches of at most `max_batch_prompts` prompts, left-padded with explicit position ids (a padded
prompt gets the same positions as alone, so batched replies equal one-by-one replies up to float
rounding), then decodes greedily (argmax, i.e. temperature 0) with the KV cache, up to
`max_new_tokens` tokens per prompt; a prompt stops at its first EOS (the tokenizer's, or one of
the model's generation config). The reply is the decoded text of the generated tokens without
special tokens. A prompt longer than `max_length` tokens (after templating) is not run: its
reply is the empty string. Runs on the CPU unless `use_gpu` (and torch sees a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine.backends.base import Prompt
from engine.backends.chat import TransformersChatModel

log = logging.getLogger(__name__)


class TransformersGenerator(TransformersChatModel):
    """`Generator` on a transformers CausalLM (see the module docstring)."""

    generation_eos = True

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        max_length: int = 2048,
        max_new_tokens: int = 256,
        max_batch_prompts: int = 8,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        use_gpu: bool = False,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.max_batch_prompts = max(1, max_batch_prompts)
        super().__init__(model_path, dtype, trust_remote_code, num_threads, use_gpu)
        log.info("transformers generator: %s on %s, %s", model_path, self.device, self.dtype)

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        """The greedy reply to each prompt, in order ("" for a prompt over `max_length`)."""
        return [self._decode(ids) for ids in self.generate_token_ids(prompts)]

    def generate_counted(self, prompts: Sequence[Prompt]) -> list[tuple[str, int]]:
        """Each greedy reply with its generated token count, EOS not counted (0 for a prompt
        over `max_length`)."""
        return [
            (self._decode(ids), sum(t not in self.eos_ids for t in ids))
            for ids in self.generate_token_ids(prompts)
        ]

    def generate_token_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """The generated token ids of each prompt (a final EOS included), in order; [] for a
        prompt over `max_length`."""
        self._check_open()
        return self._run_batches(prompts, lambda sequences: self._greedy(sequences, True)[1], list)
