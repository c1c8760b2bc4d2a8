"""The stage registry: every stage Winnow runs, in the order it runs, registered once.

The pipeline iterates `STAGES`; config validation asks it which signals and columns exist (the
public contract of `scores.parquet`), so a filter or score over a column no enabled signal
produces is refused before any work starts. Adding a stage is one module that declares a
`STAGE` (engine.stages.contract.Stage) and one line here.

Order: ingest first; Spark signal stages next, so one Spark session serves ingest and them; then
the Ray actor-pool stages; select and export; then, for a job with an `eval:` block, the
evaluation loop (train each arm, generate answers, judge them pairwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from engine.signals.judge_schema import BUILTIN_JUDGES, DEITA_PAIR, judge_schema
from engine.stages import (
    embed,
    export,
    generate,
    ingest,
    judge,
    judge_pairwise,
    lang,
    lm,
    minhash,
    rm,
    select,
    tokens,
    train,
)
from engine.stages.contract import Stage, StageContext

if TYPE_CHECKING:
    from engine.config import JobSpec

STAGES: tuple[Stage, ...] = (
    ingest.STAGE,
    lang.STAGE,
    minhash.STAGE,
    tokens.STAGE,
    embed.STAGE,
    lm.STAGE,
    judge.STAGE,
    rm.STAGE,
    select.STAGE,
    export.STAGE,
    train.STAGE,
    generate.STAGE,
    judge_pairwise.STAGE,
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
# Stages with a block under `stages:` in the job spec.
CONFIGURED: tuple[Stage, ...] = tuple(s for s in STAGES if s.spec is not None)
SIGNAL_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.signal is not None)

# Columns that are not scalars: kept in their sidecar, never in scores.parquet or a filter.
VECTOR_COLUMNS = ("embedding",)
JUDGE = judge.STAGE.signal


def stage(name: str) -> Stage:
    return BY_NAME[name]


def quiet_context(name: str, job: JobSpec, run: Any, spark: Any = None) -> StageContext:
    """The StageContext the executor would hand stage `name`, without log or progress bars:
    for running one stage alone (tests, benchmarks) on an engine the caller started; Ray
    stages need Ray already started."""
    return StageContext(
        job=job,
        run=run,
        stage=stage(name),
        log=lambda message: None,
        progress=lambda description, total: lambda n: None,
        spark_factory=(lambda: spark) if spark is not None else None,
    )


def run_alone(name: str, job: JobSpec, run: Any, spark: Any = None) -> dict[str, Any]:
    """Stage `name` run alone, outside the executor (no planning, markers or lock): its info."""
    return stage(name).run(quiet_context(name, job, run, spark))


def enabled_stages(job: JobSpec) -> list[Stage]:
    """The stages this job runs, in order."""
    return [s for s in STAGES if s.enabled(job)]


def eval_stages(job: JobSpec) -> list[Stage]:
    """The enabled evaluation stages (after export), in order."""
    names = (train.STAGE.name, generate.STAGE.name, judge_pairwise.STAGE.name)
    return [s for s in STAGES if s.name in names and s.enabled(job)]


def signal_stages(job: JobSpec) -> list[Stage]:
    """The enabled signal stages (their sidecars join into scores.parquet), in order."""
    return [s for s in SIGNAL_STAGES if s.enabled(job)]


def stage_of(signal: str) -> str:
    """The stage that computes a `signals:` name (`judge.<name>` -> judge)."""
    return JUDGE if signal.startswith(f"{JUDGE}.") else signal


def _fixed_schemas() -> dict[str, pa.Schema]:
    """Signal name -> sidecar schema, for the signals whose columns do not depend on the job."""
    return {s.signal: s.schema for s in SIGNAL_STAGES if isinstance(s.schema, pa.Schema)}


def known_signal(signal: str, custom_judges: tuple[str, ...] = ()) -> bool:
    if signal.startswith(f"{JUDGE}."):
        return signal.split(".", 1)[1] in (*BUILTIN_JUDGES, *custom_judges)
    return signal == "indicators" or signal in _fixed_schemas()


def signal_names(custom_judges: tuple[str, ...] = ()) -> tuple[str, ...]:
    judges = tuple(f"{JUDGE}.{n}" for n in (*BUILTIN_JUDGES, *custom_judges))
    return ("indicators", *_fixed_schemas(), *judges)


def column_types(signals: list[str]) -> dict[str, pa.DataType]:
    """Every column available when `signals` are enabled (indicators always are), with its type."""
    schemas = [ingest.STAGE.output_schema(signals)]
    names = {stage_of(s) for s in signals}
    schemas += [s.output_schema(signals) for s in SIGNAL_STAGES if s.signal in names]
    types: dict[str, pa.DataType] = {}
    for schema in schemas:
        if schema is not None:
            types.update({f.name: f.type for f in schema if f.name != "id"})
    return types


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
    for name, schema in _fixed_schemas().items():
        if column in schema.names[1:]:
            return [name]
    if column == "judge_deita_score":
        return [f"{JUDGE}.{n}" for n in DEITA_PAIR]
    for name in (*BUILTIN_JUDGES, *custom_judges):
        if column in judge_schema([name]).names[1:]:
            return [f"{JUDGE}.{name}"]
    return None
