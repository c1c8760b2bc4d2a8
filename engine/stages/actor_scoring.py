"""Ray actor-pool scoring: the Spark → Parquet → Ray → Parquet hand-off every model signal uses.

A model-backed signal is a class whose instances hold one model and map a batch of
`(id, conversation)` to a batch of signal columns keyed by `id`. The driver here:
  1. lists the unique records Spark wrote (exact duplicates share an id: one is scored),
  2. takes what the score cache already holds for the scorer's fingerprint,
  3. writes the rest to `_work/<stage>_input` and runs the class on a Ray Data actor pool sized
     by the stage's `ActorSpec` (CPUs, GPUs, pool size, batch size); Ray Data replaces an actor
     that dies and retries its batch, and a batch's output only counts once it completed,
  4. stores the new rows in the cache and writes the sidecar `signals/<stage>/` (cached + new),
     checking that every unique id is there exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.cache import ScoreCache
from engine.config import ActorSpec
from engine.runtime.rundir import RunDir


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


@dataclass(frozen=True)
class ActorStage:
    """What a model-backed stage declares; the driver decides the rest."""

    name: str
    actor_cls: type
    constructor_kwargs: dict[str, Any]
    spec: ActorSpec
    schema: pa.Schema  # output columns, `id` first
    cache: ScoreCache | None = None


def _unique_ids(records: Path) -> list[str]:
    table = ds.dataset(str(records), format="parquet").to_table(
        columns=["id"], filter=pc.field("dup_of").is_null()
    )
    return table["id"].to_pylist()


def _write_input(records: Path, target: Path, skip: pa.Array) -> int:
    """Unique records not yet scored, as (id, conversation) Parquet for Ray to read."""
    condition = pc.field("dup_of").is_null()
    if len(skip):
        condition = condition & ~pc.field("id").isin(skip)
    scanner = ds.dataset(str(records), format="parquet").scanner(
        columns=["id", "conversation"], filter=condition
    )
    RunDir.reset_dir(target)
    rows = 0
    with pq.ParquetWriter(target / "input.parquet", scanner.projected_schema) as writer:
        for batch in scanner.to_batches():
            if batch.num_rows:
                writer.write_batch(batch)
                rows += batch.num_rows
    return rows


def _score_with_ray(stage: ActorStage, source: Path, output: Path, rows: int) -> None:
    import ray

    spec = stage.spec
    dataset = ray.data.read_parquet(str(source))
    # One input file: split it so every actor gets work.
    blocks = max(4 * spec.concurrency, min(64, rows // max(spec.batch_size, 1) + 1))
    dataset = dataset.repartition(blocks)
    scored = dataset.map_batches(
        stage.actor_cls,
        fn_constructor_kwargs=stage.constructor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=spec.concurrency),
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        batch_size=spec.batch_size,
        batch_format="pyarrow",
    )
    scored.write_parquet(str(output))


def run_actor_stage(stage: ActorStage, run: RunDir) -> dict[str, Any]:
    """Score every unique record (cache first, then Ray); returns counts for the manifest."""
    ids = _unique_ids(run.records)
    cached = stage.cache.lookup(ids) if stage.cache is not None else stage.schema.empty_table()
    work = run.work(f"{stage.name}_input")
    todo = _write_input(run.records, work, cached["id"].combine_chunks())
    fresh_dir = RunDir.reset_dir(run.work(f"{stage.name}_scored"))
    if todo:
        _score_with_ray(stage, work, fresh_dir, todo)
    files = sorted(fresh_dir.glob("*.parquet"))
    fresh = (
        pa.concat_tables([pq.read_table(f) for f in files]).select(stage.schema.names)
        if files
        else stage.schema.empty_table()
    ).cast(stage.schema)
    if stage.cache is not None:
        stage.cache.add(fresh)
    sidecar = pa.concat_tables([cached.cast(stage.schema), fresh])
    got = sidecar["id"].to_pylist()
    if len(got) != len(ids) or set(got) != set(ids):
        raise RuntimeError(
            f"{stage.name}: {len(ids)} unique records but {len(got)} scored rows "
            f"({len(set(got))} distinct ids): rows were lost or scored twice"
        )
    output = RunDir.reset_dir(run.signal(stage.name))
    pq.write_table(sidecar, output / "part-00000.parquet")
    RunDir.remove(work, fresh_dir)
    return {"rows": len(ids), "cache_hits": cached.num_rows, "cache_misses": todo}
