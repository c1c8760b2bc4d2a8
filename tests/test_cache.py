"""The score cache: rows by (id, fingerprint), appended atomically, one row per id on lookup."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from engine.cache import ScoreCache

SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])


def _table(ids: list[str], scores: list[float]) -> pa.Table:
    return pa.table({"id": ids, "score": scores}, schema=SCHEMA)


def test_lookup_returns_only_cached_ids_once(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path, "fp1", SCHEMA)
    assert cache.lookup(["a"]).num_rows == 0
    cache.add(_table(["a", "b"], [1.0, 2.0]))
    cache.add(_table(["b", "c"], [2.0, 3.0]))  # a concurrent run scored b too
    got = cache.lookup(["a", "b", "x"]).to_pydict()
    assert sorted(zip(got["id"], got["score"], strict=True)) == [("a", 1.0), ("b", 2.0)]
    assert not list(tmp_path.glob("fp1/.*"))  # no temp files left behind


def test_fingerprints_do_not_mix(tmp_path: Path) -> None:
    ScoreCache(tmp_path, "fp1", SCHEMA).add(_table(["a"], [1.0]))
    assert ScoreCache(tmp_path, "fp2", SCHEMA).lookup(["a"]).num_rows == 0
    ScoreCache(tmp_path, "fp2", SCHEMA).add(_table([], []))
    assert not (tmp_path / "fp2").exists()
