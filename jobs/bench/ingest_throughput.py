"""Benchmark: Spark ingest + indicators vs a single-process pandas baseline doing the same work.

Both sides frame the same JSONL (Alpaca 9k replicated to ~100k rows), parse and normalise every
record, hash it, compute the indicators (the same `engine.parse.parse_batch`), remove exact
duplicates (first occurrence by row) and write records plus the indicator sidecar as Parquet.
Prints rows/s of each, their ratio and the peak memory (RSS of the whole process tree, so Spark's
JVM and Python workers count). Run with `make bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import parse_job
from engine.parse import RAW_SCHEMA, parse_batch
from engine.readers.framing import FrameStats
from engine.readers.sources import frame_source, resolve_source
from engine.runtime.rundir import RunDir
from engine.runtime.spark import spark_session
from engine.signals.indicators import INDICATOR_COLUMNS
from engine.stages.registry import run_alone as run_stage

REPO = Path(__file__).resolve().parents[2]


class PeakRss:
    """Samples the RSS of this process and all its children (JVM, Python workers)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build_corpus(target_rows: int, folder: Path) -> Path:
    rows = json.loads((REPO.parent / "shared/data/alpaca_random_9k.json").read_text())
    path = folder / "alpaca_100k.jsonl"
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target_rows:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
                if written == target_rows:
                    break
    return path


def pandas_baseline(path: Path, out: Path, max_bytes: int) -> int:
    """The same ingest in one process: frame, parse_batch, dedup with pandas, write Parquet."""
    source = resolve_source(str(path))
    frames = []
    batch: list = []

    def flush() -> None:
        raw = pa.RecordBatch.from_pylist(batch, schema=RAW_SCHEMA)
        frames.append(parse_batch(raw, {0: None}).to_pandas())
        batch.clear()

    for record in frame_source(source, max_bytes, FrameStats()):
        batch.append(
            {
                "source_index": 0,
                "row": record.row,
                "raw": record.raw,
                "error": record.error,
                "excerpt": record.excerpt,
            }
        )
        if len(batch) == 10_000:
            flush()
    if batch:
        flush()
    parsed = pd.concat(frames, ignore_index=True)
    ok = parsed[parsed["status"] == "ok"].sort_values(["source_index", "row"])
    first = ~ok["id"].duplicated()
    ok = ok.assign(dup_of=ok["id"].where(~first), source=str(path))
    out.mkdir(parents=True, exist_ok=True)
    columns = ["id", "source", "source_index", "row", "dup_of", "schema", "conversation"]
    ok[[*columns, "original"]].to_parquet(out / "records.parquet", index=False)
    ok.loc[first, ["id", *INDICATOR_COLUMNS]].to_parquet(out / "indicators.parquet", index=False)
    return len(parsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = Path(tempfile.mkdtemp(prefix="winnow-bench-"))
    try:
        corpus = build_corpus(args.rows, work)
        size_mb = corpus.stat().st_size / 1e6
        print(f"corpus: {args.rows} rows, {size_mb:.0f} MB JSONL, cores: {os.cpu_count()}")
        job = parse_job({"inputs": [{"path": str(corpus)}], "spark": {"master": args.master}})

        with PeakRss() as base_mem:
            start = time.perf_counter()
            rows = pandas_baseline(corpus, work / "baseline", job.ingest.max_record_bytes)
            base_s = time.perf_counter() - start

        with PeakRss() as spark_mem:
            start = time.perf_counter()
            spark = spark_session(job.spark)
            startup_s = time.perf_counter() - start
            start = time.perf_counter()
            info = run_stage("ingest", job, RunDir(work / "spark"), spark)
            spark_s = time.perf_counter() - start
        assert info["input"] == rows, (info["input"], rows)
        base_rows = pq.read_metadata(work / "baseline" / "indicators.parquet").num_rows
        assert base_rows == info["unique"], (base_rows, info["unique"])

        print(f"{'':28}{'seconds':>9}{'rows/s':>10}{'peak RSS':>11}")
        print(
            f"{'pandas, 1 process':28}{base_s:9.1f}{rows / base_s:10.0f}"
            f"{base_mem.peak / 2**30:9.2f} GiB"
        )
        print(
            f"{'spark ' + args.master:28}{spark_s:9.1f}{rows / spark_s:10.0f}"
            f"{spark_mem.peak / 2**30:9.2f} GiB  (+{startup_s:.1f}s session start)"
        )
        print(
            f"speed-up spark / pandas: {base_s / spark_s:.2f}x "
            f"({base_s / (spark_s + startup_s):.2f}x counting session start)"
        )
        print(f"unique rows {info['unique']}, exact duplicates {info['exact_duplicates']}")
        spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
