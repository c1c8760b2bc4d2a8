"""Token-count stage: the built-in SmolLM2 tokenizer on a Ray actor pool, sidecar by id."""

from __future__ import annotations

import pyarrow as pa

from engine.config import JobSpec
from engine.models import resolve_tokenizer
from engine.runtime.rundir import RunDir
from engine.signals.tokens import TOKEN_SCHEMA, TokenCounter
from engine.stages.actor_scoring import ActorStage, run_actor_stage


class TokenCountActor:
    """One tokenizer per actor, loaded once in the constructor."""

    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False) -> None:
        self.counter = TokenCounter(tokenizer_path, trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        counted = self.counter.count(batch["id"].to_pylist(), batch["conversation"].to_pylist())
        return pa.Table.from_batches([counted])


def run_tokens(job: JobSpec, run: RunDir) -> dict:
    spec = job.stages.tokens
    # Resolved on the driver so actors never race to convert the built-in model.
    tokenizer_path = resolve_tokenizer(spec.model)
    stage = ActorStage(
        name="tokens",
        actor_cls=TokenCountActor,
        constructor_kwargs={
            "tokenizer_path": tokenizer_path,
            "trust_remote_code": spec.trust_remote_code,
        },
        spec=spec,
        schema=TOKEN_SCHEMA,
    )
    info = run_actor_stage(stage, run)
    return {**info, "model": spec.model, "tokenizer_path": tokenizer_path}
