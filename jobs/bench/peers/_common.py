"""Helpers every peer script shares; stdlib only, since each peer runs in its own virtualenv.

A peer script prints one line `PEER_RESULT {json}` (rows, seconds, rows_s, peak_rss_mib,
settings, and whatever else it measures); jobs/bench/side_by_side.py reads that line.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

MARKER = "PEER_RESULT "


def peak_rss_mib() -> float:
    """Peak RSS of this process (VmHWM: ru_maxrss would keep the pre-exec parent's) or of its
    largest finished child, in MiB. side_by_side.py samples the whole tree instead."""
    own = 0
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                own = int(line.split()[1])
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def emit(rows: int, seconds: float, settings: dict, **extra: object) -> None:
    """Print the one result line side_by_side.py parses."""
    result = {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_s": round(rows / seconds, 2) if seconds > 0 else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "settings": settings,
        "python": sys.version.split()[0],
        **extra,
    }
    print(MARKER + json.dumps(result), flush=True)


def text_files(folder: Path) -> list[Path]:
    """The shards of the text input, in order (row order is shard order, then line order)."""
    return sorted(folder.glob("*.jsonl"))


def read_texts(folder: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of every row of the text shards, in row order."""
    for path in text_files(folder):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                yield row["id"], row["text"]


def write_clusters(path: Path, clusters: dict[str, object]) -> None:
    """id -> cluster label (any JSON value) of every clustered row; side_by_side scores them."""
    path.write_text(json.dumps(clusters), encoding="utf-8")
