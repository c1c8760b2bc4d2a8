"""LM scoring stage: perplexity and IFD on a Ray actor pool, one model per actor, cached by content.

The actor plans which tokens to score (engine.signals.lm), hands the token ids to its backend
(transformers or vLLM, engine.backends.lm_scorer) and turns the NLLs into signal columns. The
score cache key is the stage's settings fingerprint (model identity, revision, backend,
definition, template, max_length, max_turns, dtype): a later run over the same rows, in any
corpus, reads them instead of scoring again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from engine.signals.lm import (
    DEFAULT_MAX_LENGTH,
    LM_SCHEMA,
    Definition,
    plan_records,
    record_signals,
)
from engine.stages.actor_scoring import score_records
from engine.stages.contract import (
    ActorResources,
    CacheSpec,
    Settings,
    StageContext,
    TurnScoringSpec,
    model_signal_stage,
)

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class LMSettings(Settings):
    """Perplexity / IFD scoring (see engine.signals.lm for exactly which tokens are scored)."""

    model: str = "builtin:smollm2-135m"
    revision: str | None = None
    backend: Literal["transformers", "vllm"] = "transformers"
    definition: Definition = Field(
        default="winnow",
        description="winnow: Winnow's IFD (templates, chats); cherry / superfiltering: the "
        "papers' reference code exactly (their own templates; `template` does not apply)",
    )
    template: Literal["alpaca", "plain", "chat"] = "alpaca"
    max_length: Annotated[int, Field(ge=16)] = Field(
        default=1024, description="tokens per sequence; unset with definition cherry: 512"
    )
    max_turns: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="score only the first N scorable assistant turns of each record"
    )
    dtype: Dtype = Field(
        default="auto", description="auto: bf16 where native, else fp32; float32: fp32 end to end"
    )
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _definition_max_length(cls, data: Any) -> Any:
        """max_length left unset takes the definition's reference default (Cherry LLM: 512)."""
        if isinstance(data, dict) and "max_length" not in data:
            definition = data.get("definition", "winnow")
            if definition in DEFAULT_MAX_LENGTH:
                data = {**data, "max_length": DEFAULT_MAX_LENGTH[definition]}
        return data


class LMResources(ActorResources):
    batch_size: Annotated[int, Field(ge=1)] = 32
    max_batch_tokens: Annotated[int, Field(ge=256)] = Field(
        default=8192, description="transformers: padded tokens per forward pass"
    )
    enforce_eager: bool = Field(default=True, description="vLLM: skip graph compilation")


class LMSpec(TurnScoringSpec, LMSettings):
    stage_name = "lm"
    resources: LMResources = Field(default_factory=LMResources)
    cache: CacheSpec = Field(default_factory=CacheSpec)


class LMScoringActor:
    """One model per actor: (id, conversation) batches in, LM signal columns out."""

    def __init__(
        self,
        model_path: str,
        template: str,
        max_length: int,
        max_turns: int | None,
        definition: Definition = "winnow",
        **backend: Any,
    ) -> None:
        from engine.backends import lm_scorer
        from engine.backends.hf import load_tokenizer

        self.tokenizer = load_tokenizer(model_path, backend["trust_remote_code"])
        self.template, self.max_length, self.max_turns = template, max_length, max_turns
        self.definition = definition
        # Cherry's direct side may run 4 tokens past max_length (its "+ 4"): room for it in vLLM.
        room = max_length + 4 if definition == "cherry" else max_length
        self.scorer = lm_scorer(model_path=model_path, max_length=room, **backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch["id"].to_pylist()
        plan = plan_records(
            self.tokenizer,
            batch["conversation"].to_pylist(),
            self.max_length,
            self.max_turns,
            self.definition,
            self.template,  # type: ignore[arg-type]
        )
        turns = plan.turns
        nll = self.scorer.token_nll([p.cond for p in turns] + [p.direct for p in turns])
        signals = record_signals(ids, turns, nll[: len(turns)], nll[len(turns) :], plan.skipped)
        return pa.Table.from_batches([signals])

    def __del__(self) -> None:
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            scorer.close()


def run_lm(ctx: StageContext) -> dict[str, Any]:
    from engine.models import resolve_model

    spec: LMSpec = ctx.spec
    res = spec.resources
    model_path = resolve_model(spec.model, spec.revision)  # on the driver: actors never race
    kwargs = {
        "model_path": model_path,
        "template": spec.template,
        "definition": spec.definition,
        "max_length": spec.max_length,
        "max_turns": spec.max_turns,
        "backend": spec.backend,
        "dtype": spec.dtype,
        "max_batch_tokens": res.max_batch_tokens,
        "trust_remote_code": spec.trust_remote_code,
        "enforce_eager": res.enforce_eager,
        "num_threads": res.threads(),
        "use_gpu": res.num_gpus > 0,
    }
    return {**score_records(ctx, LMScoringActor, kwargs, LM_SCHEMA), "backend": spec.backend}


STAGE = model_signal_stage(
    "lm",
    version=1,
    run=run_lm,
    spec=LMSpec,
    schema=LM_SCHEMA,
    description="perplexity and IFD (Cherry LLM, Superfiltering)",
)
