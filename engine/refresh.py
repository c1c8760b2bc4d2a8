"""Nightly refresh: what changed between two runs of one job (`changes.json`), and the night's
run directory and `latest` pointer (`winnow refresh`, engine.cli_refresh).

A row is (source, source row key). The key is the record's own `id` field when every ingested
row of that source has one, in both runs, and no two rows share it: that survives rows inserted
or deleted in the middle of a file. Otherwise it is the row's position in the source (its
record number, as framing counted it): stable for an append-only corpus, and an edited row keeps
its position, so it shows up as *changed* (same key, new content id) rather than as one row
removed and one added. Keying by content id would make an edit indistinguishable from a removal
plus an addition, which is exactly the distinction the report needs. The price of position keys:
a row inserted mid-file shifts the keys after it and counts them as changed (the note in
`changes.json` names the key kind per source so a reader knows which applies).

Quarantined rows take part as (source, position) with the content `quarantined:<reason>`.

The pure parts (`row_keys`, `diff_rows`, `selection_changes`, `score_drift`) work on plain data;
`changes` reads two run directories.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from engine.runtime.rundir import atomic_write, write_json_atomic

CHANGES = "changes.json"
LATEST_LINK = "latest"
LATEST_FILE = "LATEST"
EXAMPLES = 5
# Columns of scores.parquet that are keys or decisions, not scores.
NOT_SIGNALS = {"id", "source", "row", "source_index", "selected", "reason", "dup_of"}
NOT_SIGNALS |= {"random_baseline"}

Key = tuple[str, Hashable]  # ("id", value) or ("row", position)


def row_keys(own_ids: Sequence[Any], rows: Sequence[int]) -> tuple[str, list[Key]]:
    """The key kind of one source in one run, and each row's key: the rows' own ids when all
    have a scalar one and they are unique, else positions. See the module docstring."""
    usable = all(isinstance(v, str | int) and not isinstance(v, bool) for v in own_ids)
    if own_ids and usable and len(set(own_ids)) == len(own_ids):
        return "id", [("id", str(v)) for v in own_ids]
    return "row", [("row", int(r)) for r in rows]


def diff_rows(previous: Mapping[Key, str], current: Mapping[Key, str]) -> dict[str, int]:
    """Added, removed, changed (same key, other content) and unchanged rows of one source."""
    common = previous.keys() & current.keys()
    changed = sum(1 for key in common if previous[key] != current[key])
    return {
        "added": len(current.keys() - previous.keys()),
        "removed": len(previous.keys() - current.keys()),
        "changed": changed,
        "unchanged": len(common) - changed,
    }


def _first_per_id(scores: pd.DataFrame) -> pd.DataFrame:
    return scores.drop_duplicates("id", keep="first").set_index("id")


def selection_changes(previous: pd.DataFrame, current: pd.DataFrame) -> dict[str, Any]:
    """Rows (content ids) that entered and left the selection, counted by why: an entered row
    is new, or was rejected before for a reason; a left row was removed from the corpus, or is
    now rejected for a reason (`below_budget`: outranked within the global budget)."""
    prev, cur = _first_per_id(previous), _first_per_id(current)
    prev_sel = set(prev.index[prev["selected"].astype(bool)])
    cur_sel = set(cur.index[cur["selected"].astype(bool)])

    def why_entered(rid: str) -> str:
        if rid not in prev.index:
            return "new row"
        return f"was rejected: {prev.at[rid, 'reason']}"

    def why_left(rid: str) -> str:
        if rid not in cur.index:
            return "removed from the corpus"
        return f"now rejected: {cur.at[rid, 'reason']}"

    def summarise(ids: set[str], why, frame: pd.DataFrame) -> dict[str, Any]:
        ordered = sorted(
            ids, key=lambda rid: (str(frame.at[rid, "source"]), int(frame.at[rid, "row"]))
        )
        reasons = Counter(why(rid) for rid in ordered)
        examples = [
            {
                "id": rid,
                "source": str(frame.at[rid, "source"]),
                "row": int(frame.at[rid, "row"]),
                "why": why(rid),
            }
            for rid in ordered[:EXAMPLES]
        ]
        return {"rows": len(ids), "why": dict(reasons.most_common()), "examples": examples}

    return {
        "selected_before": len(prev_sel),
        "selected_now": len(cur_sel),
        "stayed": len(prev_sel & cur_sel),
        "entered": summarise(cur_sel - prev_sel, why_entered, cur),
        "left": summarise(prev_sel - cur_sel, why_left, prev),
    }


def score_drift(previous: pd.DataFrame, current: pd.DataFrame) -> dict[str, Any]:
    """Per numeric signal column, over content ids present in both runs: the largest absolute
    difference (a row whose value became or stopped being NaN counts in `nan_changed`). Scores
    are functions of the content, so every number here should be 0."""
    prev, cur = _first_per_id(previous), _first_per_id(current)
    common = prev.index.intersection(cur.index)
    columns = {}
    for column in sorted((set(prev.columns) & set(cur.columns)) - NOT_SIGNALS):
        a, b = prev.loc[common, column], cur.loc[common, column]
        if not (_numeric(a) and _numeric(b)):
            continue
        a, b = a.astype("float64"), b.astype("float64")
        both = a.notna() & b.notna()
        diff = (a[both] - b[both]).abs()
        columns[column] = {
            "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
            "rows_differing": int((diff > 0).sum()),
            "nan_changed": int((a.isna() != b.isna()).sum()),
        }
    worst = max((c["max_abs_diff"] for c in columns.values()), default=0.0)
    return {"rows_compared": len(common), "max_abs_diff": worst, "columns": columns}


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def _source_rows(run: Path) -> dict[str, tuple[str, dict[Key, str]]]:
    """Per source: (key kind, {key: content id or quarantined:<reason>})."""
    import pyarrow.parquet as pq

    records = pq.read_table(run / "records", columns=["id", "source", "row", "original"])
    frame = records.to_pandas()
    out: dict[str, tuple[str, dict[Key, str]]] = {}
    for source, group in frame.groupby("source", sort=True):
        own = [_own_id(text) for text in group["original"]]
        kind, keys = row_keys(own, group["row"].tolist())
        out[str(source)] = (kind, dict(zip(keys, group["id"], strict=True)))
    quarantine = run / "quarantine.jsonl"
    if quarantine.is_file():
        with open(quarantine, encoding="utf-8") as handle:
            for line in handle:
                item = json.loads(line)
                kind, rows = out.setdefault(item["source"], ("row", {}))
                rows[("row", int(item["row"]))] = f"quarantined:{item['reason']}"
    return out


def _own_id(original: str | None) -> Any:
    try:
        record = json.loads(original) if original else None
    except ValueError:
        return None
    return record.get("id") if isinstance(record, dict) else None


def _rekey(kind: str, rows: dict[Key, str], run: Path, source: str) -> dict[Key, str]:
    """A source keyed by ids in one run but not the other: fall back to positions for both."""
    if kind == "row":
        return rows
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(str(run / "records"), format="parquet").to_table(
        columns=["row", "id"], filter=pc.field("source") == source
    )
    keyed = {
        ("row", int(r)): i
        for r, i in zip(table["row"].to_pylist(), table["id"].to_pylist(), strict=True)
    }
    keyed.update({k: v for k, v in rows.items() if k[0] == "row"})  # quarantined rows
    return keyed


def _model_stages(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Cache hits and misses of every model stage (misses = rows sent to the model)."""
    found = {}
    for name, info in (manifest.get("signals") or {}).items():
        if isinstance(info, dict) and "cache_misses" in info:
            found[name] = {
                k: info[k] for k in ("rows", "cache_hits", "cache_misses", "parts") if k in info
            }
    return found


