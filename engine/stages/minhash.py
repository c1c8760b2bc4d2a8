"""Near-duplicate stage: MinHash signatures on Spark; candidates, verification and groups on the
driver in numpy.

1. signatures: `mapInArrow` over the unique records (engine.signals.minhash, numpy + a numba
   kernel per batch) writes (id, signature, band keys) to `_work/minhash_signatures`: the one
   Spark job, and the CPU-heavy part;
2. candidates: the driver reads the ids and band keys with Arrow; rows sharing a key in a band
   share a bucket (engine.signals.minhash.bucket_pairs). Bucket cap (boilerplate guard): members
   of a bucket are ranked by id and each is paired only with the next `bucket_window` members in
   that order. A bucket of up to `bucket_window + 1` rows yields all its pairs; a bigger one
   yields about size * bucket_window pairs instead of size^2 / 2. It is deterministic (ids, not
   partitions, decide), and the stage reports how many buckets were capped and how many pairs
   that skipped. A pair skipped in one bucket is still found through any other band it shares,
   and components connect the rest transitively;
3. verify: each distinct candidate pair's Jaccard estimate (the same signatures) must reach
   `threshold`;
4. components: engine.selection.groups.connected_components over the verified edges;
   `near_dup_cluster` is the smallest id of the component, null for a record with no verified
   near-duplicate; written as the sidecar by the driver.

Why steps 2-4 left Spark: at 20k rows the window + self-join + joins took 10 s of jobs and
shuffles (19 s for the stage) for ~0.2 s of numpy work. The driver holds every row's band keys
and signature at once: 8 * (bands + num_perm) bytes a row, ~150 MB at 100k rows, 1.5 GB at 1M.

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
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pydantic import Field, model_validator

from engine.runtime.rundir import RunDir
from engine.selection.groups import connected_components
from engine.signals.embed import record_text
from engine.signals.minhash import (
    MINHASH_SCHEMA,
    band_keys,
    bucket_pairs,
    candidate_probability,
    optimal_banding,
    signatures,
    verify_pairs,
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


def signature_table(folder: str, num_perm: int) -> tuple[pa.Array, np.ndarray, pa.ListArray]:
    """(ids, (rows, num_perm) uint64 signatures, band-key lists) of the signatures Spark wrote,
    read by the driver with Arrow (no Spark job): the candidates need every row's keys at once.
    Batch by batch into one preallocated matrix, so the peak is one copy of the signatures."""
    dataset = ds.dataset(folder, format="parquet")
    matrix = np.empty((dataset.count_rows(), num_perm), dtype=np.uint64)
    ids, keys, at = [], [], 0
    for batch in dataset.to_batches(columns=["id", "signature", "band_keys"]):
        rows = batch.num_rows
        if rows == 0:
            continue
        column = batch.column("signature")
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)
        offsets = offsets[column.offset : column.offset + rows + 1]
        data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        matrix[at : at + rows] = data.view(np.uint64).reshape(rows, num_perm)
        ids.append(batch.column("id"))
        keys.append(batch.column("band_keys"))
        at += rows
    return (
        pa.chunked_array(ids, pa.string()).combine_chunks(),
        matrix[:at],
        pa.chunked_array(keys, SIGNATURE_SCHEMA.field("band_keys").type).combine_chunks(),
    )


def candidate_pairs(
    ids: pa.Array, keys: pa.ListArray, bucket_window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(row order by id, left rows, right rows, capped buckets, skipped pairs) of every row's
    band keys (engine.signals.minhash.bucket_pairs; ranks by id make it partition-independent).
    A row with no key (no shingle) is never a candidate."""
    order = pc.sort_indices(ids).to_numpy()  # rank -> row; Arrow compares UTF-8 bytes, as Spark
    offsets = keys.offsets.to_numpy()
    lengths = np.diff(offsets)
    keyed = order[lengths[order] > 0]  # rows with keys, in id order
    values = keys.flatten().to_numpy()
    bands = int(lengths.max()) if len(lengths) else 0
    if keyed.size == 0 or bands == 0:
        empty = np.zeros(0, dtype=np.int64)
        return order, empty, empty, 0, 0
    starts = offsets[keyed] - offsets[0]
    matrix = values[starts[:, None] + np.arange(bands)]
    left, right, capped, skipped = bucket_pairs(matrix, bucket_window)
    return order, keyed[left], keyed[right], capped, skipped


def cluster_column(
    ids: pa.Array, order: np.ndarray, left: np.ndarray, right: np.ndarray
) -> pa.Array:
    """Each row's `near_dup_cluster` from verified edges between rows: the smallest id of its
    connected component, null for a row on no edge."""
    cluster = np.full(len(ids), -1, dtype=np.int64)  # row of the component's smallest id
    if left.size:
        rank = np.empty(len(ids), dtype=np.int64)
        rank[order] = np.arange(len(ids))
        nodes = np.unique(np.concatenate([rank[left], rank[right]]))  # ranks: id order
        labels = connected_components(
            len(nodes), np.searchsorted(nodes, rank[left]), np.searchsorted(nodes, rank[right])
        )
        cluster[order[nodes]] = order[nodes[labels]]
    named = ids.take(pa.array(np.maximum(cluster, 0)))
    return pc.if_else(pa.array(cluster >= 0), named, pa.scalar(None, pa.string()))


def run_minhash(ctx: StageContext) -> dict[str, Any]:
    """Write `signals/minhash/` (id, near_dup_cluster) for every unique record."""
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

    with ctx.phase("signatures"):  # the one Spark job: the CPU-heavy part, on every executor
        records = (
            spark.read.parquet(str(run.records))
            .filter(F.col("dup_of").isNull())
            .select("id", "conversation")
        )
        signatures_dir = str(run.work("minhash_signatures"))
        map_arrow(records, lambda b: signature_batch(b, spec), SIGNATURE_SCHEMA).write.mode(
            "overwrite"
        ).parquet(signatures_dir)
        ids, signature, keys = signature_table(signatures_dir, spec.num_perm)

    # Candidates, verification and components run on the driver in numpy: at 100k rows the
    # band keys are 14 MB and the signatures 100 MB, and the Spark window + self-join + join
    # they replace cost ~10 s of job and shuffle overhead for ~1 s of work (measured at 20k rows).
    with ctx.phase("candidates"):
        order, left, right, capped, skipped = candidate_pairs(ids, keys, bucket_window)

    with ctx.phase("verify"):
        left_ok, right_ok, _ = verify_pairs(signature, left, right, spec.threshold)
        del signature

    with ctx.phase("components"):
        cluster = cluster_column(ids, order, left_ok, right_ok)

    with ctx.phase("write"):
        run.write_sidecar("minhash", pa.Table.from_arrays([ids, cluster], schema=MINHASH_SCHEMA))
        RunDir.remove(run.work("minhash_signatures"))

    in_clusters = pc.drop_null(cluster)
    return {
        "rows": len(ids),
        "candidate_pairs": int(left.size),
        "verified_pairs": int(left_ok.size),
        "clusters": len(pc.unique(in_clusters)),
        "rows_in_clusters": len(in_clusters),
        "capped_buckets": capped,
        "skipped_pairs": skipped,
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
