"""Near-duplicate stage: MinHash LSH on Spark, candidate pairs verified, groups on the driver.

1. signatures: `mapInArrow` over the unique records (engine.signals.minhash, numpy per batch),
   written once to `_work/minhash_signatures` so later steps never recompute them;
2. candidates: band keys exploded to (band, key, id) rows; rows sharing a bucket are paired.
   Bucket cap (boilerplate guard): members of a bucket are ranked by id and each is paired only
   with the next `bucket_window` members in that order. A bucket of up to `bucket_window + 1`
   rows yields all its pairs; a bigger one yields about size * bucket_window pairs instead of
   size^2 / 2. It is deterministic (ids, not partitions, decide), and the stage reports how many
   buckets were capped and how many pairs that skipped. A pair skipped in one bucket is still
   found through any other band it shares, and components connect the rest transitively;
3. verify: each distinct candidate pair's Jaccard estimate (the same signatures) must reach
   `threshold`;
4. components: the verified edges (few) are collected and grouped with
   engine.selection.groups.connected_components; `near_dup_cluster` is the smallest id of the
   component, null for a record with no verified near-duplicate.

Own banding rather than Spark ML's MinHashLSH: MinHashLSH ORs single-hash tables (no AND within a
band), so its candidate sets are far larger; it needs sparse vectors (HashingTF) per row; and its
join reports a distance that would still have to be verified. The benchmark
jobs/bench/minhash_throughput.py compares both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from engine.runtime.rundir import RunDir
from engine.selection.groups import connected_components
from engine.signals.embed import record_text
from engine.signals.minhash import (
    MINHASH_SCHEMA,
    band_keys,
    candidate_probability,
    estimate_jaccard,
    optimal_banding,
    signatures,
)
from engine.stages.contract import Settings, Stage, StageContext

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from engine.config import JobSpec


class NearDupSpec(Settings):
    """Fuzzy duplicates: MinHash LSH over word shingles on Spark, pairs verified by Jaccard.

    Lives under `select.dedup.near` in the job spec (the minhash stage's settings)."""

    enabled: bool = True
    text: Literal["conversation", "instruction", "response"] = "conversation"
    shingle_words: Annotated[int, Field(ge=1, le=32)] = 5
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128
    bands: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="LSH bands of num_perm / bands rows; null: the banding datasketch's "
        "MinHashLSH would choose for threshold and num_perm (see `banding`)",
    )
    # 0.8, not datasketch's 0.5: every candidate is verified against `threshold` here, so a
    # false positive costs one signature comparison while a false negative is a duplicate kept.
    # Measured on 2,009 planted Alpaca pairs with Jaccard >= 0.7: found 0.878 at 0.5 (14 x 9),
    # 0.916 with the old 16 x 8, 0.946 at 0.8 (18 x 7).
    false_negative_weight: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.8,
        description="bands: null only: weight of missed pairs above the threshold against "
        "candidates below it (weight 1 - this); datasketch's MinHashLSH uses 0.5",
    )
    threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.7, description="estimated Jaccard similarity a candidate pair must reach"
    )
    bucket_window: Annotated[int, Field(ge=1)] = Field(
        default=100,
        description="a row of an oversized LSH bucket is paired with the next N members by id",
    )

    @model_validator(mode="after")
    def _bands_divide(self) -> NearDupSpec:
        if self.bands is not None and self.num_perm % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")
        return self

    def banding(self) -> tuple[int, int]:
        """(bands, rows per band): explicit bands use the whole signature; null bands take
        datasketch's optimum for (threshold, num_perm), whose bands * rows may leave the last
        permutations unused (engine.signals.minhash.optimal_banding)."""
        if self.bands is not None:
            return self.bands, self.num_perm // self.bands
        weight = self.false_negative_weight
        return optimal_banding(self.threshold, self.num_perm, 1.0 - weight, weight)


SIGNATURE_SCHEMA = pa.schema(
    [("id", pa.string()), ("signature", pa.binary()), ("band_keys", pa.list_(pa.int64()))]
)
VERIFIED_SCHEMA = pa.schema(
    [("id_a", pa.string()), ("id_b", pa.string()), ("jaccard", pa.float64())]
)


