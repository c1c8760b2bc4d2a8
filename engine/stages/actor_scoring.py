"""The one actor driver: the Spark → Parquet → Ray → Parquet hand-off every model-backed stage uses.

A model-backed stage hands over an `ActorPool`: an actor class whose instances hold one model
and map a batch of `(id, conversation[, needs])` to a batch of output columns keyed by `id`, the
stage's resources, and its output parts — one part per score cache (the judge stage has one per
judge, every other stage one). The driver:
  1. lists the unique records Spark wrote (exact duplicates share an id: one is scored),
  2. looks every part's cache up (keyed by the stage's settings fingerprint),
  3. writes the records some part still lacks to `_work/<stage>_input` — with a `needs` column
     naming those parts when there are several — and streams them through a Ray Data actor
     pool sized by the resources (CPUs, GPUs, pool size, batch size; a CPU pool the user did not
     size is fitted to the cluster's nodes: `fit_resources`); Ray Data replaces an actor that
     dies and retries its batch, and a batch only counts once it completed,
  4. adds each part's new rows (only those it was asked for) to its cache and returns every
     part as one table in unique-id order, after checking that every id is there exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from rich.markup import escape

from engine.cache import ScoreCache
from engine.runtime.rundir import RunDir
from engine.stages.contract import ActorResources, StageContext

NEEDS = "needs"
Progress = Callable[[str, int | None], Callable[[int], None]]


class PlacementError(ValueError):
    """An actor pool the cluster cannot hold; names the config fields to change."""


def check_placement(resources: ActorResources, stage: str, cluster_cpus: float) -> None:
    """Refuse a pool that would hold every CPU: Ray Data's read tasks could never be scheduled."""
    wanted = resources.num_cpus * resources.concurrency
    if wanted >= cluster_cpus:
        raise PlacementError(
            f"stages.{stage}.resources: {resources.concurrency} actors x {resources.num_cpus} "
            f"CPUs = {wanted} would hold all {cluster_cpus:g} CPUs of the Ray cluster and starve "
            f"its read tasks; lower stages.{stage}.resources.concurrency or num_cpus "
            "(fractions are allowed)"
        )


# Each node keeps one CPU of Ray's accounting free: Ray Data's read and split tasks ask for one.
READ_CPUS = 1.0
# Torch threads per actor before a node gets a second actor (a second model copy). On a 2-CPU
# machine the old default (1 actor x 1 thread) ran the lm stage at 5.1 rows/s where the bare
# scorer with 2 threads does 10.6 (SmolLM2-135M, jobs/bench/lm_throughput.py --stage). 8 is not
# measured here (2 CPUs): small models' matmuls scale worse past it than a second copy does.
MAX_THREADS_PER_ACTOR = 8
SIZING_FIELDS = frozenset({"num_cpus", "concurrency"})


