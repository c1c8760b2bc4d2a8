"""Content-addressed score store shared across runs: rows keyed by (id, scorer fingerprint).

`id` is a hash of the normalised conversation, and the fingerprint covers everything that changes
a scorer's numbers (model and revision, template, max_length, backend, dtype), so a cached row is
valid for any run, any corpus, any source that contains the same conversation. Each run appends
one Parquet file per fingerprint folder (written to a temp name, then renamed): concurrent runs
never see half a file, and a crash loses only that run's additions.

A file that cannot be read as this fingerprint's rows (truncated, corrupt, or with other columns:
written by another Winnow version) is never read as scores: `lookup` moves it aside to
`<root>/_damaged/<fingerprint>/`, names it in a warning, and its rows count as not cached, so
the stage scores them again and adds them back.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.models import cache_root
from engine.runtime.rundir import atomic_path

logger = logging.getLogger(__name__)
DAMAGED = "_damaged"  # under the cache root: files set aside, one folder per fingerprint
# Pages written with a checksum (ScoreCache.add) are verified on every read.
CHECKED_PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
)


def default_score_cache() -> Path:
    return cache_root() / "scores"


def schema_problem(found: pa.Schema, expected: pa.Schema) -> str | None:
    """Why a cache file's columns are not `expected`'s (names and types; order and metadata do
    not matter), or None."""
    want = {f.name: f.type for f in expected}
    have = {f.name: f.type for f in found}
    missing = [n for n in want if n not in have]
    if missing:
        return f"schema mismatch: no column {', '.join(missing)}"
    wrong = [f"{n} is {have[n]}, not {t}" for n, t in want.items() if have[n] != t]
    if wrong:
        return f"schema mismatch: {'; '.join(wrong)}"
    extra = [n for n in have if n not in want]
    if extra:
        return f"schema mismatch: unexpected column {', '.join(extra)}"
    return None


def part_problem(path: Path, schema: pa.Schema, full: bool = False) -> str | None:
    """Why a cache part file cannot be read as rows of `schema`, or None: an unreadable footer,
    other columns, or (`full`) a data page that does not decode."""
    try:
        found = pq.read_schema(path)
        problem = schema_problem(found, schema)
        if problem is None and full:
            pq.read_table(path, page_checksum_verification=True)
        return problem
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        lines = str(exc).strip().splitlines()
        return f"damaged ({lines[0] if lines else type(exc).__name__})"


def set_aside(path: Path, root: Path) -> Path | None:
    """Move a damaged part file to `<root>/_damaged/<fingerprint>/` keeping its name (a
    suffix if that name is taken); None if another process moved or removed it first."""
    target_dir = root / DAMAGED / path.parent.name
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    n = 1
    while target.exists():
        target = target_dir / f"{path.stem}.{n}{path.suffix}"
        n += 1
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target


class ScoreCache:
    """The cached rows of one scorer fingerprint."""

    def __init__(
        self,
        root: str | Path | None,
        fingerprint: str,
        schema: pa.Schema,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.root = Path(root or default_score_cache())
        self.folder = self.root / fingerprint
        self.schema = schema
        self.warn = warn  # the stage's log (a damaged file set aside); logging always gets it
        self.set_aside: list[Path] = []  # where this cache's damaged files went

    def _files(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(str(p) for p in self.folder.glob("*.parquet"))

    def lookup(self, ids: list[str]) -> pa.Table:
        """Cached rows for `ids` (one per id), in the cache's schema."""
        files = self._files()
        if not files or not ids:
            return self.schema.empty_table()
        wanted = pa.array(ids, pa.string())
        try:
            # Footers first (cheap): a truncated file or other columns must not reach the scan,
            # which would fill a missing column with nulls. A bad data page behind a good footer
            # fails the scan: then each file is read whole to find it.
            files = self._sound(files)
            try:
                table = self._scan(files, wanted)
            except (OSError, ValueError):
                table = self._scan(self._sound(files, full=True), wanted)
        except FileNotFoundError:
            # `winnow cache compact` merged and removed a file after we listed it: the merged
            # file holds its rows, so list again (engine.cache_admin).
            return self.lookup(ids)
        # Reads count as use for `winnow cache gc --older-than`: the folder's mtime is its
        # last use (adding a file sets it too).
        os.utime(self.folder)
        if table.num_rows == 0:
            return table
        # Two runs may have scored the same id concurrently: keep one row per id.
        seen: set[str] = set()
        keep = []
        for record_id in table["id"].to_pylist():
            keep.append(record_id not in seen)
            seen.add(record_id)
        return table.filter(pa.array(keep))

    def _scan(self, files: list[str], wanted: pa.Array) -> pa.Table:
        if not files:
            return self.schema.empty_table()
        return ds.dataset(files, schema=self.schema, format=CHECKED_PARQUET).to_table(
            filter=pc.field("id").isin(wanted)
        )

    def _sound(self, files: list[str], full: bool = False) -> list[str]:
        """`files` minus the damaged ones, which are set aside and named (module docstring)."""
        sound = []
        for name in files:
            path = Path(name)
            problem = part_problem(path, self.schema, full)
            if problem is None:
                sound.append(name)
                continue
            moved = set_aside(path, self.root)
            if moved is None:
                continue  # gone meanwhile (compact): the caller lists again
            self.set_aside.append(moved)
            message = (
                f"score cache: {self.folder.name}/{path.name} is {problem}: moved to {moved}; "
                "its rows are scored again"
            )
            logger.warning(message)
            if self.warn is not None:
                self.warn(message)
        return sound

    def add(self, table: pa.Table) -> None:
        """Store newly scored rows."""
        if table.num_rows == 0:
            return
        with atomic_path(self.folder / f"{uuid.uuid4().hex}.parquet") as tmp:
            # Page checksums: a flipped bit in a data page fails the read (set aside) instead
            # of decoding as another score.
            pq.write_table(
                table.select(self.schema.names).cast(self.schema), tmp, write_page_checksum=True
            )
