"""The job spec: one pydantic model, validated in full before any work starts.

CLI flags only fill this model in, so `winnow select ...` and `winnow run JOB.yaml` run the same
thing. Unknown keys are errors (a typo must not silently fall back to a default), and every error
names the path of the bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from engine import reasons
from engine.readers.sources import CONTAINERS
from engine.records import SCHEMAS
from engine.selection.filters import Rule, RuleError
from engine.selection.hygiene import HygieneSpec
from engine.stages.contract import Strict
from engine.stages.minhash import NearDupSpec
from engine.stages.registry import (
    CONFIGURED,
    column_kind,
    column_types,
    enabled_stages,
    known_signal,
    signal_for_column,
    signal_names,
    signal_stages,
)


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
        if reasons.is_reserved(value):
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
    FilterSpec(reject_if="empty_response == true", reason=reasons.EMPTY_RESPONSE),
    FilterSpec(reject_if="refusal == true", reason=reasons.REFUSAL),
    FilterSpec(reject_if="non_printable_ratio > 0.05", reason=reasons.NON_PRINTABLE),
    FilterSpec(reject_if="repeated_line_ratio > 0.5", reason=reasons.REPEATED_LINES),
]

# Presets: a named selection rule. Smarter selectors are always compared with these two.
# A preset named after a paper reproduces that paper's reference code: `fixed` settings are its
# method (a job may not change them), `defaults` its parameters (a job may). Winnow's own
# variants (`ifd`, `kcenter`, `facility_location`, `deita` on MiniLM) sit beside them under their
# own names; README "Presets" says how each differs from its paper.
PRESETS: dict[str, dict[str, Any]] = {
    "random": {"score": None},
    "longest": {"score": "assistant_chars", "order": "desc"},
    # Winnow's IFD (stages.lm.definition winnow: chat-aware, multi-turn, the answer scored after
    # a start token on the direct side): drop IFD >= 1 (the prompt does not help), best first.
    "ifd": {
        "score": "ifd",
        "order": "desc",
        "requires": "lm",
        "reject_if": ("ifd >= 1", reasons.IFD_NOT_BELOW_1),
    },
    # Cherry LLM (data_analysis.py + data_by_IFD.py): its IFD, `if mean_rate > 1: continue`, top-k.
    "cherry": {
        "score": "ifd",
        "order": "desc",
        "requires": "lm",
        "reject_if": ("ifd > 1", reasons.IFD_ABOVE_1),
        "fixed": {"stages.lm.definition": "cherry"},
    },
    # Superfiltering (code_ifd/data_analysis.py + select_data.py): GPT-2-style IFD-ppl, keep
    # ifd_ppl < filter_threash (1), best first.
    "superfilter": {
        "score": "ifd_ppl",
        "order": "desc",
        "requires": "lm",
        "reject_if": ("ifd_ppl >= 1", reasons.IFD_PPL_NOT_BELOW_1),
        "fixed": {"stages.lm.definition": "superfiltering"},
    },
    # Superfiltering.D (code_diversity_fla/do_fla.py): the top IFD-ppl rows (10x the budget: the
    # README's 20% then 2%), then facility location with submodlib's euclidean kernel on MiniLM
    # embeddings of instruction/input/output (512 tokens).
    "superfilter_d": {
        "score": "ifd_ppl",
        "order": "desc",
        "requires": "lm",
        "needs": "embed",
        "selector": "facility_location",
        "reject_if": ("ifd_ppl >= 1", reasons.IFD_PPL_NOT_BELOW_1),
        "fixed": {
            "stages.lm.definition": "superfiltering",
            "stages.embed.text": "superfiltering",
            "select.diversity.facility_similarity": "euclidean",
        },
        "defaults": {"stages.embed.max_seq_length": 512, "select.diversity.prefilter_ratio": 10},
    },
    # AlpaGasus: keep rows the judge rates >= 4.5 of 5, best first.
    "alpagasus": {
        "score": "judge_alpagasus",
        "order": "desc",
        "reject_if": ("judge_alpagasus < 4.5", reasons.ALPAGASUS_BELOW_4_5),
    },
    # DEITA: best evol score first, skipping rows too close to one already kept (MiniLM by
    # default, with its calibrated threshold; stages.embed.backend causal_lm is DEITA's own).
    "deita": {"score": "judge_deita_score", "order": "desc", "selector": "deita", "needs": "embed"},
    # Winnow's k-center greedy (order-independent: a score, when set, picks the first center).
    "kcenter": {"score": None, "selector": "kcenter", "needs": "embed"},
    # MoDS (run.py, kcenter_greedy.py): k-center greedy on instruction-only embeddings from a
    # seeded random first center.
    "mods": {
        "score": None,
        "selector": "kcenter",
        "needs": "embed",
        "fixed": {"stages.embed.text": "mods", "select.diversity.kcenter_first": "random"},
    },
    # Winnow's facility location (cosine coverage of the eligible rows, lazy greedy).
    "facility_location": {"score": None, "selector": "facility_location", "needs": "embed"},
}

PresetName = Literal[
    "random",
    "longest",
    "ifd",
    "cherry",
    "superfilter",
    "superfilter_d",
    "alpagasus",
    "deita",
    "kcenter",
    "mods",
    "facility_location",
]


class SemanticDupSpec(Strict):
    """Semantic duplicates: embedding cosine similarity, groups of the threshold graph (every
    pair by a blocked GEMM up to flat_max_rows, FAISS k-means lists above)."""

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
    """Options of the diversity selectors: Winnow's defaults, and each paper's reference
    behaviour under its own values (engine.selection.diversity)."""

    threshold: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None,
        description="deita: skip a row this similar (cosine) to one already kept; null = the "
        "calibrated default of stages.embed.backend (causal_lm: DEITA's 0.9; "
        "sentence_transformers: MiniLM's calibrated value)",
    )
    kcenter_first: Literal["score", "random"] = Field(
        default="score",
        description="kcenter: score = the best ranking score, else a seeded hash (Winnow, "
        "order-independent); random = MoDS: a seeded np.random choice, Euclidean distance, "
        "ties to the first row in input order",
    )
    facility_similarity: Literal["cosine", "euclidean"] = Field(
        default="cosine",
        description="facility_location: cosine = max(0, cos), ties by id (Winnow); euclidean = "
        "submodlib's exp(-|a-b|/dim) kernel, dense, LazyGreedy ties (Superfiltering.D)",
    )
    prefilter_rows: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="facility_location: first keep this many best rows by the ranking score "
        "(Superfiltering.D's ifd_num)",
    )
    prefilter_ratio: Annotated[float, Field(ge=1)] | None = Field(
        default=None,
        description="facility_location: first keep ratio x budget best rows by the ranking "
        "score (Superfiltering.D's README setting, 20% then 2%: 10)",
    )

    @model_validator(mode="after")
    def _one_prefilter(self) -> DiversitySpec:
        if self.prefilter_rows is not None and self.prefilter_ratio is not None:
            raise ValueError("set prefilter_rows or prefilter_ratio, not both")
        return self

    def prefilter(self, k: int) -> int | None:
        """Rows the facility-location prefilter keeps for a budget of `k` (None: no prefilter)."""
        if self.prefilter_rows is not None:
            return self.prefilter_rows
        if self.prefilter_ratio is not None:
            return max(k, int(-((1e-9 - self.prefilter_ratio * k) // 1)))  # ceil
        return None


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
    hygiene: HygieneSpec = Field(
        default_factory=HygieneSpec,
        description="rules for degenerate rows, applied under every preset in addition to filters",
    )
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
        """The configured filters, the hygiene rules (whatever `filters` says), then the preset's
        own rule (e.g. `ifd >= 1` for `ifd`)."""
        rules = [f.rule() for f in self.filters]
        rules.extend(self.hygiene.rules())
        preset_rule = PRESETS[self.preset].get("reject_if")
        if preset_rule:
            rules.append(Rule.parse(*preset_rule))
        return rules


class SparkSpec(Strict):
    """`master: local[N]` runs as `local[N,4]`: a failed task (a killed Python worker) is
    retried as on a cluster (`spark.task.maxFailures` in `conf` sets the 4; `local[N,F]` or a
    cluster master is used as given: engine.runtime.spark.local_master_with_retries)."""

    master: str = "local[*]"
    driver_memory: str = "4g"
    shuffle_partitions: Annotated[int, Field(ge=1)] = 8
    conf: dict[str, str] = Field(default_factory=dict)


class RaySpec(Strict):
    address: str | None = Field(default=None, description="None starts a local Ray")
    num_cpus: Annotated[int, Field(ge=1)] | None = None


Arm = Literal["selected", "random", "full"]


class EvalSpec(Strict):
    """The evaluation loop run after export: fine-tune the base model on each arm with one
    recipe (`stages.train`), answer the evaluation prompts (`stages.generate`), and judge each
    arm's answers against the baseline's in both orders (`stages.judge_pairwise`).

    Arms: `selected` (selected.jsonl), `random` (random_baseline.jsonl: same size, same pool),
    `full` (every eligible row, as Cherry LLM and AlpaGasus compare); `base` is the untrained
    base model (answers only)."""

    arms: Annotated[list[Arm], Field(min_length=1)] = Field(
        default_factory=lambda: ["selected", "random"], description="arms to fine-tune"
    )
    baseline: Literal["selected", "random", "full", "base"] = Field(
        default="random", description="every other arm is judged against this one"
    )
    base_model: bool = Field(
        default=False, description="also answer (and judge) with the untrained base model"
    )

    @model_validator(mode="after")
    def _baseline_present(self) -> EvalSpec:
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"eval.arms: an arm is named twice: {self.arms}")
        if self.baseline == "base" and not self.base_model:
            raise ValueError("eval.baseline: base needs eval.base_model: true")
        if self.baseline != "base" and self.baseline not in self.arms:
            raise ValueError(f"eval.baseline: {self.baseline!r} is not one of eval.arms")
        if len(self.answering_arms()) < 2:
            raise ValueError("eval.arms: at least two arms (or one and base_model) to compare")
        return self

    def trained_arms(self) -> tuple[str, ...]:
        return tuple(self.arms)

    def answering_arms(self) -> tuple[str, ...]:
        """Every arm that answers the evaluation prompts (trained arms, then `base`)."""
        return (*self.arms, *(("base",) if self.base_model else ()))

    def judged_pairs(self) -> tuple[tuple[str, str], ...]:
        """(arm, baseline) for every answering arm other than the baseline."""
        return tuple((a, self.baseline) for a in self.answering_arms() if a != self.baseline)


def _stages_model() -> type[BaseModel]:
    """`stages:`: one block per configured stage, each declared by its stage (the registry)."""
    fields: dict[str, Any] = {s.name: (s.spec, Field(default_factory=s.spec)) for s in CONFIGURED}
    return create_model("StagesSpec", __base__=Strict, **fields)


StagesSpec = _stages_model()


def _apply_preset_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in the settings the job's preset prescribes (`PRESETS[name]["fixed"|"defaults"]`,
    dotted paths from the job's root).

    A preset that reproduces a paper fixes how its score is computed (`cherry` scores with Cherry
    LLM's IFD definition): a `fixed` field the job leaves unset gets the preset's value, and one
    set to another value is an error naming it, because the result would no longer be the paper's
    (pick the Winnow preset, or `select.score`, to rank by a differently computed signal).
    `defaults` are the paper's parameters (e.g. Superfiltering.D's pre-filter ratio): filled in
    where unset, a job may change them.
    """
    select = data.get("select")
    name = select.get("preset") if isinstance(select, dict) else getattr(select, "preset", None)
    preset = PRESETS.get(name or "longest", {})
    prescribed = [(p, v, True) for p, v in preset.get("fixed", {}).items()]
    prescribed += [(p, v, False) for p, v in preset.get("defaults", {}).items()]
    if not prescribed:
        return data
    data = dict(data)
    for path, value, fixed in prescribed:
        *parents, leaf = path.split(".")
        block: Any = data
        for key in parents:
            child = block.get(key)
            if child is None:
                child = {}
            if not isinstance(child, dict):
                break  # a non-mapping block is reported by that field's own validation
            block[key] = child = dict(child)
            block = child
        else:
            if leaf not in block:
                block[leaf] = value
            elif fixed and block[leaf] != value:
                raise ValueError(
                    f"{path}: preset {name} computes its score with {path} = {value!r} (the "
                    f"paper's method); got {block[leaf]!r}. Use another preset, or select.score "
                    "to rank by a differently computed signal"
                )
    return data


class JobSpec(Strict):
    inputs: Annotated[list[InputSpec], Field(min_length=1)]
    out: str | None = None
    seed: int = 0
    signals: list[str] = Field(default_factory=list)
    ingest: IngestSpec = Field(default_factory=IngestSpec)
    select: SelectSpec = Field(default_factory=SelectSpec)
    spark: SparkSpec = Field(default_factory=SparkSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    stages: StagesSpec = Field(default_factory=StagesSpec)  # type: ignore[valid-type]
    eval: EvalSpec | None = Field(
        default=None, description="fine-tune and evaluate the selection (engine.evaluation)"
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_settings(cls, data: Any) -> Any:
        return _apply_preset_settings(data) if isinstance(data, dict) else data

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
        for stage in enabled_stages(self):
            problem = stage.check(self) if stage.check is not None else None
            if problem:
                raise ValueError(problem)
        from engine.models import remote_code_problems

        # Code shipped with a model or dataset is refused before any work (supply chain).
        problems = remote_code_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
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
        return [s.name for s in signal_stages(self)]


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
