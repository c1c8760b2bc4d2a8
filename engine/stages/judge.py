"""LLM-judge stage: every enabled `judge.<name>` with one model on a Ray actor pool, cached per
judge.

Each judge is one part of the actor driver (engine.stages.actor_scoring) with a cache of its own,
so enabling another judge later scores only that judge. A judge's cache key comes from the
stage's settings less what cannot change that judge's numbers (the other judges, the backend
within a family: transformers and vLLM both give log-probabilities and share answers; the
endpoint), plus how the judge runs (`JudgeMethod.describe()`: its definition, prompt style and
scoring; `max_new_tokens` too where the reply is parsed). `scoring` and the per-judge
`alpagasus.prompt_style` / `deita.prompt_style` choose the method (`judge_methods`; the openai
backend refuses `deita.prompt_style: raw`, which needs the model's own tokenizer). Fenced prompts
are datamarked with the mark that is cheapest for the judge model's tokenizer (`judge_datamark`,
chosen on the driver, handed to the actors, part of each judge's cache key and of the stage
info; the openai backend, without a tokenizer, keeps DATAMARK). The judging
arithmetic lives in engine.signals.judge (`score_batch`); this module only wires it to the actor
pool.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator
from rich.markup import escape

from engine.cache import ScoreCache
from engine.runtime.rundir import fingerprint
from engine.signals.judge import (
    DATAMARK,
    DEITA_RAW_TEMPLATES,
    REASON_UNPARSED,
    JudgeMethod,
    choose_datamark,
    judge_definitions,
    judge_table,
    resolve_method,
    score_batch,
)
from engine.signals.judge_schema import BUILTIN_JUDGES, judge_fields, judge_schema
from engine.signals.turns import turn_rule_settings
from engine.stages.actor_scoring import NEEDS, ActorPool, run_actor_pool
from engine.stages.contract import (
    ActorResources,
    CacheSpec,
    Resources,
    Settings,
    StageContext,
    Strict,
    TurnScoringSpec,
    model_signal_stage,
    warn_moved,
)

if TYPE_CHECKING:
    from engine.backends.judge_openai import OpenAIEndpoint
    from engine.config import JobSpec

log = logging.getLogger(__name__)

JUDGE_PREFIX = "judge."
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def judge_names(signals: list[str]) -> list[str]:
    return [s.split(".", 1)[1] for s in signals if s.startswith(JUDGE_PREFIX)]


class OpenAISettings(Settings):
    """What an OpenAI-compatible endpoint answers with (where it lives is a resource)."""

    model: str | None = Field(default=None, description="served model name (default: the model)")
    logprobs: bool = Field(
        default=True, description="ask for top log-probabilities (expected-value scoring)"
    )


class AlpagasusSettings(Settings):
    """How the `alpagasus` judge is asked."""

    prompt_style: Literal["fenced", "reference"] = Field(
        default="fenced",
        description="fenced: the paper's words around fenced data, hardened system prompt; "
        "reference: the rating script's exact unfenced messages",
    )


class DeitaSettings(Settings):
    """How the `deita_quality` and `deita_complexity` judges are asked."""

    prompt_style: Literal["chat", "raw"] = Field(
        default="chat",
        description="chat: fenced chat prompt for a general judge; raw: the DEITA scorer "
        "models' own template, no chat template",
    )


class EndpointResources(Resources):
    """Where and how hard an OpenAI-compatible endpoint is asked, not what it answers."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="environment variable holding the key"
    )
    concurrency: Annotated[int, Field(ge=1)] = 8
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    max_retries: Annotated[int, Field(ge=0)] = 6


