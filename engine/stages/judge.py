"""LLM-judge stage: every enabled `judge.<name>` with one model on a Ray actor pool, cached per
judge.

Each judge has its own score cache (fingerprint = the judge's definition and version, the model
with the built-in package's version, revision, backend family, dtype, max_length, max_turns), so
enabling another judge later scores only that judge. The driver (a judge-specific variant of
`engine.stages.actor_scoring.run_actor_stage`, reusing its helpers):
  1. lists the unique records; looks every judge's cache up;
  2. writes the records some judge still lacks to `_work/judge_input`, each with the list of the
     judges it needs (`judges` column), and runs `JudgeActor` over them on the actor pool;
  3. adds each judge's new rows (only those it was asked for) to its cache, joins cached and new
     rows into one sidecar `signals/judge/` by id (plus `judge_deita_score` when both DEITA
     judges run) and checks that every unique id is there exactly once.
"""

from __future__ import annotations

import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.cache import ScoreCache, default_score_cache
from engine.config import JobSpec, JudgeStageSpec
from engine.models import BUILTIN_MODELS, cache_root, resolve_model
from engine.runtime.rundir import RunDir, fingerprint
from engine.signals.judge import (
    REASON_UNPARSED,
    JudgeDefinition,
    addresses_grader,
    build_prompt,
    judge_definitions,
    judge_table,
    plan_judge_turns,
    record_columns,
    turn_score,
)
from engine.signals.judge_schema import judge_fields, judge_schema
from engine.signals.registry import judge_names
from engine.stages.actor_scoring import ActorStage, _score_with_ray, _unique_ids, check_placement

# Bump when the stage's arithmetic changes (turn planning, pooling); prompts carry their own.
JUDGE_STAGE_VERSION = 1
STAGE = "judge"


def load_judge_backend(spec: JudgeStageSpec, model_path: str, num_threads: int | None = None):
    """The backend named in the config (imported lazily: vLLM and httpx are heavy)."""
    if spec.backend == "openai":
        from engine.backends.judge_openai import OpenAIJudge

        key_env = spec.openai.api_key_env
        return OpenAIJudge(
            base_url=spec.openai.base_url,
            model=spec.openai.model or model_path,
            api_key=os.environ.get(key_env) if key_env else None,
            concurrency=spec.openai.concurrency,
            timeout_s=spec.openai.timeout_s,
            max_retries=spec.openai.max_retries,
            logprobs=spec.openai.logprobs,
            max_new_tokens=spec.max_new_tokens,
            request_cache_dir=str(cache_root() / "judge_requests"),
        )
    if spec.backend == "vllm":
        from engine.backends.judge_vllm import VllmJudge
        from engine.stages.lm import vllm_dtype

        return VllmJudge(
            model_path,
            dtype=vllm_dtype(spec.dtype),
            max_length=spec.max_length,
            max_new_tokens=spec.max_new_tokens,
            enforce_eager=spec.enforce_eager,
            trust_remote_code=spec.trust_remote_code,
        )
    from engine.backends.judge_transformers import TransformersJudge

    return TransformersJudge(
        model_path,
        dtype=spec.dtype,
        max_length=spec.max_length,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        trust_remote_code=spec.trust_remote_code,
        num_threads=num_threads,
    )


