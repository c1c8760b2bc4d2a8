"""Lang stage (Spark): language of each unique record's instruction and response side.

`mapInArrow` over the unique records (`dup_of` null) in `records/`; each Python worker builds the
lingua detector once (a module-level cache in engine.signals.lang) and reuses it for every batch
of every partition it runs (Spark reuses Python workers by default). Writes `signals/lang/`, one
row per unique id (LANG_SCHEMA).

Memory: lingua with every language in high-accuracy mode holds ~1.2-1.4 GB per Python worker, so
a node runs at most as many of those as it has Spark task slots: size executors' memory for it,
or restrict `stages.lang.languages`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from engine.config import JobSpec, LangStageSpec
from engine.runtime.rundir import RunDir
from engine.signals.lang import LANG_SCHEMA, UNDETERMINED, lang_table

TOP_LANGUAGES = 30
# Rows per detector call inside a partition: bounds a worker's memory for long conversations.
ARROW_BATCH_ROWS = 512


def _detect_partitions(
    spec: LangStageSpec, accuracy: str
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    languages = tuple(spec.languages) if spec.languages else None
    min_chars, min_confidence = spec.min_chars, spec.min_confidence

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            table = lang_table(
                batch.column("id").to_pylist(),
                batch.column("conversation").to_pylist(),
                languages,
                min_chars=min_chars,
                min_confidence=min_confidence,
                accuracy=accuracy,
            )
            yield from table.to_batches()

    return run


def run_lang(job: JobSpec, run: RunDir, spark: Any) -> dict[str, Any]:
    """Detect languages of every unique record on Spark; returns the manifest's facts."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    start = time.perf_counter()
    spec = job.stages.lang
    accuracy = spec.accuracy  # "auto": see engine.signals.lang
    batch_key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous_batch = spark.conf.get(batch_key, None)
    spark.conf.set(batch_key, str(ARROW_BATCH_ROWS))
    records = (
        spark.read.parquet(str(run.records))
        .filter(F.col("dup_of").isNull())
        .select("id", "conversation")
    )
    partitions = max(2 * spark.sparkContext.defaultParallelism, records.rdd.getNumPartitions())
    out = str(run.signal("lang"))
    try:
        records.repartition(partitions).mapInArrow(
            _detect_partitions(spec, accuracy), from_arrow_schema(LANG_SCHEMA)
        ).write.mode("overwrite").parquet(out)
    finally:
        if previous_batch is None:
            spark.conf.unset(batch_key)
        else:
            spark.conf.set(batch_key, previous_batch)

    written = spark.read.parquet(out)
    counts = {
        row["lang"]: row["count"]
        for row in written.groupBy("lang").count().orderBy(F.desc("count"), "lang").collect()
    }
    totals = written.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.col("lang_mismatch").cast("int")).alias("mismatches"),
        F.sum((F.col("response_lang") == UNDETERMINED).cast("int")).alias("response_und"),
    ).first()
    return {
        "rows": int(totals["rows"]),
        "languages": dict(list(counts.items())[:TOP_LANGUAGES]),
        "distinct_languages": len([c for c in counts if c != UNDETERMINED]),
        "mismatches": int(totals["mismatches"] or 0),
        "undetermined": int(counts.get(UNDETERMINED, 0)),
        "response_undetermined": int(totals["response_und"] or 0),
        "accuracy": accuracy,
        "seconds": round(time.perf_counter() - start, 3),
    }
