"""Export stage: selected rows (and the random baseline) back in their input format, plus `id`.

The original record text was kept at ingest, so export re-emits exactly what the user gave us,
with Winnow's `id` added. A record that already had an `id` field keeps it as `source_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.runtime.rundir import atomic_write
from engine.stages.contract import Stage, StageContext


def export_record(original: str, record_id: str) -> str:
    record = json.loads(original)
    if not isinstance(record, dict):
        record = {"record": record}
    existing = record.pop("id", None)
    out = {"id": record_id}
    if existing is not None and existing != record_id:
        out["source_id"] = existing
    out.update(record)
    return json.dumps(out, ensure_ascii=False)


def export_ids(records: Path, ids: list[str], target: Path) -> int:
    """Write the first occurrence of each id, in (source, row) order; returns lines written."""
    dataset = ds.dataset(str(records), format="parquet")
    table = dataset.to_table(
        columns=["id", "source_index", "row", "original"],
        filter=pc.field("dup_of").is_null() & pc.field("id").isin(pa.array(ids, pa.string())),
    ).sort_by([("source_index", "ascending"), ("row", "ascending")])
    with atomic_write(target) as handle:
        for record_id, original in zip(
            table["id"].to_pylist(), table["original"].to_pylist(), strict=True
        ):
            handle.write(export_record(original, record_id) + "\n")
    return table.num_rows


def run_export(ctx: StageContext) -> dict:
    run = ctx.run
    scores = pq.read_table(run.scores, columns=["id", "selected", "random_baseline"]).to_pandas()
    selected = scores.loc[scores["selected"], "id"].tolist()
    baseline = scores.loc[scores["random_baseline"], "id"].tolist()
    written = export_ids(run.records, selected, run.selected)
    written_baseline = export_ids(run.records, baseline, run.random_baseline)
    if written != len(selected) or written_baseline != len(baseline):
        raise RuntimeError(
            f"export mismatch: {written}/{len(selected)} selected, "
            f"{written_baseline}/{len(baseline)} baseline rows written"
        )
    return {"selected_rows": written, "random_baseline_rows": written_baseline}


STAGE = Stage(
    name="export",
    version=1,
    engine="driver",
    reads=("scores.parquet", "records"),
    writes=("selected.jsonl", "random_baseline.jsonl"),
    run=run_export,
    description="selected rows and the random baseline, in their input format",
)
