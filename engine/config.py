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
from engine.signals.judge_schema import BUILTIN_JUDGES
from engine.signals.registry import (
    RESERVED_REASONS,
    STAGE_ORDER,
    column_kind,
    column_types,
    known_signal,
    signal_for_column,
    signal_names,
    stage_of,
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
    # AlpaGasus: keep rows the judge rates >= 4.5 of 5, best first.
    "alpagasus": {
        "score": "judge_alpagasus",
        "order": "desc",
        "reject_if": ("judge_alpagasus < 4.5", "judge_alpagasus_below_4.5"),
    },
    # DEITA: best evol score first, skipping rows too close to one already kept.
    "deita": {"score": "judge_deita_score", "order": "desc", "selector": "deita", "needs": "embed"},
    # MoDS: k-center greedy over embeddings (a score, when set, only picks the first center).
    "kcenter": {"score": None, "selector": "kcenter", "needs": "embed"},
    # Superfiltering.D: facility location (coverage of the eligible rows), lazy greedy.
    "facility_location": {"score": None, "selector": "facility_location", "needs": "embed"},
}

PresetName = Literal[
    "random",
    "longest",
    "ifd",
    "superfilter",
    "alpagasus",
    "deita",
    "kcenter",
    "facility_location",
]


class NearDupSpec(Strict):
    """Fuzzy duplicates: MinHash LSH over word shingles on Spark, pairs verified by Jaccard."""

    enabled: bool = True
    text: Literal["conversation", "instruction", "response"] = "conversation"
    shingle_words: Annotated[int, Field(ge=1, le=32)] = 5
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128
    bands: Annotated[int, Field(ge=1)] = 16
    threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.7, description="estimated Jaccard similarity a candidate pair must reach"
    )
    bucket_window: Annotated[int, Field(ge=1)] = Field(
        default=100,
        description="a row of an oversized LSH bucket is paired with the next N members by id",
    )

    @model_validator(mode="after")
    def _bands_divide(self) -> NearDupSpec:
        if self.num_perm % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")
        return self


class SemanticDupSpec(Strict):
    """Semantic duplicates: embedding cosine similarity (FAISS), groups of the threshold graph."""

    enabled: bool = True
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.95
    index: Literal["auto", "flat", "ivf"] = "auto"
    flat_max_rows: Annotated[int, Field(ge=1)] = Field(
        default=200_000, description="auto: exact search up to this many rows, IVF above"
    )


class DedupSpec(Strict):
    near: NearDupSpec = Field(default_factory=NearDupSpec)
    semantic: SemanticDupSpec = Field(default_factory=SemanticDupSpec)
    keep_by: str | None = Field(
        default=None,
        description="column deciding which member of a duplicate group is kept "
        "(default: the ranking score, else assistant_chars); ties by id",
    )
    keep_order: Literal["desc", "asc"] = "desc"


class DiversitySpec(Strict):
    threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9, description="deita: skip a row this similar (cosine) to one already kept"
    )


class QuotaSpec(Strict):
    """Budgets per group: proportional to the group's eligible rows, capped, or a minimum share."""

    by: Literal["source", "lang"]
    mode: Literal["proportional", "capped", "min_share"] = "proportional"
    cap: int | float | None = Field(
        default=None, description="capped: rows per group (int) or a fraction of the budget"
    )
    min_share: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="min_share: each group gets at least this share of the budget"
    )

    @model_validator(mode="after")
    def _mode_fields(self) -> QuotaSpec:
        if self.mode == "capped":
            if self.cap is None or isinstance(self.cap, bool):
                raise ValueError("mode capped needs cap (rows, or a fraction of the budget)")
            if isinstance(self.cap, int) and self.cap < 0:
                raise ValueError("cap must be >= 0")
            if isinstance(self.cap, float) and not 0 < self.cap <= 1:
                raise ValueError("a fractional cap must be in (0, 1]")
        if self.mode == "min_share" and self.min_share is None:
            raise ValueError("mode min_share needs min_share")
        return self