def score_batch(
    backend: Any,
    judges: list[JudgeDefinition],
    conversations: list[list[dict[str, str]]],
    needed: list[set[str]] | None,
    max_length: int,
    max_turns: int | None,
) -> dict[str, list]:
    """Judge columns for a batch of conversations: per judge, only the records that need it
    (others get null score, turns and reason). One backend call per judge."""
    n = len(conversations)
    turns = plan_judge_turns(conversations, max_turns)
    columns: dict[str, list] = {}
    for judge in judges:
        wanted = [r for r in range(n) if needed is None or judge.name in needed[r]]
        wanted_set = set(wanted)
        judge_turns = [t for t in turns if t.record in wanted_set]
        texts = [(t.instruction, t.response if judge.rates_response else "") for t in judge_turns]
        flagged = [addresses_grader(*pair) for pair in texts]
        asked = [t for t, f in zip(judge_turns, flagged, strict=True) if not f]
        prompts = [build_prompt(judge, t, max_length) for t in asked]
        replies = iter(backend.judge(prompts, judge.score_tokens) if prompts else [])
        scores = []
        for is_flagged in flagged:  # screened turns get the scale's lowest score
            if is_flagged:
                scores.append(float(judge.scale[0]))
            else:
                reply = next(replies)
                scores.append(turn_score(reply.text, reply.score_logprobs, judge.scale))
        full = record_columns(judge, n, judge_turns, scores, flagged)
        for name, values in full.items():
            columns[name] = [v if r in wanted_set else None for r, v in enumerate(values)]
    return columns