class CustomJudgeSpec(Strict):
    """A user-defined judge: the template gets the fenced {instruction} and {response}."""

    template: str
    scale: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [1, 10], description="[lowest, highest] integer score"
    )
    aggregation: Literal["mean", "min", "max", "first", "last", "sum"] = "mean"

    @field_validator("template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        for name in ("{instruction}", "{response}"):
            if name not in value:
                raise ValueError(f"template must contain {name}")
        return value

    @field_validator("scale")
    @classmethod
    def _ordered(cls, value: list[int]) -> list[int]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError("scale is [lowest, highest] with 0 <= lowest < highest <= 100")
        return value


class JudgeSettings(Settings):
    """LLM-judge scoring; one stage runs every enabled `judge.<name>` with one model."""

    model: str = "builtin:smollm2-135m"
    revision: str | None = None
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    dtype: Dtype = "auto"
    max_length: Annotated[int, Field(ge=64)] = 2048
    max_turns: Annotated[int, Field(ge=1)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] = Field(
        default=32, description="tokens generated for a reply that is parsed (scoring parse)"
    )
    scoring: Literal["reference", "expected", "parse"] = Field(
        default="reference",
        description="reference: each judge as its paper (AlpaGasus generate+parse, DEITA "
        "expected value); expected: expected value over the scale tokens; parse: generate and "
        "parse (Winnow's parser)",
    )
    alpagasus: AlpagasusSettings = Field(default_factory=AlpagasusSettings)
    deita: DeitaSettings = Field(default_factory=DeitaSettings)
    trust_remote_code: bool = False
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    custom: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], CustomJudgeSpec] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _raw_needs_tokenizer(self) -> JudgeSettings:
        if self.backend == "openai" and self.deita.prompt_style == "raw":
            raise ValueError(
                "stages.judge.deita.prompt_style: raw feeds the model a raw string through its "
                "own tokenizer; the openai backend speaks chat: use backend transformers or "
                "vllm, or prompt_style: chat"
            )
        return self

    @field_validator("custom")
    @classmethod
    def _not_builtin(cls, value: dict[str, CustomJudgeSpec]) -> dict[str, CustomJudgeSpec]:
        for name in value:
            if name in BUILTIN_JUDGES or name == "deita_score":
                raise ValueError(f"custom judge {name!r} would shadow a built-in judge")
        return value


class JudgeResources(ActorResources):
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_batch_prompts: Annotated[int, Field(ge=1)] = Field(
        default=16, description="transformers: prompts per forward pass"
    )
    enforce_eager: bool = Field(default=True, description="vLLM: skip graph compilation")
    endpoint: EndpointResources = Field(default_factory=EndpointResources)


class JudgeSpec(TurnScoringSpec, JudgeSettings):
    stage_name = "judge"
    resources: JudgeResources = Field(default_factory=JudgeResources)
    cache: CacheSpec = Field(default_factory=CacheSpec)

    @model_validator(mode="before")
    @classmethod
    def _legacy_endpoint(cls, data: Any) -> Any:
        """`openai:` once held the endpoint's address and limits too; they are resources now."""
        if not isinstance(data, dict) or not isinstance(data.get("openai"), dict):
            return data
        data = dict(data)
        openai = dict(data["openai"])
        moved = [k for k in EndpointResources.model_fields if k in openai]
        if moved:
            resources = dict(data.get("resources") or {})
            endpoint = dict(resources.get("endpoint") or {})
            for key in moved:
                endpoint.setdefault(key, openai.pop(key))
            resources["endpoint"] = endpoint
            data["resources"], data["openai"] = resources, openai
            warn_moved("judge", [f"openai.{k}" for k in moved], "resources.endpoint")
        return data


class JudgeActor:
    """One judge backend per actor: (id, conversation, needs) batches in, judge columns out.

    It gets the stage's block (never an API key: that is read from the actor's environment, so
    it cannot end up in Ray's logs of constructor arguments or in any output)."""

    def __init__(
        self, spec: dict[str, Any], model_path: str, names: list[str], mark: str | None = DATAMARK
    ) -> None:
        from engine.backends import judge_backend

        self.spec = JudgeSpec.model_validate(spec)
        self.names = names
        self.judges = judge_methods(self.spec, names, mark)
        self.backend = judge_backend(**_backend_args(self.spec, model_path))

    def __call__(self, batch: pa.Table) -> pa.Table:
        needed = None
        if NEEDS in batch.column_names:
            needed = [set(j) for j in batch[NEEDS].to_pylist()]
        columns = score_batch(
            self.backend,
            self.judges,
            batch["conversation"].to_pylist(),
            needed,
            self.spec.max_length,
            self.spec.max_turns,
        )
        schema = _rows_schema(self.names)
        data = {"id": batch["id"], **{f.name: columns[f.name] for f in schema if f.name != "id"}}
        return pa.table(data, schema=schema)

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def _rows_schema(names: list[str]) -> pa.Schema:
    """Per-judge columns only (the DEITA score is computed once all rows are together)."""
    fields = [pa.field("id", pa.string())]
    for name in names:
        fields.extend(judge_fields(name))
    return pa.schema(fields)