def default_pool(node_cpus: Sequence[float]) -> tuple[int, float, int] | None:
    """(actors, Ray CPUs per actor, torch threads per actor) for a CPU pool on nodes with these
    CPU counts; None when no node has 2 CPUs (one for the actor, one for the read tasks).

    Every node with at least 2 CPUs gets the same actors, sized by the smallest such node: its
    actors' threads use all of its cores, while their Ray CPUs leave READ_CPUS free (threads
    are not Ray's accounting; the read tasks are short, the actors run all along)."""
    usable = [c for c in node_cpus if c >= 1 + READ_CPUS]
    if not usable:
        return None
    smallest = min(usable)
    per_node = math.ceil(smallest / MAX_THREADS_PER_ACTOR)
    return len(usable) * per_node, (smallest - READ_CPUS) / per_node, int(smallest // per_node)


def fit_resources(resources: ActorResources, node_cpus: Sequence[float]) -> ActorResources:
    """The pool to run: a CPU pool whose size the user left unset (neither `num_cpus` nor
    `concurrency` given) uses the machine (`default_pool`; before: 1 actor x 1 thread, half of
    a 2-CPU machine idle, 5.1 rows/s where the bare scorer does 10.6); `num_threads`, when
    given, always wins. GPU pools and user-sized pools are returned as they are."""
    if resources.num_gpus > 0 or SIZING_FIELDS & resources.model_fields_set:
        return resources
    sized = default_pool(node_cpus)
    if sized is None:
        return resources
    actors, cpus, threads = sized
    update: dict[str, Any] = {"concurrency": actors, "num_cpus": cpus}
    if "num_threads" not in resources.model_fields_set:
        update["num_threads"] = threads
    return resources.model_copy(update=update)


def ray_node_cpus() -> list[float]:
    """CPUs of every live node of the connected Ray cluster."""
    import ray

    return [
        float(node.get("Resources", {}).get("CPU", 0))
        for node in ray.nodes()
        if node.get("Alive", False)
    ]


@dataclass(frozen=True)
class ActorPool:
    """What a model-backed stage hands the driver; the driver decides the rest."""

    name: str
    actor_cls: type
    constructor_kwargs: dict[str, Any]
    resources: ActorResources
    parts: dict[str, pa.Schema]  # part -> its columns, `id` first; one cache per part
    caches: dict[str, ScoreCache] = field(default_factory=dict)  # parts with caching on


@dataclass
class PoolResult:
    ids: list[str]
    tables: dict[str, pa.Table]  # part -> rows in `ids` order
    cache_hits: dict[str, int]
    cache_misses: dict[str, int]
    todo: int  # records sent to the actor pool
    ran_with: ActorResources | None = None  # the pool's resources, when it ran

    def info(self) -> dict[str, Any]:
        """The manifest's counts: totals, and per part when there are several; the actor pool
        it ran (actors x Ray CPUs, torch threads), when one ran."""
        out: dict[str, Any] = {
            "rows": len(self.ids),
            "cache_hits": sum(self.cache_hits.values()),
            "cache_misses": sum(self.cache_misses.values()),
        }
        if self.ran_with is not None:
            res = self.ran_with
            out["actors"] = {
                "concurrency": res.concurrency,
                "num_cpus": res.num_cpus,
                "threads": res.threads(),
            }
        if len(self.tables) > 1:
            out["parts"] = {
                part: {"cache_hits": self.cache_hits[part], "cache_misses": self.cache_misses[part]}
                for part in self.tables
            }
        return out


def unique_ids(records: Path) -> list[str]:
    table = ds.dataset(str(records), format="parquet").to_table(
        columns=["id"], filter=pc.field("dup_of").is_null()
    )
    return table["id"].to_pylist()


def _write_input(records: Path, target: Path, needs: dict[str, list[str]], multi: bool) -> int:
    """The unique records some part still lacks (with the parts each needs, if several)."""
    RunDir.reset_dir(target)
    if not needs:
        return 0
    scanner = ds.dataset(str(records), format="parquet").scanner(
        columns=["id", "conversation"],
        filter=pc.field("dup_of").is_null() & pc.field("id").isin(pa.array(list(needs))),
    )
    schema = scanner.projected_schema
    if multi:
        schema = schema.append(pa.field(NEEDS, pa.list_(pa.string())))
    rows = 0
    with pq.ParquetWriter(target / "input.parquet", schema) as writer:
        for batch in scanner.to_batches():
            if not batch.num_rows:
                continue
            if multi:
                wanted = [needs[i] for i in batch.column("id").to_pylist()]
                batch = pa.RecordBatch.from_arrays(
                    [*batch.columns, pa.array(wanted, pa.list_(pa.string()))], schema=schema
                )
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def stream_actor_pool(
    pool: ActorPool, source: Path, output: Path, rows: int, advance: Callable[[int], None]
) -> ActorResources:
    """Stream the Parquet input in `source` (`rows` rows) through the pool's actors; results
    land in one Parquet file under `output` as they come (in no particular order: key them by a
    column of the input) and `advance` counts them. Refuses a pool the cluster cannot hold
    (`check_placement`). `pool.parts` and `pool.caches` do not apply here: the caller owns what
    goes in and what it does with what comes out (run_actor_pool, the generate stage).
    Returns the resources the pool ran with (`fit_resources`)."""
    import ray

    res = fit_resources(pool.resources, ray_node_cpus())
    check_placement(res, pool.name, float(ray.cluster_resources().get("CPU", 0)))
    kwargs = pool.constructor_kwargs
    if "num_threads" in kwargs:  # the stage passed the threads its own resources implied
        kwargs = {**kwargs, "num_threads": res.threads()}
    dataset = ray.data.read_parquet(str(source))
    # One input file: split it so every actor gets work.
    blocks = max(4 * res.concurrency, min(64, rows // max(res.batch_size, 1) + 1))
    scored = dataset.repartition(blocks).map_batches(
        pool.actor_cls,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=res.concurrency),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        batch_size=res.batch_size,
        batch_format="pyarrow",
    )
    writer: pq.ParquetWriter | None = None
    try:
        for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            if writer is None:
                writer = pq.ParquetWriter(output / "part-00000.parquet", table.schema)
            writer.write_table(table.cast(writer.schema))
            advance(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return res


def run_actor_pool(pool: ActorPool, run: RunDir, progress: Progress) -> PoolResult:
    """Score every unique record (caches first, then Ray); see the module docstring.
    `progress(description, total)` returns the callback that advances the stage's bar."""
    ids = unique_ids(run.records)
    advance = progress(pool.name, len(ids))
    cached: dict[str, pa.Table] = {}
    needs: dict[str, list[str]] = {}
    for part, schema in pool.parts.items():
        cache = pool.caches.get(part)
        cached[part] = cache.lookup(ids).cast(schema) if cache else schema.empty_table()
        have = set(cached[part]["id"].to_pylist())
        for record_id in ids:
            if record_id not in have:
                needs.setdefault(record_id, []).append(part)
    advance(len(ids) - len(needs))
    work = run.work(f"{pool.name}_input")
    todo = _write_input(run.records, work, needs, multi=len(pool.parts) > 1)
    fresh_dir = RunDir.reset_dir(run.work(f"{pool.name}_scored"))
    ran_with = stream_actor_pool(pool, work, fresh_dir, todo, advance) if todo else None
    files = sorted(fresh_dir.glob("*.parquet"))
    fresh = pa.concat_tables([pq.read_table(f) for f in files]) if files else None

    tables: dict[str, pa.Table] = {}
    misses: dict[str, int] = {}
    fresh_ids = fresh["id"].to_pylist() if fresh is not None else []
    for part, schema in pool.parts.items():
        asked = [i for i, rid in enumerate(fresh_ids) if part in needs.get(rid, ())]
        new_rows = (
            fresh.select(schema.names).take(pa.array(asked, pa.int64())).cast(schema)
            if fresh is not None
            else schema.empty_table()
        )
        if part in pool.caches:
            pool.caches[part].add(new_rows)
        rows = pa.concat_tables([cached[part], new_rows])
        got = rows["id"].to_pylist()
        if len(got) != len(ids) or set(got) != set(ids):
            label = pool.name if part == pool.name else f"{pool.name} {part}"
            raise RuntimeError(
                f"{label}: {len(ids)} unique records but {len(got)} scored rows "
                f"({len(set(got))} distinct ids): rows were lost or scored twice"
            )
        position = {rid: k for k, rid in enumerate(got)}
        tables[part] = rows.take(pa.array([position[rid] for rid in ids], pa.int64()))
        misses[part] = len(asked)
    RunDir.remove(work, fresh_dir)
    hits = {part: cached[part].num_rows for part in pool.parts}
    return PoolResult(ids, tables, hits, misses, todo, ran_with)


def score_records(
    ctx: StageContext, actor_cls: type, constructor_kwargs: dict[str, Any], schema: pa.Schema
) -> dict[str, Any]:
    """The common case: one model, one output part, the stage's own cache (when its block has
    `cache:` and it is enabled), written to `signals/<stage>/`. Returns the manifest's facts:
    counts, the model and the fingerprint the cache keys on."""
    spec, name = ctx.spec, ctx.stage.name
    key = ctx.stage.fingerprint(ctx.job)
    cache = getattr(spec, "cache", None)
    caches = {}
    if cache is not None and cache.enabled:
        # A damaged cache file is set aside and named in the stage's log (engine.cache).
        caches[name] = ScoreCache(cache.dir, key, schema, warn=lambda m: ctx.log(escape(m)))
    pool = ActorPool(
        name=name,
        actor_cls=actor_cls,
        constructor_kwargs=constructor_kwargs,
        resources=spec.resources,
        parts={name: schema},
        caches=caches,
    )
    result = run_actor_pool(pool, ctx.run, ctx.progress)
    ctx.run.write_sidecar(name, result.tables[name])
    return {**result.info(), "model": spec.model, "fingerprint": key}
