"""Report stage: gather a few example rows and render `report.html` from the run's outputs.

Counts come from the typed `Manifest` the pipeline built; `scores.parquet` supplies the
distributions and breakdowns, `records/` and `quarantine.jsonl` the example rows.
"""

from __future__ import annotations

import json
from itertools import islice
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from engine.manifest import Manifest
from engine.report import render_report
from engine.runtime.rundir import RunDir, atomic_write

EXAMPLES_KEPT = 5
EXAMPLES_PER_REASON = 2
EXAMPLES_QUARANTINED = 6


def _conversations(run: RunDir, keys: pd.DataFrame) -> dict[tuple[str, int], list]:
    if keys.empty:
        return {}
    table = ds.dataset(str(run.records), format="parquet").to_table(
        columns=["source", "row", "conversation"],
        filter=pc.field("id").isin(pa.array(keys["id"].unique().tolist(), pa.string())),
    )
    return {
        (source, row): conversation
        for source, row, conversation in zip(
            table["source"].to_pylist(),
            table["row"].to_pylist(),
            table["conversation"].to_pylist(),
            strict=True,
        )
    }


def gather_examples(
    run: RunDir, scores: pd.DataFrame, score_column: str | None, ascending: bool = False
) -> dict:
    """The best kept rows and a couple of rows per rejection reason, with their text."""
    kept = scores[scores["selected"]]
    if score_column and score_column in kept:
        kept = kept.sort_values(score_column, ascending=ascending)
    dropped = scores[~scores["selected"]].groupby("reason", sort=True).head(EXAMPLES_PER_REASON)
    picked = pd.concat([kept.head(EXAMPLES_KEPT), dropped])
    texts = _conversations(run, picked)

    def rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
        return [
            {
                "id": r.id,
                "source": r.source,
                "row": int(r.row),
                "reason": None if pd.isna(r.reason) else str(r.reason),
                "conversation": texts.get((r.source, int(r.row)), []),
            }
            for r in frame.itertuples()
        ]

    quarantined = []
    if run.quarantine.is_file():
        with open(run.quarantine, encoding="utf-8") as handle:
            quarantined = [json.loads(line) for line in islice(handle, EXAMPLES_QUARANTINED)]
    return {
        "kept": rows(kept.head(EXAMPLES_KEPT)),
        "dropped": rows(dropped),
        "quarantined": quarantined,
    }


def run_report(run: RunDir, manifest: Manifest) -> None:
    """Render `report.html` into the run directory (atomically: never half a page)."""
    scores = pd.read_parquet(run.scores)
    score = manifest.selection.get("score")
    examples = gather_examples(
        run,
        scores,
        score if isinstance(score, str) else None,
        ascending=manifest.selection.get("order") == "asc",
    )
    page = render_report(scores, manifest, examples)
    # atomic_write: a failed write (a full disk) removes its temp file and leaves the old page;
    # a fixed `report.html.tmp` name would stay behind, half written, for the next run to trip.
    with atomic_write(run.report) as handle:
        handle.write(page)