class LanguagesSpec(Strict):
    """Allow or deny languages (ISO 639-1 codes, "und" for undetermined) of the instruction side."""

    allow: list[Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]] = Field(default_factory=list)
    deny: list[Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]] = Field(default_factory=list)


class NormalizeSpec(Strict):
    """Scores made comparable across groups: adds `norm_<column>` for each column named here."""

    within: Literal["lang", "source"] = "lang"
    method: Literal["rank", "zscore"] = "rank"
    columns: Annotated[list[str], Field(min_length=1)]


class SelectSpec(Strict):
    preset: PresetName = "longest"
    score: str | None = Field(default=None, description="signal column to rank by (overrides)")
    order: Literal["desc", "asc"] = "desc"
    budget: int | float | None = Field(
        default=None, description="rows (int >= 1) or a fraction of eligible rows (0 < f <= 1)"
    )
    filters: list[FilterSpec] = Field(default_factory=lambda: list(DEFAULT_FILTERS))
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    diversity: DiversitySpec = Field(default_factory=DiversitySpec)
    quota: QuotaSpec | None = None
    languages: LanguagesSpec | None = None
    normalize: NormalizeSpec | None = None

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

    def selector(self) -> str:
        """rank, random, deita, kcenter or facility_location."""
        chosen = PRESETS[self.preset].get("selector")
        if chosen:
            return chosen
        return "rank" if self.ranking_score() is not None else "random"

    def keep_by(self) -> str:
        """Which column decides the member kept of a duplicate group."""
        return self.dedup.keep_by or self.ranking_score() or "assistant_chars"

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


class EmbedStageSpec(ActorSpec):
    """Sentence embeddings (sentence-transformers), L2-normalised float32, sidecar by id."""

    model: str = "builtin:all-minilm-l6-v2"
    revision: str | None = None
    text: Literal["instruction", "conversation", "response"] = Field(
        default="instruction",
        description="instruction only (MoDS) or the whole conversation (Superfiltering.D)",
    )
    max_seq_length: Annotated[int, Field(ge=8)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 128
    cache: bool = True
    cache_dir: str | None = Field(default=None, description="default: $WINNOW_CACHE/scores")


class LangStageSpec(Strict):
    """Language identification on Spark (lingua; its models ship in the wheel)."""

    languages: list[Annotated[str, Field(pattern=r"^[a-z]{2}$")]] | None = Field(
        default=None, description="restrict the detector to these ISO 639-1 codes (all if unset)"
    )
    min_chars: Annotated[int, Field(ge=1)] = Field(
        default=12, description="letters below which a side is undetermined ('und')"
    )
    min_confidence: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="lang_mismatch only when both sides are at least this confident"
    )
    accuracy: Literal["auto", "high", "low"] = Field(
        default="auto",
        description="lingua's mode; auto: low-accuracy (fast) mode for texts of 120+ characters",
    )


class OpenAISpec(Strict):
    """Any OpenAI-compatible endpoint (vllm serve, a commercial API)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = Field(default=None, description="served model name (default: the model)")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="environment variable holding the key"
    )
    concurrency: Annotated[int, Field(ge=1)] = 8
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    max_retries: Annotated[int, Field(ge=0)] = 6
    logprobs: bool = Field(
        default=True, description="ask for top log-probabilities (expected-value scoring)"
    )


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


class JudgeStageSpec(ActorSpec):
    """LLM-judge scoring; one stage runs every enabled `judge.<name>` with one model."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: Annotated[int, Field(ge=64)] = 2048
    max_turns: Annotated[int, Field(ge=1)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] = 8
    batch_size: Annotated[int, Field(ge=1)] = 16
    enforce_eager: bool = True
    openai: OpenAISpec = Field(default_factory=OpenAISpec)
    custom: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], CustomJudgeSpec] = Field(
        default_factory=dict
    )
    cache: bool = True
    cache_dir: str | None = Field(default=None, description="default: $WINNOW_CACHE/scores")

    @field_validator("custom")
    @classmethod
    def _not_builtin(cls, value: dict[str, CustomJudgeSpec]) -> dict[str, CustomJudgeSpec]:
        for name in value:
            if name in BUILTIN_JUDGES or name == "deita_score":
                raise ValueError(f"custom judge {name!r} would shadow a built-in judge")
        return value


