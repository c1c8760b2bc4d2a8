"""Embedding stage: an embedder on a Ray actor pool, one model per actor, cached.

`stages.embed.backend`: "sentence_transformers" (default, MiniLM: semantic dedup, MoDS,
Superfiltering.D) or "causal_lm" (DEITA's representation: a CausalLM's last-layer hidden state at
the last token, engine.backends.clm_embedder; e.g. `model: builtin:smollm2-135m`, `text: deita`).
Which text is embedded is `stages.embed.text` (see engine.signals.embed.record_text). A record
whose chosen text is empty (e.g. no assistant turn for "response") is embedded as the empty
string: every unique record gets a vector, so downstream selectors never meet a missing row.
Vectors are cached by the stage's settings fingerprint (model identity, revision, text,
max_seq_length, backend, dtype).
"""

from __future__ import annotations

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

DEFAULT_MODELS = {
    "sentence_transformers": "builtin:all-minilm-l6-v2",
    "causal_lm": "builtin:smollm2-135m",
}


class EmbedSettings(Settings):
    """Sentence embeddings, L2-normalised float32, sidecar by id."""

    backend: Literal["sentence_transformers", "causal_lm"] = Field(
        default="sentence_transformers",
        description="sentence_transformers, or causal_lm: DEITA's last-layer last-token "
        "hidden state of a CausalLM (model e.g. builtin:smollm2-135m)",
    )
    model: str | None = Field(
        default=None,
        description="null: the backend's built-in (sentence_transformers: "
        "builtin:all-minilm-l6-v2; causal_lm: builtin:smollm2-135m)",
    )
    revision: str | None = None
    text: Literal["instruction", "conversation", "response", "mods", "superfiltering", "deita"] = (
        Field(
            default="instruction",
            description="instruction: the first user turn (with its input); response; "
            "conversation; the references': mods (the instruction without its input), "
            "superfiltering (instruction\\ninput\\noutput), deita (vicuna_v1.1 prompt)",
        )
    )
    max_seq_length: Annotated[int, Field(ge=8)] | None = Field(
        default=None,
        description="tokens per text (sentence_transformers: the model's own, 256 for MiniLM; "
        "Superfiltering.D truncates at 512; causal_lm: DEITA's 2048)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="causal_lm only: auto = bf16 where native, else fp32"
    )
    trust_remote_code: bool = False

    def model_name(self) -> str:
        """The model embedded with: the configured one, else the backend's built-in."""
        return self.model or DEFAULT_MODELS[self.backend]


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
    from engine.models import resolve_embedding_model, resolve_model

    spec: EmbedSpec = ctx.spec
    res = spec.resources
    resolve = resolve_model if spec.backend == "causal_lm" else resolve_embedding_model
    model_path = resolve(spec.model_name(), spec.revision)  # on the driver: no races
    kwargs = {
        "model_path": model_path,
        "text": spec.text,
        "backend": spec.backend,
        "dtype": spec.dtype,
        "max_seq_length": spec.max_seq_length,
        "batch_size": res.batch_size,
        "num_threads": res.threads(),
        "use_gpu": res.num_gpus > 0,
        "trust_remote_code": spec.trust_remote_code,
    }
    info = score_records(ctx, EmbeddingActor, kwargs, EMBED_SCHEMA)
    return {**info, "dim": _dimension(ctx.run.signal("embed"))}


def check_embed(job: Any) -> str | None:
    """The causal_lm backend needs a CausalLM, not the built-in sentence-transformers model."""
    from engine.models import BUILTIN_EMBEDDING_MODELS, BUILTIN_MODELS

    spec = job.stages.embed
    if spec.backend == "causal_lm" and spec.model in BUILTIN_EMBEDDING_MODELS:
        return (
            f"stages.embed.model: the causal_lm backend embeds with a CausalLM "
            f"(e.g. builtin:smollm2-135m), not the sentence-transformers model {spec.model}"
        )
    if spec.backend == "sentence_transformers" and spec.model in BUILTIN_MODELS:
        return (
            f"stages.embed.model: {spec.model} is a CausalLM; embed with it through "
            "stages.embed.backend: causal_lm"
        )
    return None


STAGE = model_signal_stage(
    "embed",
    version=1,
    run=run_embed,
    spec=EmbedSpec,
    schema=EMBED_SCHEMA,
    description="embeddings (semantic dedup, DEITA, k-center, facility location)",
    check=check_embed,
    model_of=lambda block: block.model_name(),
)