@functools.lru_cache(maxsize=8)
def _tokenizer_datamark(model: str, revision: str | None, trust_remote_code: bool) -> str | None:
    from engine.backends import hf
    from engine.models import resolve_model

    try:
        tokenizer = hf.load_tokenizer(resolve_model(model, revision), trust_remote_code)
    except (OSError, ValueError) as error:  # the actors will say why the model does not load
        log.warning("judge datamark: tokenizer of %s not loaded (%s); using %r", model, error,
                    DATAMARK)  # fmt: skip
        return DATAMARK
    return choose_datamark(tokenizer)


def judge_datamark(spec: JudgeSettings) -> str | None:
    """The datamark of the stage's fenced prompts: the cheapest for the judge model's tokenizer
    (`engine.signals.judge.choose_datamark`, cached per model), DATAMARK for the openai backend
    (the endpoint's tokenizer is not at hand)."""
    if spec.backend == "openai":
        return DATAMARK
    return _tokenizer_datamark(spec.model, spec.revision, spec.trust_remote_code)


def judge_methods(
    spec: JudgeSettings, names: list[str], mark: str | None = DATAMARK
) -> list[JudgeMethod]:
    """How each named judge runs under the stage's `scoring` and prompt styles, fenced prompts
    datamarked with `mark`."""
    methods = []
    for judge in judge_definitions(names, spec.custom):
        reference = (judge.name == "alpagasus" and spec.alpagasus.prompt_style == "reference") or (
            judge.name in DEITA_RAW_TEMPLATES and spec.deita.prompt_style == "raw"
        )
        style = "reference" if reference else "fenced"
        methods.append(resolve_method(judge, spec.scoring, style, mark))
    return methods


def judge_settings(job: JobSpec) -> dict[str, Any]:
    """The marker's settings: the stage's settings and which judges run."""
    return {**job.stages.judge.settings(), "judges": judge_names(job.signals)}


def judge_cache_keys(job: JobSpec) -> dict[str, str]:
    """One cache key per enabled judge (see the module docstring)."""
    from engine.models import model_identity

    spec: JudgeSpec = job.stages.judge
    settings = spec.settings()
    openai = spec.backend == "openai"
    family = "logprob" if not openai or spec.openai.logprobs else "text"
    model = (spec.openai.model or spec.model) if openai else model_identity(spec.model)
    shared = {k: settings[k] for k in ("revision", "max_length", "max_turns", "trust_remote_code")}
    shared.update(turn_rule_settings(spec.max_turns))
    shared.update(model=model, family=family, dtype=None if openai else spec.dtype)
    keys = {}
    for method in judge_methods(spec, judge_names(job.signals), judge_datamark(spec)):
        # a parsed reply depends on how much of it is generated
        extra = {"max_new_tokens": spec.max_new_tokens} if method.mode == "parse" else {}
        key = fingerprint("judge", STAGE.version, method.describe(), {**shared, **extra})
        keys[method.judge.name] = key
    return keys


def openai_endpoint(endpoint: EndpointResources, model: str, logprobs: bool) -> OpenAIEndpoint:
    """The OpenAI-compatible endpoint a judge actor asks. The API key is read here, in the
    actor, from its own environment: never passed in constructor arguments (Ray logs those),
    never stored in an output."""
    from engine.backends.judge_openai import OpenAIEndpoint
    from engine.models import cache_root

    key_env = endpoint.api_key_env
    return OpenAIEndpoint(
        base_url=endpoint.base_url,
        model=model,
        api_key=os.environ.get(key_env) if key_env else None,
        concurrency=endpoint.concurrency,
        timeout_s=endpoint.timeout_s,
        max_retries=endpoint.max_retries,
        logprobs=logprobs,
        request_cache_dir=str(cache_root() / "judge_requests"),
    )


