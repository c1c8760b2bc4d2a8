"""sentence-transformers embedder: texts in, L2-normalised float32 vectors out.

The vectors are unit length, so a dot product is the cosine similarity: the FAISS semantic-
duplicate search and the k-center / facility-location selectors all rely on that. Runs on the
CPU unless `use_gpu` (and torch sees a GPU), like every transformers-based backend
(`engine.backends.hf.resolve_device`). `batch_size` is texts per forward pass.
"""

from __future__ import annotations

import logging

import numpy as np

from engine.backends import hf
from engine.backends.base import Closable

log = logging.getLogger(__name__)


class SentenceTransformersEmbedder(Closable):
    """`Embedder` on one sentence-transformers model (see the module docstring)."""

    name = "sentence-transformers"

    def __init__(
        self,
        model_path: str,
        use_gpu: bool = False,
        num_threads: int | None = None,
        max_seq_length: int | None = None,
        batch_size: int = 128,
        trust_remote_code: bool = False,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        hf.set_threads(num_threads)
        self.device = hf.resolve_device(use_gpu)
        self.model = SentenceTransformer(
            model_path, device=str(self.device), trust_remote_code=trust_remote_code
        )
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        # sentence-transformers 6 renamed the method (the old name warns); older ones lack it.
        dimension = getattr(self.model, "get_embedding_dimension", None)
        if dimension is None:
            dimension = self.model.get_sentence_embedding_dimension
        self._dim = int(dimension())
        log.info("sentence-transformers embedder: %s on %s", model_path, self.device)

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit length; an empty text still gets its vector."""
        self._check_open()
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

    def _release(self) -> None:
        if hasattr(self, "model"):
            del self.model
        hf.free_memory(getattr(self, "device", None))
