"""The job spec: one pydantic model, validated in full before any work starts.

CLI flags only fill this model in, so `winnow select ...` and `winnow run JOB.yaml` run the same
thing. Unknown keys are errors (a typo must not silently fall back to a default), and every error
names the path of the bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.readers.sources import CONTAINERS
from engine.records import SCHEMAS
from engine.selection.filters import Rule, RuleError
from engine.signals.registry import (
    MODEL_SIGNAL_COLUMNS,
    RESERVED_REASONS,
    SIGNAL_NAMES,
    column_kind,
    columns_for,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(Strict):
    path: str = Field(description="file, folder, builtin:sharegpt, or hf:NAME[#SPLIT]")
    format: str | None = Field(
        default=None, description="container (json|jsonl|parquet|hf), schema, or CONTAINER:SCHEMA"
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for part in value.split(":"):
            if part not in CONTAINERS and part not in SCHEMAS:
                known = ", ".join((*CONTAINERS, *SCHEMAS))
                raise ValueError(f"unknown format {part!r}; known: {known}")
        return value

    @property
    def container(self) -> str | None:
        parts = (self.format or "").split(":")
        return next((p for p in parts if p in CONTAINERS), None)

    @property
    def schema_name(self) -> str | None:
        parts = (self.format or "").split(":")
        return next((p for p in parts if p in SCHEMAS), None)


class SampleSpec(Strict):
    """Sampling per source, for demos and dry runs; the manifest says when it was applied."""

    fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_rows: Annotated[int, Field(ge=1)] | None = None


class IngestSpec(Strict):
    max_record_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    shard_rows: Annotated[int, Field(ge=100)] = 20_000
    sample: SampleSpec | None = None


class FilterSpec(Strict):
    reject_if: str
    reason: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_:.-]*$")]

    @field_validator("reason")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_REASONS or value.startswith("quarantine"):
            raise ValueError(f"reason {value!r} is reserved for Winnow's own decisions")
        return value

    @field_validator("reject_if")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            Rule.parse(value, "check")
        except RuleError as exc:
            raise ValueError(str(exc)) from exc
        return value

    def rule(self) -> Rule:
        return Rule.parse(self.reject_if, self.reason)


DEFAULT_FILTERS = [
    FilterSpec(reject_if="empty_response == true", reason="empty_response"),
    FilterSpec(reject_if="refusal == true", reason="refusal"),
    FilterSpec(reject_if="non_printable_ratio > 0.05", reason="non_printable"),
    FilterSpec(reject_if="repeated_line_ratio > 0.5", reason="repeated_lines"),
]

# Presets: a named selection rule. Smarter selectors are always compared with these two.
PRESETS: dict[str, dict[str, Any]] = {
    "random": {"score": None},
    "longest": {"score": "assistant_chars", "order": "desc"},
    # Cherry LLM and Superfiltering: drop IFD >= 1 (the prompt does not help), keep the highest.
    "ifd": {
        "score": "ifd",
        "order": "desc",
        "requires": "lm",
        "reject_if": ("ifd >= 1", "ifd_not_below_1"),
    },
    "superfilter": {
        "score": "ifd_ppl",
        "order": "desc",
        "requires": "lm",
        "reject_if": ("ifd_ppl >= 1", "ifd_ppl_not_below_1"),
    },
}


class SelectSpec(Strict):
    preset: Literal["random", "longest", "ifd", "superfilter"] = "longest"
    score: str | None = Field(default=None, description="signal column to rank by (overrides)")
    order: Literal["desc", "asc"] = "desc"
    budget: int | float | None = Field(
        default=None, description="rows (int >= 1) or a fraction of eligible rows (0 < f <= 1)"
    )
    filters: list[FilterSpec] = Field(default_factory=lambda: list(DEFAULT_FILTERS))

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("budget must be a number")
        if isinstance(value, int):
            if value < 1:
                raise ValueError("a row budget must be >= 1")
            return value
        if not 0 < value <= 1:
            raise ValueError("a fractional budget must be in (0, 1]; write rows as an integer")
        return value

    def ranking_score(self) -> str | None:
        return self.score if self.score is not None else PRESETS[self.preset]["score"]

    def rules(self) -> list[Rule]:
        """The configured filters, then the preset's own rule (e.g. `ifd >= 1` for `ifd`)."""
        rules = [f.rule() for f in self.filters]
        preset_rule = PRESETS[self.preset].get("reject_if")
        if preset_rule:
            rules.append(Rule.parse(*preset_rule))
        return rules