class StagesSpec(Strict):
    tokens: ActorSpec = Field(default_factory=ActorSpec)
    lm: LMStageSpec = Field(default_factory=LMStageSpec)
    embed: EmbedStageSpec = Field(default_factory=EmbedStageSpec)
    lang: LangStageSpec = Field(default_factory=LangStageSpec)
    judge: JudgeStageSpec = Field(default_factory=JudgeStageSpec)


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

    @model_validator(mode="after")
    def _columns_exist(self) -> JobSpec:
        custom = tuple(self.stages.judge.custom)
        for name in self.signals:
            if not known_signal(name, custom):
                known = ", ".join(signal_names(custom))
                raise ValueError(f"signals: unknown signal {name!r}; known: {known}")
        signals = [name for name in dict.fromkeys(self.signals) if name != "indicators"]
        # What the selection needs is switched on, so `--select deita` alone is a complete job.
        spec = self.select
        wanted: list[str] = []
        for column in (spec.ranking_score(), spec.dedup.keep_by):
            if column is not None and not column.startswith("norm_"):
                wanted.extend(signal_for_column(column, custom) or [])
        if PRESETS[spec.preset].get("requires"):
            wanted.append(PRESETS[spec.preset]["requires"])
        if PRESETS[spec.preset].get("needs") or spec.dedup.semantic.enabled:
            wanted.append("embed")
        if spec.dedup.near.enabled:
            wanted.append("minhash")
        uses_lang = spec.languages is not None or (spec.quota and spec.quota.by == "lang")
        if uses_lang or (spec.normalize and spec.normalize.within == "lang"):
            wanted.append("lang")
        signals.extend(w for w in wanted if w not in signals)
        if signals != self.signals:
            self.signals = signals
        types = column_types(self.signals)
        if spec.normalize is not None:
            for i, column in enumerate(spec.normalize.columns):
                if column not in types or column_kind(types[column]) != "number":
                    raise ValueError(
                        f"select.normalize.columns[{i}]: {column!r} is not a numeric signal column"
                    )
                types[f"norm_{column}"] = types[column]
        hint = "; enable the signal that produces it with --signals"
        for i, filt in enumerate(spec.filters):
            rule = filt.rule()
            where = f"select.filters[{i}].reject_if"
            if rule.column not in types:
                raise ValueError(f"{where}: unknown signal column {rule.column!r}{hint}")
            kind = column_kind(types[rule.column])
            if kind not in ("bool", "number"):
                raise ValueError(f"{where}: {rule.column} is not a number or true/false")
            is_bool = isinstance(rule.value, bool)
            if (kind == "bool") != is_bool or isinstance(rule.value, str):
                expected = "true or false" if kind == "bool" else "a number"
                raise ValueError(f"{where}: {rule.column} is compared with {expected}")
            if kind == "bool" and rule.op not in ("==", "!="):
                raise ValueError(f"{where}: {rule.column} is true/false; use == or !=")
        for where, column in (
            ("select.score", spec.ranking_score()),
            ("select.dedup.keep_by", spec.keep_by()),
        ):
            if column is None:
                continue
            if column not in types:
                raise ValueError(f"{where}: unknown signal column {column!r}{hint}")
            if column_kind(types[column]) not in ("number", "bool"):
                raise ValueError(f"{where}: {column} is not a numeric column")
        return self

    def signal_stages(self) -> list[str]:
        """The stages the enabled signals need, in the order they run."""
        stages = {stage_of(name) for name in self.signals}
        return [name for name in STAGE_ORDER if name in stages]


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
