"""Benchmark: language identification (the lang stage) on Spark vs a single-process loop.

Both sides run `engine.signals.lang.lang_table` (lingua, every language, `--accuracy auto` by
default: high-accuracy models for short texts, low-accuracy for long ones) over real ShareGPT
conversations (the built-in corpus, replicated up to `--rows`).
Spark runs the real lang stage (mapInArrow over `records/`, one detector per Python worker);
the baseline is one Python process looping over `--baseline-rows` of the same rows in batches of
512, once with lingua's sequential call and once with its own thread pool (`parallel=True`).
Prints rows/s, rows/s per core and the ratios, plus peak RSS (the JVM and Python workers count).
Run with `make bench`. lingua loads its models lazily on first use: the loop baseline warms up
first and reports that load separately; Spark's workers load theirs inside the stage (counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import parse_job
from engine.parse import TURN_TYPE
from engine.readers.framing import FrameStats
from engine.readers.sources import frame_source, resolve_source
from engine.records import to_canonical
from engine.runtime.rundir import RunDir
from engine.runtime.spark import spark_session
from engine.signals.lang import lang_table
from engine.stages.registry import run_alone as run_stage

try:  # the same sampler the ingest benchmark uses
    from jobs.bench.ingest_throughput import PeakRss
except ImportError:  # run as a script from jobs/bench
    from ingest_throughput import PeakRss  # type: ignore[no-redef]

BATCH = 512


def sharegpt_conversations(limit: int) -> list[list[dict]]:
    """Up to `limit` canonical ShareGPT conversations, in corpus order."""
    source = resolve_source("builtin:sharegpt")
    out: list[list[dict]] = []
    for record in islice(frame_source(source, 4 << 20, FrameStats()), limit):
        if record.error is not None:
            continue
        try:
            out.append(to_canonical(json.loads(record.raw), "sharegpt").conversation)
        except (ValueError, KeyError, TypeError):
            continue
    return out


def write_records(conversations: list[list[dict]], rows: int, run: RunDir) -> None:
    """A `records/` folder as ingest writes it (only the columns the lang stage reads)."""
    folder = RunDir.reset_dir(run.records)
    schema = pa.schema(
        [("id", pa.string()), ("dup_of", pa.string()), ("conversation", pa.list_(TURN_TYPE))]
    )
    for part, start in enumerate(range(0, rows, 20_000)):
        ids = range(start, min(start + 20_000, rows))
        table = pa.Table.from_pydict(
            {
                "id": [f"{i:032x}" for i in ids],
                "dup_of": [None] * len(ids),
                "conversation": [conversations[i % len(conversations)] for i in ids],
            },
            schema=schema,
        )
        pq.write_table(table, folder / f"part-{part:05d}.parquet")


def baseline(conversations: list[list[dict]], rows: int, parallel: bool, accuracy: str) -> float:
    """Seconds for one process to detect `rows` rows in batches (models loaded on first call)."""
    start = time.perf_counter()
    for begin in range(0, rows, BATCH):
        chunk = [
            conversations[i % len(conversations)] for i in range(begin, min(begin + BATCH, rows))
        ]
        lang_table([str(i) for i in range(len(chunk))], chunk, parallel=parallel, accuracy=accuracy)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--baseline-rows", type=int, default=5_000)
    parser.add_argument("--warmup-rows", type=int, default=2_000)
    parser.add_argument("--corpus-rows", type=int, default=20_000, help="ShareGPT rows to read")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--accuracy", choices=("auto", "high", "low"), default="auto")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    cores = int(args.master[6:-1]) if args.master.startswith("local[") else os.cpu_count() or 1
    conversations = sharegpt_conversations(args.corpus_rows)
    print(
        f"corpus: {len(conversations)} ShareGPT conversations, replicated to {args.rows} rows; "
        f"machine cores: {os.cpu_count()}; accuracy={args.accuracy}"
    )

    rows_base = min(args.baseline_rows, args.rows)
    start = time.perf_counter()
    baseline(conversations, args.warmup_rows, True, args.accuracy)
    print(
        f"model load + warm-up on {args.warmup_rows} rows (lingua parallel): "
        f"{time.perf_counter() - start:.1f}s"
    )
    results = []
    for parallel in (False, True):
        with PeakRss() as mem:
            seconds = baseline(conversations, rows_base, parallel, args.accuracy)
        used = (os.cpu_count() or 1) if parallel else 1
        label = "1 process, lingua parallel" if parallel else "1 process, sequential"
        results.append((label, rows_base, seconds, used, mem.peak))

    work = Path(tempfile.mkdtemp(prefix="winnow-bench-lang-"))
    try:
        run = RunDir(work / "run")
        write_records(conversations, args.rows, run)
        job = parse_job(
            {"inputs": [{"path": "builtin:sharegpt"}], "spark": {"master": args.master}}
        )
        if "accuracy" in type(job.stages.lang).model_fields:
            job.stages.lang.accuracy = args.accuracy
        elif args.accuracy != "auto":
            raise SystemExit("this config has no stages.lang.accuracy; only --accuracy auto")
        spark = spark_session(job.spark)
        with PeakRss() as mem:
            start = time.perf_counter()
            info = run_stage("lang", job, run, spark)
            seconds = time.perf_counter() - start
        spark.stop()
        assert info["rows"] == args.rows, info
        results.append((f"spark {args.master}", args.rows, seconds, cores, mem.peak))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'':30}{'rows':>8}{'seconds':>9}{'rows/s':>9}{'rows/s/core':>13}{'peak RSS':>11}")
    for label, rows, seconds, used, peak in results:
        print(
            f"{label:30}{rows:8d}{seconds:9.1f}{rows / seconds:9.0f}{rows / seconds / used:13.0f}"
            f"{peak / 2**30:9.2f} GiB"
        )
    base_rate = results[0][1] / results[0][2]
    spark_rate = results[2][1] / results[2][2]
    print(
        f"speed-up spark / sequential loop: {spark_rate / base_rate:.2f}x overall, "
        f"{spark_rate / cores / base_rate:.2f}x per core"
    )
    print(f"lingua parallel / sequential (one process): {results[0][2] / results[1][2]:.2f}x")
    print(
        f"stage info: languages {info['languages']}, mismatches {info['mismatches']}, "
        f"undetermined {info['undetermined']}"
    )


if __name__ == "__main__":
    main()
