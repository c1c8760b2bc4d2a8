"""Reward-model stage: (instruction, response) rewards on a Ray actor pool, one model per actor,
cached by content.

Any Hugging Face sequence-classification reward model with one output (`stages.rm.model`: a hub
name pinned with `revision`, e.g. OpenAssistant/reward-model-deberta-v3-large-v2, or a local
folder); no reward model is built in, so the model must be named. Which pairs are scored and how
a record's `rm_score` is pooled: engine.signals.rm; how a pair is tokenized and truncated:
engine.backends.reward. `rm_score` is an ordinary number column: a ranking score
(`select.score: rm_score`, as MoDS ranks by a reward model) and usable in filters.

Defaults: `max_turns: 1` (the first scorable assistant turn, counted and numbered as LM scoring and
the judges do: engine.signals.turns) — these reward models score a bare (question, answer) pair
with no earlier context, so a later turn ("and in Python?") is scored out of context; the first
turn is the one whose instruction stands alone, and the cost stays one pair per record (null scores
every turn; the record's score is then the mean). `dtype: float32` — reward models are small enough
(DeBERTa-v3-large: 435M parameters) for float32 anywhere, DeBERTa-v3 is known to be unstable in
float16, and a cached score is then the same number on every machine ("auto" would give bf16 scores
on some hosts and fp32 on others under one cache key).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import pyarrow as pa
from pydantic import Field

from engine.signals.rm import RM_SCHEMA, plan_pairs, record_columns
from engine.stages.actor_scoring import score_records
from engine.stages.contract import (
    ActorResources,
    CacheSpec,
    Settings,
    StageContext,
    TurnScoringSpec,
    model_signal_stage,
)

if TYPE_CHECKING:
    from engine.config import JobSpec

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class RMSettings(Settings):
    """Reward-model scores of (instruction, response) pairs (see engine.signals.rm)."""

    model: str | None = Field(
        default=None,
        description="a hub name (pin it with `revision`) or a local folder; required: no "
        "reward model is built in",
    )
    revision: str | None = None
    max_length: Annotated[int, Field(ge=16)] = Field(
        default=512, description="tokens per pair, special tokens included"
    )
    max_turns: Annotated[int, Field(ge=1)] | None = Field(
        default=1,
        description="score only the first N scorable assistant turns of each record (null: all)",
    )
    dtype: Dtype = Field(default="float32", description="auto: bf16 where native, else fp32")
    trust_remote_code: bool = False


class RMResources(ActorResources):
    batch_size: Annotated[int, Field(ge=1)] = Field(
        default=64, description="rows per actor call (Ray Data batch)"
    )
    max_batch_pairs: Annotated[int, Field(ge=1)] = Field(
        default=16, description="(instruction, response) pairs per forward pass"
    )


class RMSpec(TurnScoringSpec, RMSettings):
    stage_name = "rm"
    resources: RMResources = Field(default_factory=RMResources)
    cache: CacheSpec = Field(default_factory=CacheSpec)


class RewardActor:
    """One reward model per actor: (id, conversation) batches in, rm columns out."""

    def __init__(self, model_path: str, max_turns: int | None, **backend: Any) -> None:
        from engine.backends import reward_scorer

        self.max_turns = max_turns
        self.scorer = reward_scorer(model_path, **backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pairs = plan_pairs(batch["conversation"].to_pylist(), self.max_turns)
        scores = self.scorer.score([(p.instruction, p.response) for p in pairs])
        return record_columns(batch["id"].to_pylist(), pairs, scores)

    def __del__(self) -> None:
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            scorer.close()


def check_model(spec: RMSpec) -> str:
    """The reward model's name; a clear error when the job names none."""
    if not spec.model:
        raise ValueError(
            "stages.rm.model: the rm signal needs a reward model (a hub name such as "
            "OpenAssistant/reward-model-deberta-v3-large-v2, pinned with stages.rm.revision, or "
            "a local folder); none is built in"
        )
    return spec.model


def run_rm(ctx: StageContext) -> dict[str, Any]:
    """Score every unique record into `signals/rm/` (id, rm_score, rm_turns, rm_reason)."""
    from engine.models import resolve_model

    spec: RMSpec = ctx.spec
    res = spec.resources
    model = check_model(spec)
    model_path = resolve_model(model, spec.revision)  # on the driver: actors never race
    kwargs = {
        "model_path": model_path,
        "max_turns": spec.max_turns,
        "dtype": spec.dtype,
        "max_length": spec.max_length,
        "max_batch_pairs": res.max_batch_pairs,
        "trust_remote_code": spec.trust_remote_code,
        "num_threads": res.threads(),
        "use_gpu": res.num_gpus > 0,
    }
    return score_records(ctx, RewardActor, kwargs, RM_SCHEMA)


def missing_model(job: JobSpec) -> str | None:
    """Config-time check: the rm signal needs a model named (before any work starts)."""
    try:
        check_model(job.stages.rm)
    except ValueError as error:
        return str(error)
    return None


STAGE = model_signal_stage(
    "rm",
    version=1,
    run=run_rm,
    spec=RMSpec,
    schema=RM_SCHEMA,
    model_of=lambda spec: spec.model or "",
    check=missing_model,
    description="reward-model score of (instruction, response) pairs (MoDS quality)",
)
