"""Content-addressed score store shared across runs: rows keyed by (id, scorer fingerprint).

`id` is a hash of the normalised conversation, and the fingerprint covers everything that changes
a scorer's numbers (model and revision, template, max_length, backend, dtype), so a cached row is
valid for any run, any corpus, any source that contains the same conversation. Each run appends
one Parquet file per fingerprint folder (written to a temp name, then renamed): concurrent runs
never see half a file, and a crash loses only that run's additions.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.models import cache_root
from engine.runtime.rundir import atomic_path


def default_score_cache() -> Path:
    return cache_root() / "scores"


class ScoreCache:
    """The cached rows of one scorer fingerprint."""

    def __init__(self, root: str | Path | None, fingerprint: str, schema: pa.Schema) -> None:
        self.folder = Path(root or default_score_cache()) / fingerprint
        self.schema = schema

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
            table = ds.dataset(files, schema=self.schema, format="parquet").to_table(
                filter=pc.field("id").isin(wanted)
            )
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

    def add(self, table: pa.Table) -> None:
        """Store newly scored rows."""
        if table.num_rows == 0:
            return
        with atomic_path(self.folder / f"{uuid.uuid4().hex}.parquet") as tmp:
            pq.write_table(table.select(self.schema.names).cast(self.schema), tmp)
