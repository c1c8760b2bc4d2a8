"""Select stage: join sidecars by id, apply filters and the budget, draw the random baseline.

Works on signal columns only (never the conversations), so millions of rows fit the driver.
Every ingested row leaves with `selected` or a `reason`; the first reason wins, in this order:
exact_duplicate, the configured filters in order, below_budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from engine.config import PRESETS, JobSpec
from engine.runtime.rundir import RunDir
from engine.selection.budget import random_select, rank_select, resolve_budget
from engine.selection.filters import first_matching_reason

KEY_COLUMNS = ["id", "source", "row"]


def _read_folder(folder: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pq.read_table(str(folder), columns=columns).to_pandas()


def load_signals(job: JobSpec, run: RunDir) -> pd.DataFrame:
    """One row per ingested record with every signal column, in (source, row) order."""
    frame = _read_folder(run.records, ["id", "source", "source_index", "row", "dup_of"])
    for name in ["indicators", *job.model_signals()]:
        sidecar = _read_folder(run.signal(name))
        frame = frame.merge(sidecar, on="id", how="left", validate="many_to_one")
    return frame.sort_values(["source_index", "row"], kind="stable").reset_index(drop=True)


def select_rows(frame: pd.DataFrame, job: JobSpec) -> tuple[pd.DataFrame, dict]:
    """Decide every row: adds `selected`, `reason`, `random_baseline`. Pure over the frame."""
    spec = job.select
    ids = frame["id"].to_numpy()
    reasons = np.full(len(frame), None, dtype=object)
    reasons[frame["dup_of"].notna().to_numpy()] = "exact_duplicate"
    undecided = pd.isna(reasons)
    rules = spec.rules()
    filtered = first_matching_reason(frame.loc[undecided], rules)
    reasons[np.flatnonzero(undecided)] = filtered
    eligible = pd.isna(reasons)
    k = resolve_budget(spec.budget, int(eligible.sum()))
    score = spec.ranking_score()
    if score is None:
        selected = random_select(ids, eligible, k, job.seed, salt="select")
    else:
        selected = rank_select(
            frame[score].to_numpy(dtype=np.float64), ids, eligible, k, spec.order == "desc"
        )
    reasons[eligible & ~selected] = "below_budget"
    out = frame.drop(columns=["source_index"]).copy()
    out["selected"] = selected
    out["reason"] = pd.array(reasons, dtype="string")
    out["random_baseline"] = random_select(ids, eligible, k, job.seed, salt="baseline")
    summary = {
        "preset": spec.preset,
        "score": score,
        "order": spec.order if score else None,
        "budget": spec.budget,
        "budget_rows": k,
        "eligible": int(eligible.sum()),
        "default_score_of_preset": PRESETS[spec.preset]["score"],
        "filters": [f.model_dump() for f in spec.filters],
    }
    return out, summary


def write_scores(scores: pd.DataFrame, path: Path) -> None:
    """`scores.parquet`: keys first, then signals, then the decision columns."""
    decision = ["selected", "reason", "dup_of", "random_baseline"]
    signals = [c for c in scores.columns if c not in KEY_COLUMNS and c not in decision]
    ordered = scores[[*KEY_COLUMNS, *signals, *decision]]
    tmp = path.with_suffix(".parquet.tmp")
    ordered.to_parquet(tmp, index=False)
    tmp.replace(path)


def run_select(job: JobSpec, run: RunDir) -> dict:
    scores, summary = select_rows(load_signals(job, run), job)
    write_scores(scores, run.scores)
    reasons = scores.loc[~scores["selected"], "reason"].value_counts()
    summary["rejected"] = {str(k): int(v) for k, v in reasons.items()}
    summary["selected"] = int(scores["selected"].sum())
    return summary
