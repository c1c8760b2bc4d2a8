"""Token-count stage: a real tokenizer (the built-in SmolLM2 one by default) on a Ray actor pool."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from engine.signals.tokens import TOKEN_SCHEMA, TokenCounter
from engine.stages.actor_scoring import score_records
from engine.stages.contract import (
    ActorResources,
    Settings,
    StageContext,
    StageSpec,
    model_signal_stage,
)


class TokensSettings(Settings):
    model: str = Field(default="builtin:smollm2-135m", description="whose tokenizer counts")
    trust_remote_code: bool = False


class TokensSpec(StageSpec, TokensSettings):
    stage_name = "tokens"
    resources: ActorResources = Field(default_factory=ActorResources)


class TokenCountActor:
    """One tokenizer per actor, loaded once in the constructor."""

    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False) -> None:
        self.counter = TokenCounter(tokenizer_path, trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        counted = self.counter.count(batch["id"].to_pylist(), batch["conversation"].to_pylist())
        return pa.Table.from_batches([counted])


def run_tokens(ctx: StageContext) -> dict[str, Any]:
    from engine.models import resolve_tokenizer

    spec: TokensSpec = ctx.spec
    # Resolved on the driver so actors never race to convert the built-in model.
    tokenizer_path = resolve_tokenizer(spec.model)
    kwargs = {"tokenizer_path": tokenizer_path, "trust_remote_code": spec.trust_remote_code}
    info = score_records(ctx, TokenCountActor, kwargs, TOKEN_SCHEMA)
    return {**info, "tokenizer_path": tokenizer_path}


STAGE = model_signal_stage(
    "tokens",
    version=2,
    run=run_tokens,
    spec=TokensSpec,
    schema=TOKEN_SCHEMA,
    description="token counts per role and of the whole chat",
)