def signature_batch(batch: pa.RecordBatch, spec: NearDupSpec) -> pa.RecordBatch:
    """(id, conversation) → (id, signature bytes, band keys); a text with no word has no keys."""
    texts = [record_text(c, spec.text) for c in batch.column("conversation").to_pylist()]
    signature, has_shingles = signatures(texts, spec.shingle_words, spec.num_perm)
    bands, rows_per_band = spec.banding()
    keys = band_keys(signature, bands, rows_per_band)
    rows = len(texts)
    width = spec.num_perm * 8
    signature_offsets = pa.py_buffer((np.arange(rows + 1, dtype=np.int32) * width).tobytes())
    signature_array = pa.Array.from_buffers(
        pa.binary(), rows, [None, signature_offsets, pa.py_buffer(signature.tobytes())]
    )
    key_offsets = np.concatenate([[0], np.cumsum(has_shingles * bands)]).astype(np.int32)
    key_values = pa.array(keys[has_shingles].reshape(-1).view(np.int64))
    key_array = pa.ListArray.from_arrays(pa.array(key_offsets), key_values)
    return pa.RecordBatch.from_arrays(
        [batch.column("id"), signature_array, key_array], schema=SIGNATURE_SCHEMA
    )


def verify_batch(batch: pa.RecordBatch, threshold: float) -> pa.RecordBatch:
    """Candidate pairs with both signatures → the pairs whose Jaccard estimate reaches threshold."""
    rows = batch.num_rows
    if rows == 0:
        return pa.RecordBatch.from_pylist([], schema=VERIFIED_SCHEMA)
    sig_a = _signature_matrix(batch.column("sig_a"), rows)
    sig_b = _signature_matrix(batch.column("sig_b"), rows)
    jaccard = estimate_jaccard(sig_a, sig_b)
    keep = pa.array(jaccard >= threshold)
    return pa.RecordBatch.from_arrays(
        [
            batch.column("id_a").filter(keep),
            batch.column("id_b").filter(keep),
            pa.array(jaccard).filter(keep),
        ],
        schema=VERIFIED_SCHEMA,
    )


def _signature_matrix(column: pa.Array, rows: int) -> np.ndarray:
    """A binary column of equal-width signatures as a (rows, num_perm) uint64 matrix."""
    flat = b"".join(column.to_pylist())
    return np.frombuffer(flat, dtype=np.uint64).reshape(rows, -1)


def near_duplicate_clusters(ids_a: np.ndarray, ids_b: np.ndarray) -> dict[str, str]:
    """id → smallest id of its connected component, for every id on a verified edge."""
    if len(ids_a) == 0:
        return {}
    nodes = np.unique(np.concatenate([ids_a, ids_b]))  # sorted: index order is id order
    labels = connected_components(
        len(nodes), np.searchsorted(nodes, ids_a), np.searchsorted(nodes, ids_b)
    )
    return dict(zip(nodes.tolist(), nodes[labels].tolist(), strict=True))


