"""The evaluation arms of a run: which rows each fine-tune is trained on.

  selected  the rows the selection kept (scores.parquet `selected`)
  random    the random baseline: the same number of rows drawn from the same final pool
            (scores.parquet `random_baseline`)
  full      every eligible row: the pool both were drawn from, i.e. every ingested row that no
            rule rejected (selected, or left out only by the budget: reason below_budget, or by
            DEITA's diversity walk: too_similar). Quarantined rows never reach scores.parquet.
Rows come back as (id, conversation) in id order, the conversation as ingest stored it in
`records/` (messages {role, content}); exact duplicates are stored once under their id.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine import reasons as R
from engine.runtime.rundir import RunDir

ARMS = ("selected", "random", "full")
# Reasons that leave a row in the pool: it passed every rule and lost only to the budget.
POOL_REASONS = (R.BELOW_BUDGET, R.TOO_SIMILAR)

Conversation = list[dict[str, str]]


def arm_ids(run: RunDir, arm: str) -> list[str]:
    """The ids of an arm's rows, sorted."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    if not run.scores.is_file():
        raise FileNotFoundError(f"{run.scores} not found: run the selection before training")
    scores = pq.read_table(run.scores, columns=["id", "selected", "random_baseline", "reason"])
    if arm == "selected":
        mask = scores["selected"]
    elif arm == "random":
        mask = scores["random_baseline"]
    else:
        in_pool = pc.is_in(scores["reason"], value_set=pa.array(POOL_REASONS, pa.string()))
        mask = pc.or_kleene(scores["selected"], pc.fill_null(in_pool, False))
    return sorted(set(scores.filter(mask)["id"].to_pylist()))


def arm_rows(run: RunDir, arm: str) -> list[tuple[str, Conversation]]:
    """(id, conversation) of every row of `arm`, in id order."""
    ids = arm_ids(run, arm)
    if not ids:
        return []
    table = ds.dataset(str(run.records), format="parquet").to_table(
        columns=["id", "conversation"],
        filter=pc.field("dup_of").is_null() & pc.field("id").isin(pa.array(ids, pa.string())),
    )
    found: dict[str, Conversation] = {}
    for record_id, conversation in zip(
        table["id"].to_pylist(), table["conversation"].to_pylist(), strict=True
    ):
        found.setdefault(
            record_id, [{"role": m["role"], "content": m["content"]} for m in conversation]
        )
    missing = [i for i in ids if i not in found]
    if missing:
        raise RuntimeError(
            f"arm {arm}: {len(missing)} ids of scores.parquet are not in records/ "
            f"(e.g. {missing[0]}): the run directory is inconsistent"
        )
    return [(i, found[i]) for i in ids]
