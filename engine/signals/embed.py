"""Sentence embeddings: which text of a record is embedded, and the sidecar schema.

The embedder itself is a backend (`engine.backends.embedder()`, the `Embedder` protocol in
engine.backends.base): L2-normalised float32 vectors, so a dot product is the cosine similarity,
which the FAISS semantic-duplicate search and the k-center / facility-location selectors rely on.
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
