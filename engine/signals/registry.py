"""Which signal columns exist, by signal name: the public contract of `scores.parquet`.

Config validation uses this to reject a filter or score over a column no enabled signal produces,
before any work starts. A signal is computed by a stage: Spark stages (lang, minhash) run over the
ingested records; Ray actor-pool stages (tokens, embed, lm, judge) hold a model per actor. All the
`judge.<name>` signals share one `judge` stage, so the judge model is loaded once.
"""

from __future__ import annotations

import pyarrow as pa

from engine.signals.embed import EMBED_SCHEMA
from engine.signals.indicators import INDICATOR_COLUMNS as INDICATOR_COLUMNS  # re-export
from engine.signals.indicators import INDICATOR_SCHEMA
from engine.signals.judge_schema import BUILTIN_JUDGES, DEITA_PAIR, judge_schema
from engine.signals.lang import LANG_SCHEMA
from engine.signals.lm import LM_SCHEMA
from engine.signals.minhash import MINHASH_SCHEMA
from engine.signals.tokens import TOKEN_SCHEMA

# Fixed-schema signals by the name `--signals` uses (judges are `judge.<name>`).
SIGNAL_SCHEMAS: dict[str, pa.Schema] = {
    "tokens": TOKEN_SCHEMA,
    "lm": LM_SCHEMA,
    "embed": EMBED_SCHEMA,
    "lang": LANG_SCHEMA,
    "minhash": MINHASH_SCHEMA,
}
SPARK_STAGES = ("lang", "minhash")
RAY_STAGES = ("tokens", "embed", "lm", "judge")
# Stages in the order they run; Spark ones first, so one Spark session serves ingest and them.
STAGE_ORDER = (*SPARK_STAGES, *RAY_STAGES)

# Reasons Winnow itself gives; a filter may not reuse them, or the counts would mix.
RESERVED_REASONS = (
    "exact_duplicate",
    "below_budget",
    "near_duplicate",
    "semantic_duplicate",
    "too_similar",
    "lang_not_allowed",
    "judge_unparsed",
    "judge_no_turn",
    "judge_injection",
    "score_missing",
)

# Columns that are not scalars: kept in their sidecar, never in scores.parquet or a filter.
VECTOR_COLUMNS = ("embedding",)


def stage_of(signal: str) -> str:
    return "judge" if signal.startswith("judge.") else signal


def judge_names(signals: list[str]) -> list[str]:
    return [s.split(".", 1)[1] for s in signals if s.startswith("judge.")]


def known_signal(signal: str, custom_judges: tuple[str, ...] = ()) -> bool:
    if signal.startswith("judge."):
        return signal.split(".", 1)[1] in (*BUILTIN_JUDGES, *custom_judges)
    return signal == "indicators" or signal in SIGNAL_SCHEMAS


def signal_names(custom_judges: tuple[str, ...] = ()) -> tuple[str, ...]:
    judges = tuple(f"judge.{n}" for n in (*BUILTIN_JUDGES, *custom_judges))
    return ("indicators", *SIGNAL_SCHEMAS, *judges)


def column_types(signals: list[str]) -> dict[str, pa.DataType]:
    """Every column available when `signals` are enabled (indicators always are), with its type."""
    types = {f.name: f.type for f in INDICATOR_SCHEMA if f.name != "id"}
    for name in signals:
        schema = SIGNAL_SCHEMAS.get(name)
        if schema is not None:
            types.update({f.name: f.type for f in schema if f.name != "id"})
    judges = judge_names(signals)
    if judges:
        types.update({f.name: f.type for f in judge_schema(judges) if f.name != "id"})
    return types


def columns_for(signals: list[str]) -> tuple[str, ...]:
    return tuple(column_types(signals))


def column_kind(dtype: pa.DataType) -> str:
    """'bool', 'number', 'string' or 'other': what a filter may compare the column with."""
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_string(dtype):
        return "string"
    return "other"


def signal_for_column(column: str, custom_judges: tuple[str, ...] = ()) -> list[str] | None:
    """The signals that produce `column` (so a preset can switch them on), or None."""
    for name, schema in SIGNAL_SCHEMAS.items():
        if column in schema.names[1:]:
            return [name]
    if column == "judge_deita_score":
        return [f"judge.{n}" for n in DEITA_PAIR]
    for judge in (*BUILTIN_JUDGES, *custom_judges):
        if column in judge_schema([judge]).names[1:]:
            return [f"judge.{judge}"]
    return None