class SparkSpec(Strict):
    master: str = "local[*]"
    driver_memory: str = "4g"
    shuffle_partitions: Annotated[int, Field(ge=1)] = 8
    conf: dict[str, str] = Field(default_factory=dict)


class RaySpec(Strict):
    address: str | None = Field(default=None, description="None starts a local Ray")
    num_cpus: Annotated[int, Field(ge=1)] | None = None


class ActorSpec(Strict):
    """Resources of one model-backed stage's actor pool; the executor decides placement."""

    model: str = "builtin:smollm2-135m"
    num_cpus: Annotated[float, Field(gt=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    concurrency: Annotated[int, Field(ge=1)] = 1
    batch_size: Annotated[int, Field(ge=1)] = 256
    trust_remote_code: bool = False


class LMStageSpec(ActorSpec):
    """Perplexity / IFD scoring (see engine.signals.lm for exactly which tokens are scored)."""

    backend: Literal["transformers", "vllm"] = "transformers"
    revision: str | None = None
    template: Literal["alpaca", "plain", "chat"] = "alpaca"
    max_length: Annotated[int, Field(ge=16)] = 1024
    max_turns: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="score only the first N assistant turns of each record"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: Annotated[int, Field(ge=1)] = 32
    max_batch_tokens: Annotated[int, Field(ge=256)] = 8192
    num_cpus: Annotated[float, Field(gt=0)] = 1.0
    enforce_eager: bool = True
    cache: bool = True
    cache_dir: str | None = Field(default=None, description="default: $WINNOW_CACHE/scores")


class StagesSpec(Strict):
    tokens: ActorSpec = Field(default_factory=ActorSpec)
    lm: LMStageSpec = Field(default_factory=LMStageSpec)


class JobSpec(Strict):
    inputs: Annotated[list[InputSpec], Field(min_length=1)]
    out: str | None = None
    seed: int = 0
    signals: list[str] = Field(default_factory=list)
    ingest: IngestSpec = Field(default_factory=IngestSpec)
    select: SelectSpec = Field(default_factory=SelectSpec)
    spark: SparkSpec = Field(default_factory=SparkSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    stages: StagesSpec = Field(default_factory=StagesSpec)

    @field_validator("signals")
    @classmethod
    def _known_signals(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in SIGNAL_NAMES:
                raise ValueError(f"unknown signal {name!r}; known: {', '.join(SIGNAL_NAMES)}")
        return [name for name in dict.fromkeys(value) if name != "indicators"]

    @model_validator(mode="after")
    def _columns_exist(self) -> JobSpec:
        needed = PRESETS[self.select.preset].get("requires")
        if needed and needed not in self.signals:
            self.signals = [*self.signals, needed]  # a preset brings the signal it ranks by
        available = set(columns_for(self.signals))
        hint = "; enable the signal that produces it with --signals"
        for i, spec in enumerate(self.select.filters):
            rule = spec.rule()
            where = f"select.filters[{i}].reject_if"
            if rule.column not in available:
                raise ValueError(f"{where}: unknown signal column {rule.column!r}{hint}")
            kind = column_kind(rule.column)
            is_bool = isinstance(rule.value, bool)
            if (kind == "bool") != is_bool or isinstance(rule.value, str):
                expected = "true or false" if kind == "bool" else "a number"
                raise ValueError(f"{where}: {rule.column} is compared with {expected}")
            if kind == "bool" and rule.op not in ("==", "!="):
                raise ValueError(f"{where}: {rule.column} is true/false; use == or !=")
        score = self.select.ranking_score()
        if score is not None and score not in available:
            raise ValueError(f"select.score: unknown signal column {score!r}{hint}")
        return self

    def model_signals(self) -> list[str]:
        return [name for name in self.signals if name in MODEL_SIGNAL_COLUMNS]


class ConfigError(ValueError):
    """A job spec that fails validation; the message names each bad field by its path."""


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return "\n".join(lines)


def parse_job(data: dict[str, Any]) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read job spec {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec is a mapping of keys, got {type(data).__name__}")
    return parse_job(data)
