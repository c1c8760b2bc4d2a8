"""The run directory: where every stage writes, and how a re-run knows what is already done.

A stage is complete when its marker (`_stages/<name>.json`) exists; the marker is written after the
stage's data, so a crash mid-stage leaves no marker and the stage runs again. The marker holds a
fingerprint of the stage's inputs (its config and its upstream fingerprints): a changed config
re-runs that stage and everything downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` only if the block ends
    without an error, so a reader never sees half a file and a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """An open file whose content replaces `path` atomically when the block ends (atomic_path)."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class RunDir:
    """Paths of one run's outputs plus stage markers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # Public outputs (the contract users rely on).
    @property
    def selected(self) -> Path:
        return self.root / "selected.jsonl"

    @property
    def random_baseline(self) -> Path:
        return self.root / "random_baseline.jsonl"

    @property
    def scores(self) -> Path:
        return self.root / "scores.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # Intermediate data, one way: records -> signals/<name> -> selection.
    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def logs(self) -> Path:
        """Spark's, Ray's and the model libraries' logs (the console shows progress only)."""
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        """The `eval:` stages' outputs: models/, train/, answers/, judgements/, results.json."""
        return self.root / "eval"

    def signal(self, name: str) -> Path:
        return self.root / "signals" / name

    def work(self, name: str) -> Path:
        return self.root / "_work" / name

    def _marker(self, stage: str) -> Path:
        return self.root / "_stages" / f"{stage}.json"

    def completed(
        self, stage: str, stage_fingerprint: str, outputs: list[Path] | None = None
    ) -> dict[str, Any] | None:
        """The marker's payload if `stage` finished with this fingerprint and its outputs are
        still there, else None."""
        marker = self._marker(stage)
        if not marker.is_file():
            return None
        payload = json.loads(marker.read_text(encoding="utf-8"))
        if payload.get("fingerprint") != stage_fingerprint:
            return None
        if any(not path.exists() for path in outputs or []):
            return None
        return payload

    def mark_done(self, stage: str, stage_fingerprint: str, info: dict[str, Any]) -> None:
        write_json_atomic(self._marker(stage), {"fingerprint": stage_fingerprint, **info})

    def clear(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)

    def write_sidecar(self, name: str, table: Any) -> Path:
        """A signal stage's sidecar `signals/<name>/`, replacing any earlier one."""
        import pyarrow.parquet as pq

        folder = self.reset_dir(self.signal(name))
        pq.write_table(table, folder / "part-00000.parquet")
        return folder

    @staticmethod
    def remove(*paths: Path) -> None:
        """Drop intermediate folders once their stage no longer needs them."""
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def reset_dir(path: Path) -> Path:
        """Empty a stage's output folder so a redo never appends to old shards."""
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path