def changes(previous_run: str | Path | None, current_run: str | Path) -> dict[str, Any]:
    """What changed since `previous_run` (None: the first night): rows per source, the
    selection, score drift of unchanged rows, and the model stages' cache hits."""
    current = Path(current_run)
    manifest = json.loads((current / "manifest.json").read_text(encoding="utf-8"))
    result: dict[str, Any] = {
        "previous": None,
        "current": current.name,
        "model_stages": _model_stages(manifest),
    }
    if previous_run is None:
        return result
    previous = Path(previous_run)
    before, now = _source_rows(previous), _source_rows(current)
    sources = {}
    for source in sorted(before.keys() | now.keys()):
        kind_b, rows_b = before.get(source, ("row", {}))
        kind_n, rows_n = now.get(source, ("row", {}))
        kind = kind_b if kind_b == kind_n else "row"
        if kind == "row":
            rows_b = _rekey(kind_b, rows_b, previous, source)
            rows_n = _rekey(kind_n, rows_n, current, source)
        sources[source] = {"key": kind, **diff_rows(rows_b, rows_n)}
    totals = {
        k: sum(s[k] for s in sources.values()) for k in ("added", "removed", "changed", "unchanged")
    }
    prev_scores = pd.read_parquet(previous / "scores.parquet")
    cur_scores = pd.read_parquet(current / "scores.parquet")
    result.update(
        previous=previous.name,
        previous_path=str(previous.resolve()),
        rows=totals,
        sources=sources,
        selection=selection_changes(prev_scores, cur_scores),
        score_drift=score_drift(prev_scores, cur_scores),
    )
    return result


