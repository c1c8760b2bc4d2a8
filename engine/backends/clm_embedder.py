"""Causal-LM embedder: DEITA's representation (`deita/selection/embedder/clm_embedder.py`).

DEITA embeds a sample with a causal LM (Mistral-7B / LLaMA in the paper) and takes the hidden
state of the LAST layer (`outputs.hidden_states[-1]`, i.e. after the final norm) at the last
non-padding token. Exactly as the reference:
  - the text is tokenized as given, with the tokenizer's own special tokens (its default
    `add_special_tokens`), right-truncated to `max_length` tokens (DEITA's default 2048);
  - batches are right-padded with the pad token (the unk token when the tokenizer has none), the
    attention mask is `input_ids != pad_id`, and the pooled position is `mask.sum() - 1`
    (so a pad-id token inside the text shifts it, as in the reference);
  - no pooling over tokens, no projection.
The reference stores the raw vectors and its filter L2-normalises them before the cosine
(`IterativeFilter.compute_distance`, normalize_emb=True); this backend returns them normalised,
as the `Embedder` protocol requires, which gives the same cosines.

Which text is embedded (DEITA's vicuna_v1.1 prompt is `stages.embed.text: deita`) is the embed
stage's choice (engine.signals.embed.record_text), not the backend's. An empty text has no
token: it is embedded as the tokenizer's BOS (else EOS) token alone, so every row gets a vector.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from engine.backends import hf
from engine.backends.base import Closable

log = logging.getLogger(__name__)

DEITA_MAX_LENGTH = 2048  # `examples/pipelines/embed_datasets.py --max_length`


def pad_id_of(tokenizer: Any) -> int:
    """DEITA's pad: the tokenizer's pad token, else its unk token (then EOS, then 0)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def last_token_positions(input_ids: Any, pad_id: int) -> Any:
    """The reference's pooled position per row of a right-padded batch: (ids != pad).sum - 1."""
    return input_ids.ne(pad_id).sum(1) - 1


class CausalLMEmbedder(Closable):
    """`Embedder` on a transformers CausalLM's last-layer, last-token hidden state (DEITA)."""

    name = "causal-lm-embedder"

    def __init__(
        self,
        model_path: str,
        use_gpu: bool = False,
        num_threads: int | None = None,
        max_seq_length: int | None = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        dtype: str = "auto",
    ) -> None:
        hf.set_threads(num_threads)
        self.device = hf.resolve_device(use_gpu)
        self.dtype = hf.resolve_dtype(dtype, self.device)
        self.tokenizer = hf.load_tokenizer(model_path, trust_remote_code)
        self.model = hf.load_causal_lm(model_path, self.dtype, self.device, trust_remote_code)
        self.max_length = int(max_seq_length or DEITA_MAX_LENGTH)
        self.batch_size = batch_size
        self.pad_id = pad_id_of(self.tokenizer)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.empty_id = int(bos if bos is not None else eos if eos is not None else self.pad_id)
        self._dim = int(self.model.config.hidden_size)
        log.info("causal-LM embedder: %s on %s (%s)", model_path, self.device, self.dtype)

    @property
    def dim(self) -> int:
        return self._dim

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The reference's tokenization: special tokens on, right truncation at max_length."""
        encoded = self.tokenizer(
            [text or "" for text in texts], max_length=self.max_length, truncation=True
        )["input_ids"]
        return [list(ids) if ids else [self.empty_id] for ids in encoded]

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit length: the last layer at the last token."""
        import torch

        self._check_open()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        sequences = self.token_ids(texts)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = max(len(sequences[i]) for i in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                for b, i in enumerate(rows):
                    ids[b, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                mask = ids.ne(self.pad_id)
                ids, mask = ids.to(self.device), mask.to(self.device)
                hidden = self.model(
                    input_ids=ids, attention_mask=mask.long(), output_hidden_states=True
                ).hidden_states[-1]
                position = last_token_positions(ids, self.pad_id).clamp(min=0)
                last = hidden[torch.arange(len(rows), device=hidden.device), position]
                out[rows] = last.float().cpu().numpy()
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)

    def _release(self) -> None:
        for attr in ("model", "tokenizer"):
            if hasattr(self, attr):
                delattr(self, attr)
        hf.free_memory(getattr(self, "device", None))
