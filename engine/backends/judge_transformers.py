"""transformers judge backend: score-token log-probabilities from one batched forward pass.

`TransformersJudge.judge` renders each chat prompt with the tokenizer's chat template
(`add_generation_prompt=True`, `engine.backends.chat`; a `RawPrompt` is tokenised with
`tokenizer.encode`, no template), sorts the prompts by length, and runs
batches of at most `max_batch_prompts` prompts (per forward pass), left-padded, with explicit
position ids (so a padded prompt gets the same positions as alone). The next-token logits at the
last position go through a float32 `log_softmax` over the whole vocabulary; the reply's
`score_logprobs` are those of the scale tokens (`chat.score_token_ids`: the digit's id as the
token after a prompt, also for SentencePiece tokenizers; a scale token without one raises
ValueError before anything runs).

Generation: when the log-probabilities decide the score (every scale token is one token), the
text is only the greedy first token (no decoding loop: it would cost `max_new_tokens` forwards
and change nothing). Otherwise (no score tokens asked: a judge scored by parsing its reply, or
`always_generate=True`) up to `max_new_tokens` tokens are decoded greedily. A prompt longer than
`max_length` tokens is not run: its reply is empty (the turn becomes NaN, `judge_unparsed`).
Runs on the CPU unless `use_gpu` (and torch sees a GPU).

Shared prefix. A judge's prompts share their start: the chat template's header, the system
message (hardening, datamark note) and the rubric, which the fenced prompts put before the row's
fenced text. `judge` runs that common prefix once per call (`shared_prefix_length` tokens of
every prompt in it, at least MIN_SHARED_PREFIX) and each batch continues from a copy of its KV
cache expanded to the batch, so only each prompt's own suffix is computed. The suffixes are
left-padded behind the prefix (the padding sits between prefix and suffix, masked out) with
positions that continue the prefix's, so every real token sees exactly what it would alone.
`reuse_prefix=False` runs every prompt whole (the reference path of the parity test).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from engine.backends.base import JudgeReply, Prompt
from engine.backends.chat import TransformersChatModel, render_prompts, score_token_ids

log = logging.getLogger(__name__)

# A shorter common prefix is not worth the cache copy per batch.
MIN_SHARED_PREFIX = 16


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, at most the shortest one's length minus one (each
    prompt keeps one token of its own: the logits come from its last position)."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences) - 1
    for seq in sequences[1:]:
        k = 0
        while k < n and seq[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


class TransformersJudge(TransformersChatModel):
    """`JudgeBackend` on a transformers CausalLM (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        max_length: int = 2048,
        max_new_tokens: int = 8,
        max_batch_prompts: int = 8,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        always_generate: bool = False,
        use_gpu: bool = False,
        reuse_prefix: bool = True,
    ) -> None:
        self.always_generate = always_generate
        self.reuse_prefix = reuse_prefix
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.max_batch_prompts = max(1, max_batch_prompts)
        super().__init__(model_path, dtype, trust_remote_code, num_threads, use_gpu)
        log.info("transformers judge: %s on %s, %s", model_path, self.device, self.dtype)

    def judge(self, prompts: Sequence[Prompt], score_tokens: Sequence[str]) -> list[JudgeReply]:
        self._check_open()
        token_ids = score_token_ids(self.tokenizer, score_tokens)
        generate = self.always_generate or not token_ids
        if not self.reuse_prefix:
            return self._run_batches(
                prompts,
                lambda sequences: self._batch(sequences, token_ids, generate),
                lambda: JudgeReply("", None),
            )
        return self._run_shared(prompts, token_ids, generate)

    def _run_shared(
        self, prompts: Sequence[Prompt], token_ids: dict[str, int], generate: bool
    ) -> list[JudgeReply]:
        """`judge` with the common prefix run once (see the module docstring): batches of at
        most `max_batch_prompts`, shortest first, each continuing from the prefix's KV cache."""
        import torch

        encoded, todo = render_prompts(self.tokenizer, prompts, self.max_length)
        replies = [JudgeReply("", None) for _ in prompts]
        order = sorted(todo, key=lambda i: len(encoded[i]))
        width = shared_prefix_length([encoded[i] for i in todo])
        if width < MIN_SHARED_PREFIX:
            width = 0
        with torch.inference_mode():
            prefix = self._prefix_cache(encoded[order[0]][:width]) if width else None
            for start in range(0, len(order), self.max_batch_prompts):
                batch = order[start : start + self.max_batch_prompts]
                sequences = [encoded[i][width:] for i in batch]
                logprobs, texts = self._greedy_after(sequences, prefix, width, generate)
                for b, i in enumerate(batch):
                    lp = {tok: float(logprobs[b, tid]) for tok, tid in token_ids.items()}
                    replies[i] = JudgeReply(text=self._decode(texts[b]), score_logprobs=lp or None)
        return replies

    def _prefix_cache(self, prefix: list[int]) -> Any:
        """The KV cache of `prefix` alone (batch of one)."""
        import torch

        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.past_key_values

    def _greedy_after(
        self, suffixes: list[list[int]], prefix: Any, width: int, generate: bool
    ) -> tuple[Any, list[list[int]]]:
        """`_greedy` of prompts that are `width` prefix tokens (KV cache `prefix`, None when
        width is 0) followed by `suffixes`: float32 next-token log-probabilities at the last
        position and the greedy tokens (more of them when `generate`)."""
        import torch

        return self._greedy(
            suffixes,
            generate,
            lambda logits: torch.log_softmax(logits, dim=-1),
            prefix=prefix,
            width=width,
        )

    def last_positions_logprobs(
        self, prompts: Sequence[Prompt], score_tokens: Sequence[str], positions: int
    ) -> list[list[dict[str, float]] | None]:
        """Per prompt, the log-probabilities of `score_tokens` as the next token after each of
        its last `positions` prefixes (oldest first): one forward pass reads what a prompt
        without its last token(s) and the whole prompt would each be followed by (the
        expected-value pairwise judge reads a score digit and the "0" after a "1" at once).
        None for a prompt over `max_length` or shorter than `positions` tokens."""
        import torch

        self._check_open()
        token_ids = score_token_ids(self.tokenizer, score_tokens)

        def run(sequences: list[list[int]]) -> list[list[dict[str, float]] | None]:
            from engine.backends import hf

            ids, mask, pos = hf.left_padded(sequences, self.pad_id, self.device)
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=positions,
            )
            logprobs = torch.log_softmax(out.logits[:, -positions:].float(), dim=-1)
            return [
                None
                if len(seq) < positions
                else [
                    {tok: float(logprobs[b, k, tid]) for tok, tid in token_ids.items()}
                    for k in range(positions)
                ]
                for b, seq in enumerate(sequences)
            ]

        return self._run_batches(prompts, run, lambda: None)

    def _batch(
        self, sequences: list[list[int]], token_ids: dict[str, int], generate: bool
    ) -> list[JudgeReply]:
        import torch

        logprobs, texts = self._greedy(
            sequences, generate, lambda logits: torch.log_softmax(logits, dim=-1)
        )
        replies = []
        for b in range(len(sequences)):
            lp = {tok: float(logprobs[b, tid]) for tok, tid in token_ids.items()}
            replies.append(JudgeReply(text=self._decode(texts[b]), score_logprobs=lp or None))
        return replies
