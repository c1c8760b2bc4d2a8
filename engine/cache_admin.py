"""Score-cache upkeep (`winnow cache stats|compact|gc`): keep the cache from growing forever.

Every run that scores new rows appends one Parquet file per fingerprint folder (engine.cache), so
a nightly job adds a file per model stage per night. `compact` merges a folder's files into one
(one row per id), `gc` removes folders no longer used, `stats` shows what is there.

Safety against runs using the cache at the same time:
  - compact writes the merged file under a temp name and renames it into place before it
    deletes anything, and deletes only the files it merged (a file a run adds meanwhile stays);
    a reader that listed a file just before it was deleted retries (ScoreCache.lookup);
  - gc never removes a folder written or read in the last `busy` seconds (default one hour) or
    one holding a temp file (a write in progress).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.cache import default_score_cache, set_aside
from engine.runtime.rundir import atomic_path

BUSY_S = 3600.0
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderStats:
    fingerprint: str
    files: int
    rows: int
    bytes: int
    last_write: str | None  # ISO time of the newest file
    last_used: str | None  # ISO time of the newest read or write
    damaged: int = 0  # files whose footer does not open (the next lookup sets them aside)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def _last_write(folder: Path) -> float | None:
    stamps = [p.stat().st_mtime for p in _parts(folder)]
    return max(stamps) if stamps else None


def _last_used(folder: Path) -> float:
    """The folder's mtime: set by every write and every lookup (ScoreCache.lookup)."""
    return folder.stat().st_mtime


def folders(root: str | Path | None = None) -> list[Path]:
    """The fingerprint folders of a score cache (default: $WINNOW_CACHE/scores)."""
    base = Path(root or default_score_cache())
    if not base.is_dir():
        return []
    # `.gc-*` folders are being removed; `_damaged` holds files set aside (engine.cache).
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _footer_rows(path: Path) -> int | None:
    """Rows from a part's Parquet footer, None when the footer does not open (damaged)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except FileNotFoundError:
        return 0  # compacted or collected since it was listed
    except (OSError, ValueError):  # ArrowInvalid is a ValueError
        return None


def folder_stats(folder: Path) -> FolderStats:
    """Files, rows (from the Parquet footers: nothing is read), bytes and times of one folder;
    a damaged file is counted, not read (stats only looks: a lookup or compact sets it aside)."""
    parts = _parts(folder)
    rows = [_footer_rows(p) for p in parts]
    return FolderStats(
        fingerprint=folder.name,
        files=len(parts),
        rows=sum(r for r in rows if r is not None),
        bytes=sum(p.stat().st_size for p in parts if p.exists()),
        last_write=_iso(_last_write(folder)),
        last_used=_iso(_last_used(folder)),
        damaged=sum(r is None for r in rows),
    )


def stats(root: str | Path | None = None) -> list[FolderStats]:
    return [folder_stats(folder) for folder in folders(root)]


@dataclass(frozen=True)
class CompactResult:
    fingerprint: str
    files_before: int
    files_after: int
    rows_before: int
    rows_after: int  # one per id


def compact_folder(folder: Path, min_files: int = 2) -> CompactResult:
    """Merge the folder's part files into one, one row per id (the earliest written wins, as
    in a lookup). Writes the new file first, then removes exactly the files it merged."""
    merged = _parts(folder)
    if len(merged) < min_files:
        n = len(merged)
        rows = sum(_footer_rows(p) or 0 for p in merged)
        return CompactResult(folder.name, n, n, rows, rows)
    used = _last_used(folder)
    # Oldest first, so the first row kept per id is the one lookups saw first.
    merged.sort(key=lambda p: (p.stat().st_mtime, p.name))
    tables = []
    for part in list(merged):
        try:
            tables.append(pq.read_table(part))
        except (OSError, ValueError) as exc:  # as ScoreCache.lookup: never merged, set aside
            set_aside(part, folder.parent)
            merged.remove(part)
            logger.warning(
                "score cache: %s/%s is damaged (%s): set aside", folder.name, part.name, exc
            )
    if not tables:
        return CompactResult(folder.name, len(merged), 0, 0, 0)
    table = pa.concat_tables(tables, promote_options="permissive")
    ids = table["id"].to_pylist()
    seen: set[str] = set()
    keep = []
    for record_id in ids:
        keep.append(record_id not in seen)
        seen.add(record_id)
    table = table.filter(pa.array(keep))
    with atomic_path(folder / f"compact-{uuid.uuid4().hex}.parquet") as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)  # as ScoreCache.add
    for part in merged:
        part.unlink(missing_ok=True)
    os.utime(folder, (used, used))  # compacting is upkeep, not use: keep the gc clock
    return CompactResult(folder.name, len(merged), len(_parts(folder)), len(ids), table.num_rows)


def compact(
    root: str | Path | None = None, fingerprints: Iterable[str] | None = None, min_files: int = 2
) -> list[CompactResult]:
    wanted = set(fingerprints) if fingerprints is not None else None
    return [
        compact_folder(folder, min_files)
        for folder in folders(root)
        if wanted is None or folder.name in wanted
    ]


def parse_age(text: str) -> float:
    """'30d', '12h', '45m', '90s' (or plain seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not an age: use e.g. 30d, 12h, 45m")
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[match.group(2)]
    return float(match.group(1)) * unit


def run_fingerprints(run_dir: str | Path) -> set[str]:
    """The score-cache fingerprints a finished run used: recomputed from its manifest's config
    (every cache of every enabled stage, judges included), plus any `fingerprint` its signal
    stages recorded."""
    from engine.config import parse_job
    from engine.stages.registry import enabled_stages

    manifest = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
    found: set[str] = set()
    for info in (manifest.get("signals") or {}).values():
        if isinstance(info, dict) and isinstance(info.get("fingerprint"), str):
            found.add(info["fingerprint"])
    job = parse_job(manifest.get("config") or {})
    for stage in enabled_stages(job):
        found.update(stage.caches(job).values())
    return found


@dataclass(frozen=True)
class GcDecision:
    fingerprint: str
    action: str  # "remove" or "keep"
    why: str
    bytes: int


def gc(
    root: str | Path | None = None,
    older_than_s: float | None = None,
    keep: set[str] | None = None,
    dry_run: bool = False,
    busy_s: float = BUSY_S,
    now: float | None = None,
) -> list[GcDecision]:
    """Remove fingerprint folders unused for `older_than_s` and/or not in `keep` (both given:
    old and not kept). Folders used within `busy_s`, or with a write in progress, always stay."""
    if older_than_s is None and keep is None:
        raise ValueError("gc needs --older-than and/or a keep-list (--keep-run / --keep)")
    now = time.time() if now is None else now
    decisions = []
    for folder in folders(root):
        used = _last_used(folder)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        age = now - used
        if keep is not None and folder.name in keep:
            decision = GcDecision(folder.name, "keep", "in the keep-list", size)
        elif age < busy_s or any(folder.glob(".*.tmp")):
            decision = GcDecision(folder.name, "keep", "in use (recent read/write)", size)
        elif older_than_s is not None and age < older_than_s:
            decision = GcDecision(folder.name, "keep", f"used {age / 86400:.1f} days ago", size)
        else:
            why = [f"unused for {age / 86400:.1f} days"] if older_than_s is not None else []
            if keep is not None:
                why.append("not in the keep-list")
            decision = GcDecision(folder.name, "remove", ", ".join(why), size)
        if decision.action == "remove" and not dry_run:
            # Rename first: a run that starts now sees no folder rather than half of one.
            trash = folder.with_name(f".gc-{folder.name}-{os.getpid()}")
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        decisions.append(decision)
    return decisions