class JudgeActor:
    """One judge backend per actor: (id, conversation, judges) batches in, judge columns out."""

    def __init__(
        self,
        spec: dict[str, Any],
        model_path: str,
        names: list[str],
        num_threads: int | None = None,
    ) -> None:
        self.spec = JudgeStageSpec.model_validate(spec)
        self.names = names
        self.judges = judge_definitions(names, self.spec.custom)
        self.backend = load_judge_backend(self.spec, model_path, num_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch["id"].to_pylist()
        conversations = batch["conversation"].to_pylist()
        needed = [set(j) for j in batch["judges"].to_pylist()]
        columns = score_batch(
            self.backend,
            self.judges,
            conversations,
            needed,
            self.spec.max_length,
            self.spec.max_turns,
        )
        schema = _rows_schema(self.names)
        data = {"id": ids, **{f.name: columns[f.name] for f in schema if f.name != "id"}}
        return pa.table(data, schema=schema)

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def _rows_schema(names: list[str]) -> pa.Schema:
    """Per-judge columns only (the DEITA score is computed once all rows are together)."""
    fields = [pa.field("id", pa.string())]
    for name in names:
        fields.extend(judge_fields(name))
    return pa.schema(fields)


def model_identity(spec: JudgeStageSpec) -> str:
    builtin = BUILTIN_MODELS.get(spec.model)
    if builtin is None:
        return spec.model
    version = metadata.version(builtin.package.replace("_", "-"))
    return f"{spec.model}@{builtin.package}=={version}"


def judge_fingerprint(spec: JudgeStageSpec, judge: JudgeDefinition) -> str:
    """What changes one judge's numbers; resources and the other judges do not. Backends that
    give log-probabilities (transformers, vLLM, openai with logprobs) share a family; text
    parsing is another."""
    family = "logprob" if spec.backend != "openai" or spec.openai.logprobs else "text"
    model = (spec.openai.model or spec.model) if spec.backend == "openai" else model_identity(spec)
    return fingerprint(
        "judge",
        JUDGE_STAGE_VERSION,
        judge.describe(),
        model,
        spec.revision,
        family,
        spec.dtype if spec.backend != "openai" else None,
        spec.max_length,
        spec.max_turns,
    )


def _write_input(records: Path, target: Path, needs: dict[str, list[str]]) -> int:
    """The unique records some judge still lacks, with the judges each needs."""
    RunDir.reset_dir(target)
    if not needs:
        return 0
    table = ds.dataset(str(records), format="parquet").to_table(
        columns=["id", "conversation"],
        filter=pc.field("dup_of").is_null() & pc.field("id").isin(pa.array(list(needs))),
    )
    judges = pa.array([needs[i] for i in table["id"].to_pylist()], pa.list_(pa.string()))
    table = table.append_column("judges", judges)
    pq.write_table(table, target / "input.parquet")
    return table.num_rows


def run_judge(job: JobSpec, run: RunDir) -> dict[str, Any]:
    spec = job.stages.judge
    names = judge_names(job.signals)
    if not names:
        raise ValueError("the judge stage runs only with a judge.<name> signal enabled")
    judges = judge_definitions(names, spec.custom)
    model_path = (
        spec.model if spec.backend == "openai" else resolve_model(spec.model, spec.revision)
    )
    ids = _unique_ids(run.records)

    caches: dict[str, ScoreCache] = {}
    cached: dict[str, pa.Table] = {}
    for judge in judges:
        schema = judge_schema([judge.name])
        if spec.cache:
            caches[judge.name] = ScoreCache(
                spec.cache_dir or default_score_cache(), judge_fingerprint(spec, judge), schema
            )
            cached[judge.name] = caches[judge.name].lookup(ids)
        else:
            cached[judge.name] = schema.empty_table()
    needs: dict[str, list[str]] = {}
    for judge in judges:
        have = set(cached[judge.name]["id"].to_pylist())
        for record_id in ids:
            if record_id not in have:
                needs.setdefault(record_id, []).append(judge.name)

    work = run.work(f"{STAGE}_input")
    todo = _write_input(run.records, work, needs)
    fresh_dir = RunDir.reset_dir(run.work(f"{STAGE}_scored"))
    rows_schema = _rows_schema(names)
    if todo:
        import ray

        check_placement(spec, STAGE, float(ray.cluster_resources().get("CPU", 0)))
        stage = ActorStage(
            name=STAGE,
            actor_cls=JudgeActor,
            constructor_kwargs={
                "spec": spec.model_dump(),
                "model_path": model_path,
                "names": names,
                "num_threads": max(1, math.ceil(spec.num_cpus)),
            },
            spec=spec,
            schema=rows_schema,
        )
        _score_with_ray(stage, work, fresh_dir, todo)
    files = sorted(fresh_dir.glob("*.parquet"))
    fresh = (
        pa.concat_tables([pq.read_table(f) for f in files]).select(rows_schema.names)
        if files
        else rows_schema.empty_table()
    ).cast(rows_schema)

    # Per judge: cached rows + the fresh rows it was asked for.
    fresh_ids = fresh["id"].to_pylist()
    columns: dict[str, list] = {}
    info: dict[str, Any] = {"judges": {}}
    for judge in judges:
        asked = [i for i, rid in enumerate(fresh_ids) if judge.name in needs.get(rid, ())]
        own = judge_schema([judge.name])
        new_rows = fresh.select(own.names).take(pa.array(asked, pa.int64())).cast(own)
        if judge.name in caches:
            caches[judge.name].add(new_rows)
        rows = pa.concat_tables([cached[judge.name].cast(own), new_rows])
        got = rows["id"].to_pylist()
        if len(got) != len(ids) or set(got) != set(ids):
            raise RuntimeError(
                f"judge {judge.name}: {len(ids)} unique records but {len(got)} scored rows "
                f"({len(set(got))} distinct ids): rows were lost or scored twice"
            )
        position = {rid: k for k, rid in enumerate(got)}
        order = pa.array([position[rid] for rid in ids], pa.int64())
        rows = rows.take(order)
        for f in judge_fields(judge.name):
            columns[f.name] = rows[f.name].to_pylist()
        values = np.asarray(
            [np.nan if v is None else v for v in columns[f"judge_{judge.name}"]], dtype=float
        )
        reasons = columns[f"judge_{judge.name}_reason"]
        info["judges"][judge.name] = {
            "cache_hits": cached[judge.name].num_rows,
            "cache_misses": len(asked),
            "unparsed": sum(r == REASON_UNPARSED for r in reasons),
            "mean": float(np.nanmean(values)) if np.isfinite(values).any() else None,
            "fingerprint": judge_fingerprint(spec, judge),
        }
    sidecar = judge_table(ids, columns, names)
    output = RunDir.reset_dir(run.signal(STAGE))
    pq.write_table(sidecar, output / "part-00000.parquet")
    RunDir.remove(work, fresh_dir)
    return {
        **info,
        "rows": len(ids),
        "scored": todo,
        "backend": spec.backend,
        "model": spec.model,
        "schema": sidecar.schema.names,
    }
