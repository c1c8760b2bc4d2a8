"""Score-cache upkeep: compact bounds the per-run files, gc prunes unused folders, stats counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from engine import cache_admin
from engine.cache import ScoreCache
from engine.cli import app

REPO = Path(__file__).resolve().parents[1]
WRITES = 60
WRITER = f"""
import sys, pyarrow as pa
from engine.cache import ScoreCache
cache = ScoreCache(sys.argv[1], "fp", pa.schema([("id", pa.string()), ("score", pa.float64())]))
for k in range({WRITES}):
    cache.add(pa.table({{"id": [f"w{{k}}"], "score": [1.0]}}, schema=cache.schema))
    cache.lookup(["w0"])
"""
SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])
runner = CliRunner()


def _add(cache: ScoreCache, ids: list[str]) -> None:
    cache.add(pa.table({"id": ids, "score": [float(len(i)) for i in ids]}, schema=SCHEMA))


def _lookup(cache: ScoreCache, ids: list[str]) -> dict[str, float]:
    got = cache.lookup(ids).to_pydict()
    return dict(zip(got["id"], got["score"], strict=True))


def _age(folder: Path, days: float) -> None:
    stamp = time.time() - days * 86400
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (stamp, stamp))


def test_nightly_appends_are_bounded_by_compact(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path, "fp", SCHEMA)
    for night in range(6):  # each night scores 10 new rows and re-scores 2 old ones
        _add(cache, [f"r{night}-{k}" for k in range(10)] + ["r0-0", "r0-1"][: night and 2])
    assert cache_admin.folder_stats(cache.folder).files == 6
    everything = [f"r{n}-{k}" for n in range(6) for k in range(10)]
    before = _lookup(cache, everything)
    result = cache_admin.compact_folder(cache.folder)
    assert (result.files_before, result.files_after) == (6, 1)
    assert result.rows_before == 60 + 5 * 2 and result.rows_after == 60
    assert _lookup(cache, everything) == before
    _add(cache, ["new"])  # the next night appends again; compacting brings it back to one
    assert cache_admin.compact(tmp_path)[0].files_after == 1
    stats = cache_admin.stats(tmp_path)
    assert [(s.fingerprint, s.files, s.rows) for s in stats] == [("fp", 1, 61)]
    assert not list(cache.folder.glob(".*"))  # no temp files left


@settings(max_examples=25, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=6), min_size=1, max_size=5
    )
)
def test_compact_keeps_one_row_per_id_and_the_first_written(batches, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("c")
    cache = ScoreCache(root, "fp", SCHEMA)
    first: dict[str, float] = {}
    for n, batch in enumerate(batches):
        ids = list(dict.fromkeys(batch))
        cache.add(pa.table({"id": ids, "score": [float(n)] * len(ids)}, schema=SCHEMA))
        for i in ids:
            first.setdefault(i, float(n))
        time.sleep(0.002)  # distinct mtimes: compact orders parts by write time
    cache_admin.compact(root)
    assert _lookup(cache, list("abcdefgh")) == first
    assert cache_admin.folder_stats(cache.folder).rows == len(first)


def test_compact_during_concurrent_writes_and_reads_loses_nothing(tmp_path: Path) -> None:
    """A real writer process appends parts while we compact over and over: compact deletes
    only files it merged, so every row the writer added is still there at the end."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    cache = ScoreCache(tmp_path, "fp", SCHEMA)
    compactions = 0
    while writer.poll() is None:
        cache_admin.compact(tmp_path)
        _lookup(cache, ["w0"])  # a reader racing the compaction must not fail
        compactions += 1
    assert writer.returncode == 0
    cache_admin.compact(tmp_path)
    ids = [f"w{k}" for k in range(WRITES)]
    assert set(_lookup(cache, ids)) == set(ids)
    assert cache_admin.folder_stats(cache.folder).files == 1 and compactions > 1


