"""LM scoring stage: perplexity and IFD on a Ray actor pool, one model per actor, cached by content.

The actor plans which tokens to score (engine.signals.lm), hands the token ids to its backend
(transformers or vLLM) and turns the NLLs into signal columns. The score cache key is
(id, fingerprint), where the fingerprint covers model, revision, template, max_length, backend
and dtype: a later run over the same rows (in any corpus) reads them instead of scoring again.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import pyarrow as pa

from engine.cache import ScoreCache
from engine.config import JobSpec, LMStageSpec
from engine.models import BUILTIN_MODELS, resolve_model
from engine.runtime.rundir import RunDir, fingerprint
from engine.signals.lm import LM_SCHEMA, plan_turns, record_signals
from engine.stages.actor_scoring import ActorStage, run_actor_stage

# Bump when the definition of the numbers changes (which tokens are scored, truncation, pooling).
LM_SCORING_VERSION = 1


def load_scorer(
    backend: str,
    model_path: str,
    dtype: str,
    max_length: int,
    max_batch_tokens: int,
    trust_remote_code: bool,
    enforce_eager: bool,
    num_threads: int | None,
) -> Any:
    """Build the backend named in the config (imported lazily: vLLM is heavy)."""
    if backend == "vllm":
        from engine.backends.vllm_lm import VllmScorer

        return VllmScorer(
            model_path,
            dtype=vllm_dtype(dtype),
            max_model_len=max_length + 1,  # vLLM keeps one position for the token it generates
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
        )
    from engine.backends.transformers_lm import TransformersScorer

    return TransformersScorer(
        model_path,
        dtype=dtype,
        max_batch_tokens=max_batch_tokens,
        trust_remote_code=trust_remote_code,
        num_threads=num_threads,
    )


def vllm_dtype(dtype: str) -> str:
    """vLLM's "auto" means the checkpoint's dtype (fp32 for the converted built-in); ours means
    bf16 where the hardware computes it natively, else fp32 (emulated bf16 is ~5x slower here)."""
    if dtype != "auto":
        return dtype
    import torch

    from engine.backends.transformers_lm import resolve_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(resolve_dtype("auto", device)).removeprefix("torch.")


class LMScoringActor:
    """One model per actor: (id, conversation) batches in, LM signal columns out."""

    def __init__(
        self,
        model_path: str,
        template: str,
        max_length: int,
        max_turns: int | None,
        **backend: Any,
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=backend["trust_remote_code"]
        )
        self.template, self.max_length, self.max_turns = template, max_length, max_turns
        self.scorer = load_scorer(model_path=model_path, max_length=max_length, **backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch["id"].to_pylist()
        plans = plan_turns(
            self.tokenizer,
            batch["conversation"].to_pylist(),
            self.template,
            self.max_length,
            self.max_turns,
        )
        nll = self.scorer.token_nll([p.cond for p in plans] + [p.direct for p in plans])
        signals = record_signals(ids, plans, nll[: len(plans)], nll[len(plans) :])
        return pa.Table.from_batches([signals])


def scorer_fingerprint(spec: LMStageSpec) -> str:
    """What changes the numbers; resources (CPUs, batch sizes, pool size) do not."""
    model: str = spec.model
    builtin = BUILTIN_MODELS.get(spec.model)
    if builtin is not None:
        model = (
            f"{spec.model}@{builtin.package}=={metadata.version(builtin.package.replace('_', '-'))}"
        )
    return fingerprint(
        "lm",
        LM_SCORING_VERSION,
        model,
        spec.revision,
        spec.template,
        spec.max_length,
        spec.max_turns,
        spec.backend,
        spec.dtype,
    )


def run_lm(job: JobSpec, run: RunDir) -> dict:
    spec = job.stages.lm
    model_path = resolve_model(spec.model, spec.revision)  # on the driver: actors never race
    key = scorer_fingerprint(spec)
    stage = ActorStage(
        name="lm",
        actor_cls=LMScoringActor,
        constructor_kwargs={
            "model_path": model_path,
            "template": spec.template,
            "max_length": spec.max_length,
            "max_turns": spec.max_turns,
            "backend": spec.backend,
            "dtype": spec.dtype,
            "max_batch_tokens": spec.max_batch_tokens,
            "trust_remote_code": spec.trust_remote_code,
            "enforce_eager": spec.enforce_eager,
            "num_threads": max(1, math.ceil(spec.num_cpus)),
        },
        spec=spec,
        schema=LM_SCHEMA,
        cache=ScoreCache(spec.cache_dir, key, LM_SCHEMA) if spec.cache else None,
    )
    info = run_actor_stage(stage, run)
    return {**info, "model": spec.model, "backend": spec.backend, "fingerprint": key}
