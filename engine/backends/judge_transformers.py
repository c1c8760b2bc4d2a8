"""transformers judge backend: score-token log-probabilities from one batched forward pass.

`TransformersJudge.judge` renders each chat prompt with the tokenizer's chat template
(`add_generation_prompt=True`), sorts the prompts by length, and runs batches of at most
`batch_size` prompts, left-padded, with explicit position ids (so a padded prompt gets the same
positions as alone). The next-token logits at the last position go through a float32
`log_softmax` over the whole vocabulary; the reply's `score_logprobs` are those of the scale
tokens. A scale token's id is the tokenizer's encoding of the bare digit without a leading space
("4", not " 4"): chat templates end the generation prompt with a newline, after which
SentencePiece/BPE tokenizers emit the bare digit; a token that does not encode to exactly one id
is left out (the expected value renormalises over the tokens present).

Generation: when the log-probabilities decide the score (every scale token is one token), the
text is only the greedy first token (no decoding loop: it would cost `max_new_tokens` forwards
and change nothing). Otherwise (wider custom scales, or `always_generate=True`) up to
`max_new_tokens` tokens are decoded greedily and the reply is parsed. A prompt longer than
`max_length` tokens is not run: its reply is empty (the turn becomes NaN, `judge_unparsed`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from typing import Any

from engine.backends.base import JudgeReply
from engine.backends.transformers_lm import resolve_dtype

log = logging.getLogger(__name__)


def score_token_ids(tokenizer: Any, score_tokens: Sequence[str]) -> dict[str, int]:
    """Each scale token's single id (bare digit, no leading space); multi-id tokens are left out."""
    ids: dict[str, int] = {}
    for token in score_tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) == 1:
            ids[token] = int(encoded[0])
    return ids


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


class TransformersJudge:
    """`JudgeBackend` on a transformers CausalLM (see the module docstring)."""

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        max_length: int = 2048,
        max_new_tokens: int = 8,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        always_generate: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.batch_size, self.always_generate = max(1, batch_size), always_generate
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        self.model = model.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {int(eos)} if eos is not None else set()
        log.info("transformers judge: %s on %s, %s", model_path, self.device, self.dtype)

    def judge(
        self, prompts: Sequence[list[dict[str, str]]], score_tokens: Sequence[str]
    ) -> list[JudgeReply]:
        import torch

        if not hasattr(self, "model"):
            raise RuntimeError("the transformers judge is closed")
        token_ids = score_token_ids(self.tokenizer, score_tokens)
        generate = self.always_generate or not token_ids
        encoded = [render_chat(self.tokenizer, p) for p in prompts]
        replies = [JudgeReply("", None) for _ in prompts]
        order = sorted(
            (i for i, ids in enumerate(encoded) if 0 < len(ids) <= self.max_length),
            key=lambda i: len(encoded[i]),
        )
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                out = self._batch([encoded[i] for i in batch], token_ids, generate)
                for i, reply in zip(batch, out, strict=True):
                    replies[i] = reply
        return replies

    def _batch(
        self, sequences: list[list[int]], token_ids: dict[str, int], generate: bool
    ) -> list[JudgeReply]:
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, seq in enumerate(sequences):
            ids[b, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[b, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=generate
        )
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        first = logprobs.argmax(-1)
        texts: list[list[int]] = [[int(t)] for t in first.tolist()]
        if generate and self.max_new_tokens > 1:
            texts = self._continue(ids, mask, positions, out.past_key_values, first, texts)
        replies = []
        for b in range(len(sequences)):
            lp = {tok: float(logprobs[b, tid]) for tok, tid in token_ids.items()}
            text = self.tokenizer.decode(
                [t for t in texts[b] if t not in self.eos_ids], skip_special_tokens=True
            )
            replies.append(JudgeReply(text=text, score_logprobs=lp or None))
        return replies

    def _continue(
        self,
        ids: Any,
        mask: Any,
        positions: Any,
        past: Any,
        first: Any,
        texts: list[list[int]],
    ) -> list[list[int]]:
        """Greedy decoding of the remaining `max_new_tokens - 1` tokens with the KV cache."""
        import torch

        done = torch.tensor([t[0] in self.eos_ids for t in texts], device=self.device)
        token, pos = first[:, None], positions[:, -1:] + 1
        for _ in range(self.max_new_tokens - 1):
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = self.model(
                input_ids=token,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            token = out.logits[:, -1].float().argmax(-1, keepdim=True)
            pos = pos + 1
            for b, t in enumerate(token[:, 0].tolist()):
                if not bool(done[b]):
                    texts[b].append(int(t))
                    if int(t) in self.eos_ids:
                        done[b] = True
        return texts

    def close(self) -> None:
        import torch

        if hasattr(self, "model"):
            del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
