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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine.backends.base import JudgeReply, Prompt
from engine.backends.chat import TransformersChatModel, score_token_ids

log = logging.getLogger(__name__)


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
    ) -> None:
        self.always_generate = always_generate
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.max_batch_prompts = max(1, max_batch_prompts)
        super().__init__(model_path, dtype, trust_remote_code, num_threads, use_gpu)
        log.info("transformers judge: %s on %s, %s", model_path, self.device, self.dtype)

    def judge(self, prompts: Sequence[Prompt], score_tokens: Sequence[str]) -> list[JudgeReply]:
        self._check_open()
        token_ids = score_token_ids(self.tokenizer, score_tokens)
        generate = self.always_generate or not token_ids
        return self._run_batches(
            prompts,
            lambda sequences: self._batch(sequences, token_ids, generate),
            lambda: JudgeReply("", None),
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
