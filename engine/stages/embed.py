"""Embedding stage: sentence-transformers on a Ray actor pool, one model per actor, cached.

Which text is embedded is `stages.embed.text` (see engine.signals.embed.record_text). A record
whose chosen text is empty (e.g. no assistant turn for "response") is embedded as the empty
string: every unique record gets a vector, so downstream selectors never meet a missing row.
Vectors are cached by the stage's settings fingerprint (model identity, revision, text,
max_seq_length).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import pyarrow as pa
import pyarrow.dataset as ds
from pydantic import Field

from engine.signals.embed import EMBED_SCHEMA, embedding_array, record_text
from engine.stages.actor_scoring import score_records
from engine.stages.contract import (
    ActorResources,
    CacheSpec,
    Settings,
    StageContext,
    StageSpec,
    model_signal_stage,
)


class EmbedSettings(Settings):
    """Sentence embeddings (sentence-transformers), L2-normalised float32, sidecar by id."""

    model: str = "builtin:all-minilm-l6-v2"
    revision: str | None = None
    text: Literal["instruction", "conversation", "response"] = Field(
        default="instruction",
        description="instruction only (MoDS) or the whole conversation (Superfiltering.D)",
    )
    max_seq_length: Annotated[int, Field(ge=8)] | None = None
    trust_remote_code: bool = False


class EmbedResources(ActorResources):
    batch_size: Annotated[int, Field(ge=1)] = Field(
        default=128, description="rows per actor call, also texts per encode batch"
    )


class EmbedSpec(StageSpec, EmbedSettings):
    stage_name = "embed"
    resources: EmbedResources = Field(default_factory=EmbedResources)
    cache: CacheSpec = Field(default_factory=CacheSpec)


class EmbeddingActor:
    """One embedding model per actor, built in the constructor: (id, conversation) → embedding."""

    def __init__(self, model_path: str, text: str, **backend: Any) -> None:
        from engine.backends import embedder

        self.text = text
        self.embedder = embedder(model_path, **backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [record_text(c, self.text) for c in batch["conversation"].to_pylist()]
        vectors = self.embedder.embed(texts)
        return pa.Table.from_arrays([batch["id"], embedding_array(vectors)], schema=EMBED_SCHEMA)


def _dimension(sidecar: Any) -> int | None:
    first = ds.dataset(str(sidecar), format="parquet").head(1, columns=["embedding"])
    return len(first["embedding"][0].as_py()) if first.num_rows else None


def run_embed(ctx: StageContext) -> dict[str, Any]:
    """Embed every unique record into `signals/embed/` (id, embedding)."""
    from engine.models import resolve_embedding_model

    spec: EmbedSpec = ctx.spec
    res = spec.resources
    model_path = resolve_embedding_model(spec.model, spec.revision)  # on the driver: no races
    kwargs = {
        "model_path": model_path,
        "text": spec.text,
        "max_seq_length": spec.max_seq_length,
        "batch_size": res.batch_size,
        "num_threads": max(1, math.ceil(res.num_cpus)),
        "use_gpu": res.num_gpus > 0,
        "trust_remote_code": spec.trust_remote_code,
    }
    info = score_records(ctx, EmbeddingActor, kwargs, EMBED_SCHEMA)
    return {**info, "dim": _dimension(ctx.run.signal("embed"))}


STAGE = model_signal_stage(
    "embed",
    version=1,
    run=run_embed,
    spec=EmbedSpec,
    schema=EMBED_SCHEMA,
    description="sentence embeddings (semantic dedup, DEITA, k-center, facility location)",
)
