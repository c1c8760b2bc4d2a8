"""Select stage: join the sidecars by id into one frame, decide every row with the selection
algorithm (engine.selection.rows.select_rows), write `scores.parquet`.

Works on signal columns and vectors only, never the conversations.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.runtime.rundir import RunDir, atomic_path
from engine.stages.contract import Stage, StageContext

if TYPE_CHECKING:
    from engine.config import JobSpec

KEY_COLUMNS = ["id", "source", "row"]
DECISION_COLUMNS = ["selected", "reason", "dup_of", "random_baseline"]
SCORES_BATCH_ROWS = 131_072  # rows per slice converted to Arrow when writing scores.parquet


def _read_folder(folder: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pq.read_table(str(folder), columns=columns).to_pandas()


def load_signals(job: JobSpec, run: RunDir) -> pd.DataFrame:
    """One row per ingested record with every scalar signal column, in (source, row) order."""
    from engine.stages.registry import VECTOR_COLUMNS, signal_stages

    frame = _read_folder(run.records, ["id", "source", "source_index", "row", "dup_of"])
    for name in ["indicators", *(s.name for s in signal_stages(job))]:
        # Only the scalar columns are read: a vector column (1M x 384 floats is 1.5 GB) never
        # reaches the driver here; load_vectors reads it when a step needs it.
        folder = run.signal(name)
        names = ds.dataset(str(folder), format="parquet").schema.names
        scalar = [c for c in names if c not in VECTOR_COLUMNS]
        if len(scalar) > 1:
            part = _read_folder(folder, scalar)
            frame = frame.merge(part, on="id", how="left", validate="many_to_one")
    return frame.sort_values(["source_index", "row"], kind="stable").reset_index(drop=True)


def load_vectors(run: RunDir, ids: np.ndarray) -> np.ndarray:
    """Embeddings aligned to `ids` (float32, n x d); exact duplicates share their id's vector."""
    table = pq.read_table(str(run.signal("embed")))
    position = {key: i for i, key in enumerate(table["id"].to_pylist())}
    flat = table["embedding"].combine_chunks()
    dim = len(flat[0]) if len(flat) else 0
    matrix = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    matrix = matrix.reshape(len(flat), dim)
    missing = [key for key in ids if key not in position]
    if missing:
        raise RuntimeError(f"embed: {len(missing)} records have no embedding (e.g. {missing[0]})")
    return matrix[np.fromiter((position[key] for key in ids), dtype=np.int64, count=len(ids))]


def write_scores(scores: pd.DataFrame, path: Path) -> None:
    """`scores.parquet`: keys first, then signals, then the decision columns."""
    signals = [c for c in scores.columns if c not in KEY_COLUMNS and c not in DECISION_COLUMNS]
    columns = [*KEY_COLUMNS, *signals, *DECISION_COLUMNS]
    # Converted and written a slice at a time with one schema (taken from the whole frame, so
    # a slice whose object column is all null keeps its type): the driver never holds a second,
    # Arrow copy of the whole table.
    schema = pa.Schema.from_pandas(scores[columns], preserve_index=False)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, max(len(scores), 1), SCORES_BATCH_ROWS):
            part = scores.iloc[start : start + SCORES_BATCH_ROWS][columns]
            writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))


def run_select(ctx: StageContext) -> dict[str, Any]:
    from engine.selection.rows import needs_vectors, select_rows

    job, run = ctx.job, ctx.run
    with ctx.phase("load"):
        frame = load_signals(job, run)
        vectors = load_vectors(run, frame["id"].to_numpy()) if needs_vectors(job) else None
    with ctx.phase("decide"):
        scores, summary = select_rows(frame, job, vectors)
    with ctx.phase("write"):
        write_scores(scores, run.scores)
    reasons = scores.loc[~scores["selected"], "reason"].value_counts()
    summary["rejected"] = {str(k): int(v) for k, v in reasons.items()}
    summary["selected"] = int(scores["selected"].sum())
    return summary


def check_select(job: JobSpec) -> str | None:
    """Option combinations that cannot run (reported when the job is validated)."""
    spec = job.select
    diversity = spec.diversity
    if diversity.prefilter_rows is not None or diversity.prefilter_ratio is not None:
        if spec.selector() != "facility_location":
            return "select.diversity.prefilter_*: only the facility_location selector prefilters"
        if spec.ranking_score() is None:
            return (
                "select.diversity.prefilter_*: the prefilter keeps the best rows by the ranking "
                "score; set select.score (Superfiltering.D: ifd_ppl)"
            )
    return None


def select_settings(job: JobSpec) -> dict[str, Any]:
    return {"select": job.select.model_dump(mode="json"), "seed": job.seed}


STAGE = Stage(
    name="select",
    version=2,
    engine="driver",
    reads=("records", "signals/*"),
    writes=("scores.parquet",),
    run=run_select,
    settings_of=select_settings,
    check=check_select,
    description="filters, dedup, budget, quotas: a decision and a reason for every row",
)
