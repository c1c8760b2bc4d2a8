"""Embedding stage: sentence-transformers on a Ray actor pool, one model per actor, cached.

Which text is embedded is `stages.embed.text` (see engine.signals.embed.record_text). A record
whose chosen text is empty (e.g. no assistant turn for "response") is embedded as the empty
string: every unique record gets a vector, so downstream selectors never meet a missing row.
Vectors are cached by (id, fingerprint of model incl. the built-in's package version, revision,
text, max_seq_length, EMBED_VERSION).
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from engine.cache import ScoreCache
from engine.config import EmbedStageSpec, JobSpec
from engine.models import BUILTIN_EMBEDDING_MODELS, builtin_package_version, resolve_embedding_model
from engine.runtime.rundir import RunDir, fingerprint
from engine.signals.embed import EMBED_SCHEMA, Embedder, embedding_array, record_text
from engine.stages.actor_scoring import ActorStage, run_actor_stage

# Bump when what is embedded changes (text extraction, normalisation, pooling).
EMBED_VERSION = 1


class EmbeddingActor:
    """One embedding model per actor, built in the constructor: (id, conversation) → embedding."""

    def __init__(
        self,
        model_path: str,
        text: str,
        max_seq_length: int | None,
        batch_size: int,
        num_threads: int,
        use_gpu: bool,
        trust_remote_code: bool,
    ) -> None:
        self.text = text
        self.embedder = Embedder(
            model_path,
            use_gpu=use_gpu,
            num_threads=num_threads,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [record_text(c, self.text) for c in batch["conversation"].to_pylist()]
        vectors = self.embedder.embed(texts)
        return pa.Table.from_arrays([batch["id"], embedding_array(vectors)], schema=EMBED_SCHEMA)


def embed_fingerprint(spec: EmbedStageSpec) -> str:
    """What changes the vectors; resources (CPUs, GPUs, batch and pool sizes) do not."""
    model = spec.model
    builtin = BUILTIN_EMBEDDING_MODELS.get(spec.model)
    if builtin is not None:
        model = f"{spec.model}@{builtin.package}=={builtin_package_version(builtin.package)}"
    return fingerprint("embed", EMBED_VERSION, model, spec.revision, spec.text, spec.max_seq_length)


def _dimension(sidecar: Any) -> int | None:
    first = ds.dataset(str(sidecar), format="parquet").head(1, columns=["embedding"])
    return len(first["embedding"][0].as_py()) if first.num_rows else None


def run_embed(job: JobSpec, run: RunDir) -> dict[str, Any]:
    """Embed every unique record into `signals/embed/` (id, embedding)."""
    spec = job.stages.embed
    model_path = resolve_embedding_model(spec.model, spec.revision)  # on the driver: no races
    key = embed_fingerprint(spec)
    stage = ActorStage(
        name="embed",
        actor_cls=EmbeddingActor,
        constructor_kwargs={
            "model_path": model_path,
            "text": spec.text,
            "max_seq_length": spec.max_seq_length,
            "batch_size": spec.batch_size,
            "num_threads": max(1, math.ceil(spec.num_cpus)),
            "use_gpu": spec.num_gpus > 0,
            "trust_remote_code": spec.trust_remote_code,
        },
        spec=spec,
        schema=EMBED_SCHEMA,
        cache=ScoreCache(spec.cache_dir, key, EMBED_SCHEMA) if spec.cache else None,
    )
    info = run_actor_stage(stage, run)
    return {**info, "model": spec.model, "dim": _dimension(run.signal("embed")), "fingerprint": key}
