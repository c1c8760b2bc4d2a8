"""Ray actor-pool scoring: the Spark → Parquet → Ray → Parquet hand-off every model signal uses.

A model-backed signal is a class whose instances hold one model and map a batch of
`(id, conversation)` to a batch of signal columns keyed by `id`. This module reads the unique
records Spark wrote, runs the class on a Ray Data actor pool sized by the stage's `ActorSpec`
(CPUs, GPUs, pool size, batch size) and writes the sidecar `signals/<name>/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.config import ActorSpec


def _unique_records(batch: pa.Table) -> pa.Table:
    """Exact duplicates share their id and content, so only first occurrences are scored."""
    return batch.filter(pc.is_null(batch["dup_of"])).select(["id", "conversation"])


class PlacementError(ValueError):
    """An actor pool the cluster cannot hold; names the config fields to change."""


def check_placement(spec: ActorSpec, stage: str, cluster_cpus: float) -> None:
    """Refuse a pool that would hold every CPU: Ray Data's read tasks could never be scheduled."""
    wanted = spec.num_cpus * spec.concurrency
    if wanted >= cluster_cpus:
        raise PlacementError(
            f"stages.{stage}: {spec.concurrency} actors x {spec.num_cpus} CPUs = {wanted} "
            f"would hold all {cluster_cpus:g} CPUs of the Ray cluster and starve its read tasks; "
            f"lower stages.{stage}.concurrency or num_cpus (fractions are allowed)"
        )


def run_actor_stage(
    records: Path,
    output: Path,
    actor_cls: type,
    constructor_kwargs: dict[str, Any],
    spec: ActorSpec,
    stage: str,
    schema: pa.Schema,
) -> int:
    """Score every unique record with `actor_cls` on an actor pool; returns rows written."""
    import ray

    check_placement(spec, stage, ray.cluster_resources().get("CPU", 0.0))
    dataset = ray.data.read_parquet(str(records), columns=["id", "conversation", "dup_of"])
    dataset = dataset.map_batches(_unique_records, batch_format="pyarrow")
    # Spark writes a few large files; more blocks than actors keeps every actor busy.
    dataset = dataset.repartition(max(4 * spec.concurrency, 8))
    scored = dataset.map_batches(
        actor_cls,
        fn_constructor_kwargs=constructor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=spec.concurrency),
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        batch_size=spec.batch_size,
        batch_format="pyarrow",
    )
    scored.write_parquet(str(output))
    files = list(output.glob("*.parquet"))
    if not files:  # nothing to score (every row quarantined or duplicated): keep the columns
        pq.write_table(schema.empty_table(), output / "empty.parquet")
    return sum(pq.ParquetFile(file).metadata.num_rows for file in files)
