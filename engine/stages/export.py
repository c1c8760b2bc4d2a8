"""Export stage: selected rows (and the random baseline) back in their input format, plus `id`.

The original record text was kept at ingest, so export re-emits exactly what the user gave us,
with Winnow's `id` added. A record that already had an `id` field keeps it as `source_id`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
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


EXPORT_BATCH_ROWS = 8192


def export_ids(records: Path, ids: list[str], target: Path) -> int:
    """Write the first occurrence of each id, in (source, row) order; returns lines written.

    Streams: `records/` is scanned in batches and each exported line is spilled, unsorted, to a
    temp file beside `target` with its sort key and byte range; the lines are then copied in
    key order. The driver holds three integers per exported row and one batch, never the
    exported text (at a million rows with a 100% budget that would be the whole corpus)."""
    scanner = ds.dataset(str(records), format="parquet").scanner(
        columns=["id", "source_index", "row", "original"],
        filter=pc.field("dup_of").is_null() & pc.field("id").isin(pa.array(ids, pa.string())),
        batch_size=EXPORT_BATCH_ROWS,
    )
    keys: list[np.ndarray] = []  # (source_index, row, offset, length) per spilled line
    fd, spill_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".spill")
    spill = Path(spill_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            offset = 0
            for batch in scanner.to_batches():
                if batch.num_rows == 0:
                    continue
                lines = [
                    (export_record(original, record_id) + "\n").encode("utf-8")
                    for record_id, original in zip(
                        batch.column("id").to_pylist(),
                        batch.column("original").to_pylist(),
                        strict=True,
                    )
                ]
                lengths = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
                starts = offset + np.concatenate(([0], np.cumsum(lengths)[:-1]))
                handle.write(b"".join(lines))
                offset += int(lengths.sum())
                keys.append(
                    np.column_stack(
                        [
                            batch.column("source_index").to_numpy().astype(np.int64),
                            batch.column("row").to_numpy().astype(np.int64),
                            starts,
                            lengths,
                        ]
                    )
                )
        table = np.concatenate(keys) if keys else np.zeros((0, 4), dtype=np.int64)
        order = np.lexsort((table[:, 1], table[:, 0]))  # by source_index, then row
        with open(spill, "rb") as source, atomic_write(target, "wb") as handle:
            for start, length in table[order, 2:]:
                source.seek(int(start))
                handle.write(source.read(int(length)))
    finally:
        spill.unlink(missing_ok=True)
    return len(table)


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