def run_minhash(ctx: StageContext) -> dict[str, Any]:
    """Write `signals/minhash/` (id, near_dup_cluster) for every unique record."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from engine.runtime.spark import map_arrow

    spark, run = ctx.spark, ctx.run
    spec = minhash_settings(ctx.job)
    bucket_window = spec.bucket_window
    bands, rows_per_band = spec.banding()
    log.info(
        "minhash: %d bands x %d rows of %d permutations (P(candidate) at Jaccard %s: %.2f)",
        bands,
        rows_per_band,
        spec.num_perm,
        spec.threshold,
        float(candidate_probability(spec.threshold, bands, rows_per_band)),
    )

    with ctx.phase("signatures"):
        records = (
            spark.read.parquet(str(run.records))
            .filter(F.col("dup_of").isNull())
            .select("id", "conversation")
        )
        signatures_dir = str(run.work("minhash_signatures"))
        map_arrow(records, lambda b: signature_batch(b, spec), SIGNATURE_SCHEMA).write.mode(
            "overwrite"
        ).parquet(signatures_dir)
        signed = spark.read.parquet(signatures_dir)

    with ctx.phase("candidates"):
        buckets = signed.select("id", F.posexplode("band_keys").alias("band", "key"))
        bucket = Window.partitionBy("band", "key")
        ranked = (
            buckets.withColumn("size", F.count(F.lit(1)).over(bucket))
            .filter(F.col("size") > 1)
            .withColumn("rank", F.row_number().over(bucket.orderBy("id")) - 1)
        )
        ranked_dir = str(run.work("minhash_buckets"))
        ranked.write.mode("overwrite").parquet(ranked_dir)
        ranked = spark.read.parquet(ranked_dir)
        window = F.lit(bucket_window)
        left = ranked.select(
            "band",
            "key",
            F.col("id").alias("id_a"),
            F.col("rank").alias("rank_a"),
            F.floor(F.col("rank") / window).alias("block"),
        )
        # Each right row meets its own block and the one before: every rank_b - rank_a <= window.
        right = ranked.select(
            "band",
            "key",
            F.col("id").alias("id_b"),
            F.col("rank").alias("rank_b"),
            F.explode(
                F.array(F.floor(F.col("rank") / window), F.floor(F.col("rank") / window) - 1)
            ).alias("block"),
        )
        candidates = (
            left.join(right, ["band", "key", "block"])
            .filter(
                (F.col("rank_b") > F.col("rank_a")) & (F.col("rank_b") <= F.col("rank_a") + window)
            )
            .select("id_a", "id_b")
            .distinct()
        )
        candidates_dir = str(run.work("minhash_candidates"))
        candidates.write.mode("overwrite").parquet(candidates_dir)
        candidates = spark.read.parquet(candidates_dir)
        candidate_pairs = candidates.count()
        capped = (
            ranked.filter((F.col("rank") == 0) & (F.col("size") > bucket_window + 1))
            .select(
                F.count(F.lit(1)).alias("buckets"),
                F.sum(
                    F.col("size") * (F.col("size") - 1) / 2
                    - (window * (F.col("size") - window) + window * (window - 1) / 2)
                ).alias("skipped"),
            )
            .first()
        )

    with ctx.phase("verify"):
        sig_a = signed.select(F.col("id").alias("id_a"), F.col("signature").alias("sig_a"))
        sig_b = signed.select(F.col("id").alias("id_b"), F.col("signature").alias("sig_b"))
        pairs = candidates.join(sig_a, "id_a").join(sig_b, "id_b")
        edges = map_arrow(
            pairs.select("id_a", "id_b", "sig_a", "sig_b"),
            lambda b: verify_batch(b, spec.threshold),
            VERIFIED_SCHEMA,
        ).toArrow()

    with ctx.phase("components"):
        clusters = near_duplicate_clusters(
            np.asarray(edges["id_a"].to_pylist(), dtype=object).astype(str),
            np.asarray(edges["id_b"].to_pylist(), dtype=object).astype(str),
        )

    with ctx.phase("write"):
        cluster_rows = pa.table(
            {
                "id": pa.array(list(clusters), pa.string()),
                "near_dup_cluster": pa.array(list(clusters.values()), pa.string()),
            }
        )
        membership = spark.createDataFrame(
            cluster_rows.to_pandas(), "id string, near_dup_cluster string"
        )
        rows = signed.count()
        signed.select("id").join(F.broadcast(membership), "id", "left").select(
            "id", "near_dup_cluster"
        ).write.mode("overwrite").parquet(str(run.signal("minhash")))
        RunDir.remove(
            run.work("minhash_signatures"),
            run.work("minhash_buckets"),
            run.work("minhash_candidates"),
        )

    return {
        "rows": rows,
        "candidate_pairs": candidate_pairs,
        "verified_pairs": edges.num_rows,
        "clusters": len(set(clusters.values())),
        "rows_in_clusters": len(clusters),
        "capped_buckets": int(capped["buckets"] or 0),
        "skipped_pairs": int(capped["skipped"] or 0),
        "bucket_window": bucket_window,
        # The banding used (computed when select.dedup.near.bands is null) and its S-curve.
        "bands": bands,
        "rows_per_band": rows_per_band,
        "banding": "explicit" if spec.bands is not None else "optimal",
        "candidate_probability": {
            str(j): round(float(candidate_probability(j, bands, rows_per_band)), 4)
            for j in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
        },
    }


def minhash_settings(job: JobSpec) -> NearDupSpec:
    """The stage's settings live in the selection's dedup block (`select.dedup.near`)."""
    return job.select.dedup.near


STAGE = Stage(
    name="minhash",
    version=1,
    engine="spark",
    reads=("records",),
    writes=("signals/minhash",),
    run=run_minhash,
    settings_of=minhash_settings,
    schema=MINHASH_SCHEMA,
    signal="minhash",
    description="near-duplicate clusters (MinHash LSH, verified by Jaccard)",
)
