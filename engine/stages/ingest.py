"""Ingest stage (Spark): frame → parse → quarantine → exact dedup → records + indicators.

The driver only frames sources into raw Parquet shards (record boundaries, byte checks, optional
sampling); Spark parses, normalises, hashes and computes indicators per partition, removes exact
duplicates globally and writes:
  records/                one row per ingested record (id, source, row, dup_of, conversation, ...)
  signals/indicators/     one row per unique id (the attribute sidecar)
  quarantine.jsonl        one line per unreadable record
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.parse import PARSED_SCHEMA, RAW_SCHEMA, parse_batch
from engine.readers.framing import FrameStats, RawRecord
from engine.readers.sources import Source, frame_source, resolve_source
from engine.records import detect_schema
from engine.runtime.rundir import RunDir, atomic_write
from engine.signals.indicators import INDICATOR_COLUMNS, INDICATOR_SCHEMA
from engine.stages.contract import Stage, StageContext

if TYPE_CHECKING:
    from engine.config import JobSpec

SCHEMA_SNIFF_ROWS = 200


class EmptyInputError(ValueError):
    """The inputs hold no records at all: nothing to select from."""


@dataclass
class SourceReport:
    source: str
    container: str
    schema: str | None
    rows: int = 0
    framed_rows: int = 0
    bytes_read: int = 0
    blank_lines: int = 0
    warnings: list[str] = field(default_factory=list)


def _sample_keep(seed: int, source: str, row: int, fraction: float) -> bool:
    """Seeded, order-independent Bernoulli sample of rows."""
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}:{source}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _sniff_schema(records: list[RawRecord]) -> str | None:
    """The schema most of a source's first records have."""
    votes: Counter[str] = Counter()
    for record in records:
        if record.raw is None:
            continue
        try:
            parsed = json.loads(record.raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(parsed, dict) and (schema := detect_schema(parsed)):
            votes[schema] += 1
    return votes.most_common(1)[0][0] if votes else None


class _ShardWriter:
    """Raw records into Parquet shards of `shard_rows` rows: one shard, one Spark task."""

    def __init__(self, folder: Path, shard_rows: int) -> None:
        self.folder, self.shard_rows = folder, shard_rows
        self.buffer: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        self.shards = 0
        self.rows = 0

    def add(self, source_index: int, record: RawRecord) -> None:
        self.buffer["source_index"].append(source_index)
        self.buffer["row"].append(record.row)
        self.buffer["raw"].append(record.raw)
        self.buffer["error"].append(record.error)
        self.buffer["excerpt"].append(record.excerpt)
        self.rows += 1
        if len(self.buffer["row"]) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer["row"]:
            return
        table = pa.Table.from_pydict(self.buffer, schema=RAW_SCHEMA)
        pq.write_table(table, self.folder / f"part-{self.shards:05d}.parquet")
        self.shards += 1
        self.buffer = {name: [] for name in RAW_SCHEMA.names}


def frame_inputs(
    job: JobSpec, run: RunDir, progress: Callable[[str, int | None], Callable[[int], None]]
) -> tuple[list[Source], list[SourceReport]]:
    """Frame every input into raw shards under `_work/raw`; returns the sources and what was seen.

    `progress(description, total)` returns an advance callback (bytes or rows).
    """
    folder = RunDir.reset_dir(run.work("raw"))
    writer = _ShardWriter(folder, job.ingest.shard_rows)
    sample = job.ingest.sample
    sources: list[Source] = []
    reports: list[SourceReport] = []
    for index, spec in enumerate(job.inputs):
        source = resolve_source(spec.path, spec.container)
        stats = FrameStats()
        advance = progress(f"framing {source.name}", source.size_bytes())
        records: Iterator[RawRecord] = frame_source(
            source, job.ingest.max_record_bytes, stats, advance
        )
        report = SourceReport(source.name, source.container, spec.schema_name)
        head: list[RawRecord] = []
        kept = 0
        for record in records:
            report.framed_rows += 1
            if sample is not None and (
                not _sample_keep(job.seed, source.name, record.row, sample.fraction)
                or (sample.max_rows is not None and kept >= sample.max_rows)
            ):
                continue
            kept += 1
            if report.schema is None and len(head) < SCHEMA_SNIFF_ROWS:
                head.append(record)
                if len(head) == SCHEMA_SNIFF_ROWS:
                    report.schema = _sniff_schema(head)
                    for buffered in head:
                        writer.add(index, buffered)
                continue
            writer.add(index, record)
        if report.schema is None and head:
            report.schema = _sniff_schema(head)
        if len(head) < SCHEMA_SNIFF_ROWS:
            for buffered in head:
                writer.add(index, buffered)
        report.rows = kept
        report.bytes_read = stats.bytes_read
        report.blank_lines = stats.blank_lines
        report.warnings = stats.warnings
        sources.append(source)
        reports.append(report)
    writer.flush()
    return sources, reports


def _parquet_rows(folder: Path) -> int:
    """Rows in a folder of Parquet files, read from their footers."""
    return sum(pq.read_metadata(path).num_rows for path in sorted(folder.glob("*.parquet")))


def run_ingest(ctx: StageContext) -> dict[str, Any]:
    """Run the whole ingest stage; returns the facts the manifest needs."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from engine.runtime.spark import map_arrow

    job, run, spark, log = ctx.job, ctx.run, ctx.spark, ctx.log
    with ctx.phase("frame"):
        sources, reports = frame_inputs(job, run, ctx.progress)
    schemas = {i: report.schema for i, report in enumerate(reports)}
    for report in reports:
        for warning in report.warnings:
            log(f"[yellow]warning:[/] {warning}")

    input_rows = sum(report.rows for report in reports)
    if input_rows == 0:
        raise EmptyInputError("the inputs hold no records: " + ", ".join(s.name for s in sources))
    raw = spark.read.parquet(str(run.work("raw")))
    # Spark packs small shards into few partitions; spread them over every core.
    partitions = max(2 * spark.sparkContext.defaultParallelism, raw.rdd.getNumPartitions())
    raw = raw.repartition(partitions)
    # Parse once into Parquet; every later step reads only the columns it needs from there.
    parsed_dir = str(run.work("parsed"))
    with ctx.phase("parse"):
        map_arrow(raw, lambda batch: parse_batch(batch, schemas), PARSED_SCHEMA).write.mode(
            "overwrite"
        ).parquet(parsed_dir)
    parsed = spark.read.parquet(parsed_dir)

    quarantine_reasons: Counter[str] = Counter()
    quarantine_by_source: Counter[str] = Counter()
    quarantined = (
        parsed.filter(F.col("status") == "quarantined")
        .select("source_index", "row", "reason", "excerpt")
        .orderBy("source_index", "row")
    )
    with ctx.phase("quarantine"), atomic_write(run.quarantine) as handle:
        for item in quarantined.toLocalIterator():
            name = sources[item["source_index"]].name
            quarantine_reasons[item["reason"]] += 1
            quarantine_by_source[name] += 1
            line = {"source": name, "row": item["row"], "reason": item["reason"]}
            line["excerpt"] = item["excerpt"]
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")

    # Exact duplicates: rank on the small key columns only, then join the (few) later copies
    # back, instead of shuffling whole conversations through a window.
    ok = parsed.filter(F.col("status") == "ok")
    with ctx.phase("exact_dedup_and_write"):
        first = Window.partitionBy("id").orderBy("source_index", "row")
        copies = (
            ok.select("id", "source_index", "row")
            .withColumn("_rank", F.row_number().over(first))
            .filter(F.col("_rank") > 1)
            .select("source_index", "row", F.col("id").alias("dup_of"))
        )
        copies.write.mode("overwrite").parquet(str(run.work("copies")))
        copies = spark.read.parquet(str(run.work("copies")))
        duplicates = _parquet_rows(run.work("copies"))
        source_names = F.create_map(
            *[item for i, s in enumerate(sources) for item in (F.lit(i), F.lit(s.name))]
        )
        ok.join(copies, on=["source_index", "row"], how="left").select(
            "id",
            source_names[F.col("source_index")].alias("source"),
            "source_index",
            "row",
            "dup_of",
            "schema",
            "conversation",
            "original",
        ).write.mode("overwrite").parquet(str(run.records))
        ok.join(copies, on=["source_index", "row"], how="left_anti").select(
            "id", *INDICATOR_COLUMNS
        ).write.mode("overwrite").parquet(str(run.signal("indicators")))
        # Counted from what was written (the files' footers), not by another pass over the data.
        ingested = _parquet_rows(run.records)
    RunDir.remove(run.work("raw"), run.work("parsed"), run.work("copies"))

    total_quarantined = sum(quarantine_reasons.values())
    if ingested + total_quarantined != input_rows:
        raise RuntimeError(
            f"ingest lost rows: {input_rows} framed, {ingested} ingested, "
            f"{total_quarantined} quarantined"
        )
    sample = job.ingest.sample
    if sample is not None:
        framed = sum(report.framed_rows for report in reports)
        log(
            f"[yellow]sampled:[/] {input_rows} of {framed} rows (fraction {sample.fraction}, "
            f"max_rows {sample.max_rows}); run without sampling for the full corpus"
        )
    return {
        "input": input_rows,
        "ingested": ingested,
        "unique": ingested - duplicates,
        "exact_duplicates": duplicates,
        "quarantined": total_quarantined,
        "quarantine_reasons": dict(quarantine_reasons.most_common()),
        "quarantine_by_source": dict(quarantine_by_source),
        "sources": [report.__dict__ for report in reports],
        "sampling": None
        if sample is None
        else {
            "fraction": sample.fraction,
            "max_rows": sample.max_rows,
            "framed_rows": sum(report.framed_rows for report in reports),
            "kept_rows": input_rows,
        },
    }


def input_state(job: JobSpec) -> list[dict[str, Any]]:
    """What identifies each input's content cheaply: resolved path, sizes and mtimes of its files.

    An edited file re-runs ingest; a hub dataset is identified by its name (and split).
    """
    state = []
    for spec in job.inputs:
        path = Path(spec.path)
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
            state.append({"path": str(path.resolve()), "files": stats})
        else:
            state.append({"path": spec.path})
    return state


def ingest_settings(job: JobSpec) -> dict[str, Any]:
    """Ingest's numbers depend on the inputs (and their content), the ingest block and the seed
    (sampling)."""
    config = job.model_dump(mode="json", include={"inputs", "ingest"})
    return {
        "inputs": config["inputs"],
        "input_state": input_state(job),
        "ingest": config["ingest"],
        "seed": job.seed,
    }


STAGE = Stage(
    name="ingest",
    # 3: user turns of Alpaca/Dolly rows keep their `input` (engine.records); ids unchanged
    # 4: indicators add longest_response_chars and the hygiene statistics (Gopher repetition,
    #    compression ratio) of both sides
    version=4,
    engine="spark",
    reads=("inputs",),
    writes=("records", "signals/indicators", "quarantine.jsonl"),
    run=run_ingest,
    settings_of=ingest_settings,
    schema=INDICATOR_SCHEMA,
    description="frame, parse, normalise, quarantine, exact dedup, indicators",
)