def write_changes(previous_run: str | Path | None, current_run: str | Path) -> dict[str, Any]:
    """`changes(...)` written to `<current_run>/changes.json`."""
    data = changes(previous_run, current_run)
    write_json_atomic(Path(current_run) / CHANGES, data)
    return data


def read_latest(out: str | Path) -> Path | None:
    """The run `OUT/latest` points to (the symlink, else the `LATEST` file), if it exists."""
    out = Path(out)
    link = out / LATEST_LINK
    name = None
    if link.is_symlink():
        name = os.readlink(link)
    elif (out / LATEST_FILE).is_file():
        name = (out / LATEST_FILE).read_text(encoding="utf-8").strip()
    if not name:
        return None
    target = out / name
    return target if (target / "manifest.json").is_file() else None


def summary_path(run: str | Path) -> Path | None:
    """The previous run a run's `changes.json` compared with (a re-run of the same night
    compares with the same previous night, not with itself)."""
    try:
        data = json.loads((Path(run) / CHANGES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = data.get("previous_path")
    if not path or not (Path(path) / "manifest.json").is_file():
        return None
    return Path(path)


def set_latest(out: str | Path, run_name: str) -> None:
    """Point `OUT/latest` at `OUT/<run_name>`: the symlink is replaced atomically (a new link
    under a temp name, renamed over the old), and `LATEST` holds the name for filesystems
    without symlinks (object-store mounts, some shared volumes)."""
    out = Path(out)
    with atomic_write(out / LATEST_FILE) as handle:
        handle.write(run_name + "\n")
    tmp = out / f".{LATEST_LINK}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_name, tmp)  # relative: the tree can be moved or mounted elsewhere
        os.replace(tmp, out / LATEST_LINK)
    except OSError:
        tmp.unlink(missing_ok=True)  # no symlinks here: LATEST is the pointer


def report_section(run_root: str | Path | None) -> dict[str, Any] | None:
    """The report's "Changes since <previous>" section from `<run>/changes.json` (None when
    the run has none: not a refresh). A damaged file becomes a note, never an exception."""
    from engine.report.tables import Table

    if run_root is None or not (Path(run_root) / CHANGES).is_file():
        return None
    try:
        data = json.loads((Path(run_root) / CHANGES).read_text(encoding="utf-8"))
        section: dict[str, Any] = {"previous": data.get("previous"), "notes": []}
        section.update(dict.fromkeys(("rows", "selection", "moves", "drift", "drift_table")))
        stages = data.get("model_stages") or {}
        section["stages"] = (
            Table(
                id="changes-stages",
                headers=["stage", "rows", "cache hits", "sent to the model"],
                rows=[
                    [name, s.get("rows"), s.get("cache_hits"), s.get("cache_misses")]
                    for name, s in stages.items()
                ],
                num_columns={1, 2, 3},
            )
            if stages
            else None
        )
        if data.get("previous") is None:
            section["notes"].append("first run of this job: nothing to compare with")
            return section
        kinds = ("added", "removed", "changed", "unchanged")
        sources = data["sources"]
        section["rows"] = Table(
            id="changes-rows",
            headers=["source", "row key", *kinds],
            rows=[[name, s["key"], *(s[k] for k in kinds)] for name, s in sources.items()],
            num_columns={2, 3, 4, 5},
            total=["all sources", "", *(data["rows"][k] for k in kinds)]
            if len(sources) > 1
            else None,
        )
        sel = data["selection"]
        section["selection"] = sel
        section["moves"] = Table(
            id="changes-selection",
            headers=["", "why", "rows"],
            rows=[
                [label, why, n]
                for label, part in (("entered", sel["entered"]), ("left", sel["left"]))
                for why, n in part["why"].items()
            ],
            num_columns={2},
        )
        drift = data["score_drift"]
        section["drift"] = drift
        section["drift_table"] = Table(
            id="changes-drift",
            headers=["signal", "max |Δ|", "rows differing", "NaN changed"],
            rows=[
                [c, d["max_abs_diff"], d["rows_differing"], d["nan_changed"]]
                for c, d in drift["columns"].items()
                if d["max_abs_diff"] or d["nan_changed"]
            ],
            num_columns={1, 2, 3},
        )
        return section
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        note = f"changes.json could not be read: {type(exc).__name__}: {exc}"
        empty = ("rows", "selection", "moves", "drift", "drift_table", "stages")
        return {"previous": None, "notes": [note], **dict.fromkeys(empty)}
