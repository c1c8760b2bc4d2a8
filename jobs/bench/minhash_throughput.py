"""Benchmark: MinHash near-duplicate rows/s, Winnow's banding vs Spark ML's MinHashLSH, on Spark.

The corpus is the Alpaca 9k sample replicated to ~100k rows; every replica after the first gets
word-level perturbations (about one edit per 40 words: replace, delete or swap), so each row has
about ten near-duplicates and few exact ones. Both sides start from the ingested `records/` and
use the conversation text in 5-word shingles with threshold 0.7:
- Winnow: the minhash stage (signatures and band keys by mapInArrow with the spec's banding
  (default: optimal for the threshold); buckets, the Jaccard check on the same signatures and
  components in numpy on the driver), on all rows and on a subset; the stage's phase times are
  printed (where its time goes);
- Spark ML: RegexTokenizer -> NGram(5) -> HashingTF(binary) -> MinHashLSH(numHashTables) ->
  approxSimilarityJoin(distance <= 0.3), on the subset only when it is much slower (said in the
  output), and without the grouping step.
Prints rows/s of each and the ratio on the same rows. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.config import parse_job
from engine.runtime.rundir import RunDir
from engine.runtime.spark import spark_session
from engine.stages.registry import quiet_context
from engine.stages.registry import run_alone as run_stage

REPO = Path(__file__).resolve().parents[2]


def perturb(text: str, rng: random.Random) -> str:
    tokens = text.split(" ")
    for _ in range(max(1, len(tokens) // 40)):
        i = rng.randrange(len(tokens))
        op = rng.choice(("replace", "delete", "swap"))
        if op == "replace":
            tokens[i] = rng.choice(tokens)
        elif op == "delete" and len(tokens) > 1:
            del tokens[i]
        elif i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    return " ".join(tokens)


def build_corpus(target_rows: int, folder: Path) -> Path:
    rows = json.loads((REPO.parent / "shared/data/alpaca_random_9k.json").read_text())
    rng = random.Random(0)
    path = folder / "alpaca_near_dups.jsonl"
    written, replica = 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target_rows:
            for row in rows:
                out = row if replica == 0 else {**row, "output": perturb(row["output"], rng)}
                handle.write(json.dumps(out, ensure_ascii=False) + "\n")
                written += 1
                if written == target_rows:
                    break
            replica += 1
    return path


def subset_run(full: RunDir, target: Path, rows: int) -> RunDir:
    """A run directory whose records are the first `rows` input rows of `full`."""
    run = RunDir(target)
    table = ds.dataset(str(full.records), format="parquet").to_table(filter=ds.field("row") < rows)
    run.records.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, run.records / "part-0.parquet")
    return run


def spark_ml_minhash(spark, run: RunDir, threshold: float, tables: int) -> tuple[float, int, int]:
    """MinHashLSH self-join on the same unique records: (seconds, rows, pairs within threshold)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import HashingTF, MinHashLSH, NGram, RegexTokenizer
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    start = time.perf_counter()
    turns = F.transform("conversation", lambda t: F.concat_ws(": ", t["role"], t["content"]))
    records = (
        spark.read.parquet(str(run.records))
        .filter(F.col("dup_of").isNull())
        .select("id", F.array_join(turns, "\n").alias("text"))
    )
    features = Pipeline(
        stages=[
            RegexTokenizer(inputCol="text", outputCol="words", pattern="[\\W_]+"),
            NGram(n=5, inputCol="words", outputCol="shingles"),
            HashingTF(inputCol="shingles", outputCol="features", numFeatures=1 << 20, binary=True),
        ]
    ).fit(records)
    vectors = features.transform(records).filter(
        F.size(F.filter(vector_to_array("features"), lambda v: v > 0)) > 0
    )
    vectors = vectors.select("id", "features").cache()
    rows = vectors.count()
    model = MinHashLSH(inputCol="features", outputCol="hashes", numHashTables=tables, seed=1)
    fitted = model.fit(vectors)
    pairs = (
        fitted.approxSimilarityJoin(vectors, vectors, 1 - threshold, distCol="distance")
        .filter(F.col("datasetA.id") < F.col("datasetB.id"))
        .count()
    )
    vectors.unpersist()
    return time.perf_counter() - start, rows, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--subset", type=int, default=20_000, help="rows both methods run on")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--tables", type=int, default=5, help="MinHashLSH numHashTables")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = Path(tempfile.mkdtemp(prefix="winnow-bench-minhash-"))
    try:
        corpus = build_corpus(args.rows, work)
        job = parse_job(
            {
                "inputs": [{"path": str(corpus)}],
                "signals": ["minhash"],
                "spark": {"master": args.master, "shuffle_partitions": 8},
            }
        )
        spark = spark_session(job.spark)
        full = RunDir(work / "full")
        start = time.perf_counter()
        ingest = run_stage("ingest", job, full, spark)
        print(
            f"corpus: {args.rows} rows, {ingest['unique']} unique after exact dedup "
            f"(ingest {time.perf_counter() - start:.1f}s), cores {os.cpu_count()}, {args.master}"
        )
        spec = job.select.dedup.near
        print(
            f"settings: {spec.text} text, {spec.shingle_words}-word shingles, {spec.num_perm} "
            f"permutations, {'{} bands x {} rows'.format(*spec.banding())}, "
            f"threshold {spec.threshold}"
        )

        ctx = quiet_context("minhash", job, full, spark)
        start = time.perf_counter()
        info = ctx.stage.run(ctx)
        full_s = time.perf_counter() - start
        print(
            f"winnow banding, all rows: {info['rows'] / full_s:.0f} rows/s ({full_s:.1f}s) {info}"
        )
        print(f"phases (s): {ctx.phases}")

        small = subset_run(full, work / "subset", args.subset)
        start = time.perf_counter()
        small_info = run_stage("minhash", job, small, spark)
        ours_s = time.perf_counter() - start
        ml_s, ml_rows, ml_pairs = spark_ml_minhash(spark, small, spec.threshold, args.tables)
        print(f"\nsame {small_info['rows']} rows (first {args.subset} input rows):")
        print(f"{'':40}{'seconds':>9}{'rows/s':>10}{'pairs':>10}")
        print(
            f"{'winnow banding (+ components)':40}{ours_s:9.1f}"
            f"{small_info['rows'] / ours_s:10.0f}{small_info['verified_pairs']:10}"
        )
        print(
            f"{f'Spark ML MinHashLSH ({args.tables} tables)':40}{ml_s:9.1f}"
            f"{ml_rows / ml_s:10.0f}{ml_pairs:10}"
        )
        print(f"speed-up winnow / Spark ML on the same rows: {ml_s / ours_s:.2f}x")
        spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
