"""Lang stage (Spark): language of each unique record's instruction and response side.

`mapInArrow` over the unique records (`dup_of` null) in `records/`; each Python worker builds the
lingua detector once (a module-level cache in engine.signals.lang) and reuses it for every batch
of every partition it runs (Spark reuses Python workers by default; measured on local[2], 4
partitions: 2 worker processes, each loading the models once, in its first batch). Writes
`signals/lang/`, one row per unique id (LANG_SCHEMA): languages, lingua's confidences,
`script_mismatch` (the script rule alone) and `lang_mismatch` (lingua's rule, or the script rule
unless `by_script: false`).

Memory: lingua with every language in high-accuracy mode holds ~1.2-1.4 GB per Python worker, so
a node runs at most as many of those as it has Spark task slots: size executors' memory for it,
or restrict `stages.lang.languages`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import Field

from engine.signals.lang import LANG_SCHEMA, UNDETERMINED, lang_table
from engine.stages.contract import Settings, Stage, StageContext, StageSpec

TOP_LANGUAGES = 30
# Rows per detector call inside a partition: bounds a worker's memory for long conversations.
ARROW_BATCH_ROWS = 512


class LangSettings(Settings):
    """Language identification on Spark (lingua; its models ship in the wheel)."""

    languages: list[Annotated[str, Field(pattern=r"^[a-z]{2}$")]] | None = Field(
        default=None, description="restrict the detector to these ISO 639-1 codes (all if unset)"
    )
    min_chars: Annotated[int, Field(ge=1)] = Field(
        default=12, description="letters below which a side is undetermined ('und')"
    )
    min_confidence: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="lingua's rule: both sides at least this confident"
    )
    by_script: bool = Field(
        default=True,
        description="lang_mismatch also flags incompatible dominant scripts (Latin vs Han, "
        "Cyrillic, ...) whatever lingua's confidence; script_mismatch is written either way",
    )
    accuracy: Literal["auto", "high", "low"] = Field(
        default="auto",
        description="lingua's mode; auto: low-accuracy (fast) mode for texts of 120+ characters",
    )


class LangSpec(StageSpec, LangSettings):
    stage_name = "lang"


def detect_batch(batch: pa.RecordBatch, spec: LangSettings) -> pa.Table:
    """(id, conversation) → LANG_SCHEMA rows; the detector is built once per Python worker."""
    return lang_table(
        batch.column("id").to_pylist(),
        batch.column("conversation").to_pylist(),
        tuple(spec.languages) if spec.languages else None,
        min_chars=spec.min_chars,
        min_confidence=spec.min_confidence,
        accuracy=spec.accuracy,
        by_script=spec.by_script,
    )


def run_lang(ctx: StageContext) -> dict[str, Any]:
    """Detect languages of every unique record on Spark; returns the manifest's facts."""
    from pyspark.sql import functions as F

    from engine.runtime.spark import map_arrow

    spark, spec = ctx.spark, ctx.spec
    settings = LangSettings.model_validate(spec.settings())  # plain values travel to workers
    batch_key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous_batch = spark.conf.get(batch_key, None)
    spark.conf.set(batch_key, str(ARROW_BATCH_ROWS))
    records = (
        spark.read.parquet(str(ctx.run.records))
        .filter(F.col("dup_of").isNull())
        .select("id", "conversation")
    )
    partitions = max(2 * spark.sparkContext.defaultParallelism, records.rdd.getNumPartitions())
    out = str(ctx.run.signal("lang"))
    try:
        with ctx.phase("detect"):
            map_arrow(
                records.repartition(partitions),
                lambda batch: detect_batch(batch, settings),
                LANG_SCHEMA,
            ).write.mode("overwrite").parquet(out)
    finally:
        if previous_batch is None:
            spark.conf.unset(batch_key)
        else:
            spark.conf.set(batch_key, previous_batch)

    with ctx.phase("summary"):
        written = spark.read.parquet(out)
        counts = {
            row["lang"]: row["count"]
            for row in written.groupBy("lang").count().orderBy(F.desc("count"), "lang").collect()
        }
        totals = written.agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(F.col("lang_mismatch").cast("int")).alias("mismatches"),
            F.sum(F.col("script_mismatch").cast("int")).alias("script_mismatches"),
            F.sum((F.col("response_lang") == UNDETERMINED).cast("int")).alias("response_und"),
        ).first()
    return {
        "rows": int(totals["rows"]),
        "languages": dict(list(counts.items())[:TOP_LANGUAGES]),
        "distinct_languages": len([c for c in counts if c != UNDETERMINED]),
        "mismatches": int(totals["mismatches"] or 0),
        "script_mismatches": int(totals["script_mismatches"] or 0),
        "undetermined": int(counts.get(UNDETERMINED, 0)),
        "response_undetermined": int(totals["response_und"] or 0),
        "accuracy": spec.accuracy,
    }


STAGE = Stage(
    name="lang",
    version=2,  # 2: script_mismatch column; lang_mismatch includes the script rule
    engine="spark",
    reads=("records",),
    writes=("signals/lang",),
    run=run_lang,
    spec=LangSpec,
    schema=LANG_SCHEMA,
    signal="lang",
    description="language of the instruction and the response side (lingua)",
)