def test_gc_by_age_and_keep_list_with_dry_run(tmp_path: Path) -> None:
    for name in ("old", "kept_old", "fresh"):
        _add(ScoreCache(tmp_path, name, SCHEMA), ["x"])
    _age(tmp_path / "old", 40)
    _age(tmp_path / "kept_old", 40)
    dry = cache_admin.gc(tmp_path, cache_admin.parse_age("30d"), {"kept_old"}, dry_run=True)
    assert {d.fingerprint: d.action for d in dry} == {
        "old": "remove",
        "kept_old": "keep",
        "fresh": "keep",
    }
    assert (tmp_path / "old").is_dir()  # dry run removed nothing
    cache_admin.gc(tmp_path, cache_admin.parse_age("30d"), {"kept_old"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "kept_old"]
    # A keep-list alone removes what is not kept, but never a folder in use right now.
    decisions = cache_admin.gc(tmp_path, None, {"kept_old"})
    assert {d.fingerprint: d.action for d in decisions} == {"fresh": "keep", "kept_old": "keep"}
    assert cache_admin.gc(tmp_path, None, {"kept_old"}, busy_s=0)[0].action == "remove"
    with pytest.raises(ValueError, match="older-than"):
        cache_admin.gc(tmp_path)


def test_a_lookup_counts_as_use(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path, "fp", SCHEMA)
    _add(cache, ["x"])
    _age(cache.folder, 40)
    assert _lookup(cache, ["x"]) == {"x": 1.0}
    assert cache_admin.gc(tmp_path, cache_admin.parse_age("30d"))[0].action == "keep"


def test_parse_age() -> None:
    assert cache_admin.parse_age("30d") == 30 * 86400
    assert cache_admin.parse_age("12h") == 12 * 3600
    assert cache_admin.parse_age("90") == 90
    with pytest.raises(ValueError):
        cache_admin.parse_age("soon")


def test_cli_stats_compact_gc_keep_run(tmp_path: Path) -> None:
    from engine.config import parse_job
    from engine.stages.registry import enabled_stages

    job = parse_job({"inputs": [{"path": "x.jsonl"}], "signals": ["lm"]})
    used = {fp for s in enabled_stages(job) for fp in s.caches(job).values()}
    assert used  # the lm stage has a score cache
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"config": job.model_dump(mode="json")}))
    cache_dir = tmp_path / "scores"
    for name in [*used, "stale"]:
        _add(ScoreCache(cache_dir, name, SCHEMA), ["a"])
        _add(ScoreCache(cache_dir, name, SCHEMA), ["b"])
        _age(cache_dir / name, 10)
    out = runner.invoke(app, ["cache", "stats", "--dir", str(cache_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert {s["fingerprint"]: s["files"] for s in json.loads(out.stdout)} == {
        **dict.fromkeys(used, 2),
        "stale": 2,
    }
    out = runner.invoke(app, ["cache", "compact", "--dir", str(cache_dir)])
    assert out.exit_code == 0 and "2 → 1 files" in out.output
    args = ["cache", "gc", "--dir", str(cache_dir), "--keep-run", str(run), "--older-than", "7d"]
    out = runner.invoke(app, [*args, "--dry-run"])
    assert out.exit_code == 0 and "would remove stale" in out.output
    assert (cache_dir / "stale").is_dir()
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert {p.name for p in cache_dir.iterdir()} == used
    out = runner.invoke(app, ["cache", "gc", "--dir", str(cache_dir)])
    assert out.exit_code == 2 and "older-than" in out.output


def test_stats_and_compact_count_a_damaged_file_instead_of_crashing(tmp_path: Path) -> None:
    """`winnow cache stats` only looks: a file whose footer does not open is counted as damaged;
    `compact` sets it aside (engine.cache.set_aside) and merges the rest."""
    cache = ScoreCache(tmp_path, "fp", SCHEMA)
    _add(cache, ["a", "b"])
    _add(cache, ["c"])
    bad = cache.folder / "cut.parquet"
    bad.write_bytes(next(cache.folder.glob("*.parquet")).read_bytes()[:40])
    (found,) = cache_admin.stats(tmp_path)
    assert (found.files, found.rows, found.damaged) == (3, 3, 1)
    small = cache_admin.compact_folder(cache.folder, min_files=10)  # below min_files: footers
    assert small.rows_before == 3
    result = cache_admin.compact_folder(cache.folder)
    assert (result.files_before, result.rows_after) == (2, 3)
    assert (tmp_path / "_damaged" / "fp" / "cut.parquet").is_file()
    assert sorted(cache.lookup(["a", "b", "c"])["id"].to_pylist()) == ["a", "b", "c"]
    result = CliRunner().invoke(app, ["cache", "stats", "--dir", str(tmp_path)])
    assert result.exit_code == 0 and "3 rows" in result.output, result.output