def _backend_args(spec: JudgeSpec, model_path: str) -> dict[str, Any]:
    """What engine.backends.judge_backend needs (the endpoint: `openai_endpoint`)."""
    res = spec.resources
    endpoint = None
    if spec.backend == "openai":
        endpoint = openai_endpoint(
            res.endpoint, spec.openai.model or model_path, spec.openai.logprobs
        )
    return {
        "backend": spec.backend,
        "model_path": model_path,
        "dtype": spec.dtype,
        "max_length": spec.max_length,
        "max_new_tokens": spec.max_new_tokens,
        "max_batch_prompts": res.max_batch_prompts,
        "trust_remote_code": spec.trust_remote_code,
        "enforce_eager": res.enforce_eager,
        "num_threads": res.threads(),
        "use_gpu": res.num_gpus > 0,
        "openai": endpoint,
    }


def _warn_unparsed(ctx: StageContext, name: str, unparsed: int, rows: int) -> None:
    """Say so when most replies give no score: a judge too weak for its reply format (the
    built-in 135M model never opens a reply with AlpaGasus' score line) would otherwise only
    show up as a selection that rejects every row."""
    if rows and unparsed > rows // 2:
        ctx.log(
            f"warning: judge {name}: {unparsed} of {rows} rows got no score from the model's "
            "replies (judge_unparsed); use a stronger judge model, or stages.judge.scoring: "
            "expected"
        )


def run_judge(ctx: StageContext) -> dict[str, Any]:
    from engine.models import resolve_model

    job, spec = ctx.job, ctx.spec
    names = judge_names(job.signals)
    if not names:
        raise ValueError("the judge stage runs only with a judge.<name> signal enabled")
    judges = judge_definitions(names, spec.custom)
    model_path = (
        spec.model if spec.backend == "openai" else resolve_model(spec.model, spec.revision)
    )
    keys = judge_cache_keys(job)
    mark = judge_datamark(spec)
    parts = {judge.name: judge_schema([judge.name]) for judge in judges}
    caches = (
        {
            name: ScoreCache(
                spec.cache.dir, keys[name], parts[name], warn=lambda m: ctx.log(escape(m))
            )
            for name in parts
        }
        if spec.cache.enabled
        else {}
    )
    pool = ActorPool(
        name="judge",
        actor_cls=JudgeActor,
        constructor_kwargs={
            "spec": spec.model_dump(mode="json"),
            "model_path": model_path,
            "names": names,
            "mark": mark,
        },
        resources=spec.resources,
        parts=parts,
        caches=caches,
    )
    result = run_actor_pool(pool, ctx.run, ctx.progress)
    columns: dict[str, list] = {}
    info: dict[str, Any] = {"judges": {}}
    for judge in judges:
        rows = result.tables[judge.name]
        for f in judge_fields(judge.name):
            columns[f.name] = rows[f.name].to_pylist()
        values = np.asarray(
            [np.nan if v is None else v for v in columns[f"judge_{judge.name}"]], dtype=float
        )
        info["judges"][judge.name] = {
            "cache_hits": result.cache_hits[judge.name],
            "cache_misses": result.cache_misses[judge.name],
            "unparsed": sum(r == REASON_UNPARSED for r in columns[f"judge_{judge.name}_reason"]),
            "mean": float(np.nanmean(values)) if np.isfinite(values).any() else None,
            "fingerprint": keys[judge.name],
        }
        _warn_unparsed(ctx, judge.name, info["judges"][judge.name]["unparsed"], len(result.ids))
    sidecar = judge_table(result.ids, columns, names)
    ctx.run.write_sidecar("judge", sidecar)
    return {
        **info,
        "rows": len(result.ids),
        "scored": result.todo,
        "backend": spec.backend,
        "model": spec.model,
        "datamark": mark,
        "schema": sidecar.schema.names,
    }


STAGE = model_signal_stage(
    "judge",
    version=1,
    run=run_judge,
    spec=JudgeSpec,
    schema=lambda signals: judge_schema(judge_names(signals)),
    settings_of=judge_settings,
    cache_keys=judge_cache_keys,
    description="LLM-judge ratings (AlpaGasus, DEITA quality and complexity, custom)",
)
