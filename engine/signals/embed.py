"""Sentence embeddings: which text of a record is embedded, the embedder, and the sidecar schema.

The vectors are L2-normalised float32, so a dot product is the cosine similarity: the FAISS
semantic-duplicate search and the k-center / facility-location selectors all rely on that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

EMBED_SCHEMA = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])

TEXT_CHOICES = ("instruction", "response", "conversation")


def _first_turn(conversation: Iterable[Mapping[str, Any]], role: str) -> str:
    for turn in conversation:
        if turn.get("role") == role:
            return turn.get("content") or ""
    return ""


def record_text(conversation: Iterable[Mapping[str, Any]] | None, which: str) -> str:
    """The text of a record that is embedded (or shingled for MinHash).

    "instruction": the first user turn (MoDS embeds the instruction); "response": the first
    assistant turn; "conversation": every turn as a `role: content` line (Superfiltering.D).
    A record without that turn gives the empty string, never an error.
    """
    turns = [] if conversation is None else list(conversation)
    if which == "instruction":
        return _first_turn(turns, "user")
    if which == "response":
        return _first_turn(turns, "assistant")
    if which == "conversation":
        return "\n".join(f"{t.get('role', '')}: {t.get('content') or ''}" for t in turns)
    raise ValueError(f"unknown text choice {which!r}; known: {', '.join(TEXT_CHOICES)}")


def embedding_array(vectors: np.ndarray) -> pa.ListArray:
    """An (n, dim) float32 matrix as Arrow list<float32> without a Python loop."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows, dim = vectors.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * dim)
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))


class Embedder:
    """One sentence-transformers model: texts in, L2-normalised float32 vectors out."""

    def __init__(
        self,
        model_path: str,
        use_gpu: bool = False,
        num_threads: int | None = None,
        max_seq_length: int | None = None,
        batch_size: int = 128,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if num_threads is not None:
            # Size torch to the cores the actor holds: over-subscription is the big slowdown here.
            torch.set_num_threads(num_threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(
            model_path, device=self.device, trust_remote_code=trust_remote_code
        )
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit length; an empty text still gets its vector."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            [text or "" for text in texts],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
