"""Reward-model backend: (instruction, response) pairs in, one float64 reward per pair out.

Any Hugging Face `AutoModelForSequenceClassification` with a single output (`num_labels == 1`),
used the way the OpenAssistant DeBERTa reward models are: the pair is the tokenizer's sentence
pair, `tokenizer(instruction, response)`, and the reward is `model(**inputs).logits[:, 0]`.
A head with another number of labels is refused when the model is loaded (its logits are class
scores, not a reward).

Truncation to `max_length` tokens (special tokens included): the response is cut
(`truncation="only_second"`) as long as the instruction takes at most half of the room; a longer
instruction is cut too, the two sides sharing the room (`"longest_first"`), so a long prompt can
never crowd the answer out of its own score (and `only_second` never fails on it).

Batches: the pairs are tokenized one by one, sorted by length and run `max_batch_pairs` at a time,
right-padded with an attention mask, so a batched score equals the pair's score alone up to float
rounding. Runs on the CPU unless `use_gpu` (and torch sees a GPU), like every transformers-based
backend (engine.backends.hf).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.backends import hf
from engine.backends.base import Closable

log = logging.getLogger(__name__)


class RewardScorer(Closable):
    """One sequence-classification reward model (see the module docstring)."""

    name = "reward"

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        max_length: int = 512,
        max_batch_pairs: int = 16,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        use_gpu: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if max_batch_pairs < 1:
            raise ValueError("max_batch_pairs must be positive")
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        labels = getattr(config, "num_labels", None)
        if labels != 1:
            raise ValueError(
                f"{model_path}: a reward model has one output (num_labels=1), this "
                f"sequence-classification head has {labels}; it is a classifier, not a reward "
                "model"
            )
        hf.set_threads(num_threads)
        self.device = hf.resolve_device(use_gpu)
        self.dtype = hf.resolve_dtype(dtype, self.device)
        self.max_batch_pairs = max_batch_pairs
        self.tokenizer = hf.load_tokenizer(model_path, trust_remote_code)
        self.max_length = _usable_length(self.tokenizer, max_length)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        self._set_padding()
        self.model.to(self.device).eval()
        log.info("reward scorer: %s on %s, %s", model_path, self.device, self.dtype)

    def _set_padding(self) -> None:
        """Right padding with a pad token the model knows: decoder-based reward models read the
        last non-pad token, and refuse batches when they have no pad token."""
        tokenizer, config = self.tokenizer, self.model.config
        tokenizer.padding_side = "right"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the reward model's tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id

    # ------------------------------------------------------------------------------------------
    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, list[int]]]:
        """Each pair's model inputs (input ids, attention mask, token type ids where the model
        has them), truncated as the module docstring says; no padding."""
        if not pairs:
            return []
        tokenizer = self.tokenizer
        budget = self.max_length - tokenizer.num_special_tokens_to_add(pair=True)
        measured = tokenizer([q for q, _ in pairs], add_special_tokens=False, verbose=False)
        lengths = [len(ids) for ids in measured["input_ids"]]
        # only_second keeps the whole instruction; it may take at most half of the room.
        cut_answer = [n <= budget - budget // 2 for n in lengths]
        encoded: list[dict[str, list[int]] | None] = [None] * len(pairs)
        for strategy, wanted in (("only_second", True), ("longest_first", False)):
            index = [i for i, flag in enumerate(cut_answer) if flag is wanted]
            if not index:
                continue
            batch = tokenizer(
                [pairs[i][0] for i in index],
                [pairs[i][1] for i in index],
                truncation=strategy,
                max_length=self.max_length,
            )
            for k, i in enumerate(index):
                encoded[i] = {key: list(values[k]) for key, values in batch.items()}
        return [e for e in encoded if e is not None]

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices, longest first, in runs of at most `max_batch_pairs` (similar lengths
        share a batch, so little is padded)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        step = self.max_batch_pairs
        return [order[start : start + step] for start in range(0, len(order), step)]

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """One reward per `(instruction, response)` pair (float64, input order)."""
        import torch

        self._check_open()
        out = np.zeros(len(pairs), dtype=np.float64)
        encoded = self.encode(pairs)
        with torch.inference_mode():
            for batch in self.batches([len(e["input_ids"]) for e in encoded]):
                padded = self.tokenizer.pad(
                    [encoded[i] for i in batch], padding=True, return_tensors="pt"
                )
                inputs = {key: value.to(self.device) for key, value in padded.items()}
                logits = self.model(**inputs).logits
                out[batch] = logits[:, 0].float().cpu().numpy().astype(np.float64)
        return out

    def _release(self) -> None:
        for attr in ("model", "tokenizer"):
            if hasattr(self, attr):
                delattr(self, attr)
        hf.free_memory(getattr(self, "device", None))


def _usable_length(tokenizer: Any, max_length: int) -> int:
    """`max_length`, but at least the pair's special tokens plus two tokens of text."""
    floor = tokenizer.num_special_tokens_to_add(pair=True) + 2
    if max_length < floor:
        raise ValueError(f"max_length must be at least {floor} tokens for this tokenizer")
    return max_length
