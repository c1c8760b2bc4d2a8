"""Damaged state (issue 14): a truncated or corrupt output, a marker whose outputs are gone, a
corrupt marker, a damaged `_work/` file or score-cache file is detected, named and re-computed.

Fast tests check the verifiers over tmp folders (engine.runtime.rundir, engine.cache); the slow
ones damage a real run (Spark + Ray, `tokens,lm` with the built-in model) and run it again.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from engine.cache import DAMAGED, ScoreCache, schema_problem
from engine.config import parse_job
from engine.runtime.rundir import RunDir, file_problem, output_inventory, verify_outputs
from engine.runtime.spark import local_master_with_retries
from engine.stages.registry import stage as registered

SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])
ROWS = 16  # rows of the real runs: small, the damage is the point


def _table(ids: list[str]) -> pa.Table:
    return pa.table(
        {"id": ids, "score": [float(len(i)) for i in ids]},
        schema=SCHEMA,
    )


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- the run directory's verifier ------------------------------------------------------------


def _stage_outputs(root: Path) -> list[Path]:
    """A sidecar folder as Spark writes it (with `_SUCCESS` and a hidden `.crc`), a JSONL and a
    JSON output."""
    folder = root / "signals" / "lm"
    folder.mkdir(parents=True)
    pq.write_table(_table(["a", "b", "c"]), folder / "part-00000.parquet")
    pq.write_table(_table(["d"]), folder / "part-00001.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".part-00000.parquet.crc").write_bytes(b"\x00junk")
    (root / "selected.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n', encoding="utf-8")
    (root / "results.json").write_text('{"ok": true}', encoding="utf-8")
    return [folder, root / "selected.jsonl", root / "results.json"]


def test_sound_outputs_pass_and_inventory_lists_data_files_only(tmp_path: Path) -> None:
    outputs = _stage_outputs(tmp_path)
    inventory = output_inventory(tmp_path, outputs)
    assert set(inventory) == {
        "signals/lm/part-00000.parquet",
        "signals/lm/part-00001.parquet",
        "selected.jsonl",
        "results.json",
    }
    assert inventory["signals/lm/part-00000.parquet"]["rows"] == 3
    assert verify_outputs(tmp_path, outputs, inventory) == []


@pytest.mark.parametrize(
    ("damage", "path", "problem"),
    [
        ("truncate", "signals/lm/part-00000.parquet", "is damaged (Parquet magic bytes not found"),
        ("garbage", "signals/lm/part-00001.parquet", "is damaged ("),
        ("delete", "signals/lm/part-00001.parquet", "is missing"),
        ("fewer_rows", "signals/lm/part-00000.parquet", "is damaged ("),
        ("bad_line", "selected.jsonl", "is damaged (line 2:"),
        ("bad_json", "results.json", "is damaged ("),
        ("delete", "selected.jsonl", "is missing"),
        ("empty_folder", "signals/lm", "is missing (an empty folder)"),
    ],
)
def test_each_damage_is_named(tmp_path: Path, damage: str, path: str, problem: str) -> None:
    outputs = _stage_outputs(tmp_path)
    inventory = output_inventory(tmp_path, outputs)
    target = tmp_path / path
    if damage == "truncate":
        _truncate(target)
    elif damage == "garbage":
        target.write_bytes(os.urandom(200))
    elif damage == "delete":
        target.unlink()
    elif damage == "fewer_rows":
        pq.write_table(_table(["a"]), target)  # a valid file, but not the one the stage wrote
    elif damage == "bad_line":
        target.write_text('{"id": "a"}\n{"id": "b', encoding="utf-8")
    elif damage == "bad_json":
        target.write_text('{"ok": tr', encoding="utf-8")
    elif damage == "empty_folder":
        for part in target.iterdir():
            part.unlink()
    found = verify_outputs(tmp_path, outputs, inventory)
    assert [d.path for d in found] == [path]
    assert found[0].problem.startswith(problem), found[0].problem


def test_jsonl_of_the_recorded_size_is_checked_at_its_tail(tmp_path: Path) -> None:
    """A JSONL whose size matches its marker is checked at its last line only (a cut shows
    there; a million-row selected.jsonl is not parsed again on every resume); without a
    recorded size every line is parsed."""
    path = tmp_path / "selected.jsonl"
    lines = [json.dumps({"id": str(i), "text": "x" * (i * 7000)}) for i in range(30)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert file_problem(path, tail_only=True) is None and file_problem(path) is None
    path.write_text("\n".join(lines)[:-10], encoding="utf-8")  # cut inside the last record
    assert file_problem(path, tail_only=True).startswith("is damaged (")
    path.write_text("\n".join([*lines[:5], "{oops", *lines[5:]]) + "\n", encoding="utf-8")
    assert file_problem(path, tail_only=True) is None  # the size check catches this one
    assert file_problem(path).startswith("is damaged (line 6:")


def test_structural_damage_is_found_without_an_inventory(tmp_path: Path) -> None:
    """An old marker (no inventory) still gets the footer and parse checks."""
    outputs = _stage_outputs(tmp_path)
    _truncate(tmp_path / "signals/lm/part-00001.parquet", 0.9)
    found = verify_outputs(tmp_path, outputs, None)
    assert [d.path for d in found] == ["signals/lm/part-00001.parquet"]


def test_corrupt_marker_counts_as_absent_and_is_named(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    outputs = _stage_outputs(tmp_path)
    run.mark_done("lm", "fp1", {"info": {"rows": 4}}, outputs)
    assert run.completed("lm", "fp1", outputs) is not None
    assert run.completion("lm", "fp2", outputs).damage is None  # other settings: no damage
    marker = tmp_path / "_stages" / "lm.json"
    marker.write_bytes(marker.read_bytes()[:25])
    state = run.completion("lm", "fp1", outputs)
    assert state.marker is None
    assert state.describe("lm").startswith("lm: _stages/lm.json is damaged (")
    assert state.describe("lm").endswith(" — re-running lm")


def test_completion_names_the_damaged_sidecar(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    outputs = _stage_outputs(tmp_path)
    run.mark_done("lm", "fp1", {}, outputs)
    _truncate(tmp_path / "signals/lm/part-00000.parquet")
    state = run.completion("lm", "fp1", outputs)
    assert state.marker is None
    assert state.describe("lm") == (
        "lm: signals/lm/part-00000.parquet is damaged (Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.) — re-running lm"
    )


# -- the score cache ---------------------------------------------------------------------------


def _cache(root: Path, messages: list[str] | None = None) -> ScoreCache:
    return ScoreCache(root, "fp", SCHEMA, warn=None if messages is None else messages.append)


def _files(cache: ScoreCache) -> list[Path]:
    return sorted(cache.folder.glob("*.parquet"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_column", "wrong_type", "page"])
def test_damaged_cache_file_is_set_aside_and_never_read(tmp_path: Path, damage: str) -> None:
    messages: list[str] = []
    cache = _cache(tmp_path, messages)
    cache.add(_table(["a", "b"]))
    good = _files(cache)[0]
    cache.add(_table(["c", "d"]))
    bad = next(p for p in _files(cache) if p != good)
    if damage == "truncate":
        _truncate(bad)
    elif damage == "garbage":
        bad.write_bytes(os.urandom(300))
    elif damage == "missing_column":  # another Winnow version's columns
        pq.write_table(pa.table({"id": ["c", "d"], "other": [1.0, 2.0]}), bad)
    elif damage == "wrong_type":
        pq.write_table(pa.table({"id": ["c", "d"], "score": ["x", "y"]}), bad)
    elif damage == "page":  # footer intact, a data page overwritten
        data = bytearray(bad.read_bytes())
        data[4:40] = b"\xff" * 36
        bad.write_bytes(bytes(data))
    got = cache.lookup(["a", "b", "c", "d"])
    assert got.to_pydict() == _table(["a", "b"]).to_pydict()
    moved = tmp_path / DAMAGED / "fp" / bad.name
    assert moved.is_file() and not bad.exists() and good.exists()
    assert len(messages) == 1 and f"fp/{bad.name}" in messages[0] and str(moved) in messages[0]
    # The rows come back once re-scored, and the set-aside file stays out of every lookup.
    cache.add(_table(["c", "d"]))
    assert sorted(cache.lookup(["a", "b", "c", "d"])["id"].to_pylist()) == ["a", "b", "c", "d"]
    assert len(messages) == 1


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6),
)
def test_any_damage_to_a_cache_file_never_crashes_or_invents_scores(
    tmp_path_factory: pytest.TempPathFactory, cut: float, flips: list[tuple[float, int]]
) -> None:
    """Property: whatever happens to a file's bytes, a lookup returns only rows that were
    written (exactly), and never crashes."""
    root = tmp_path_factory.mktemp("cache")
    cache = _cache(root, [])
    written = _table([f"id{i}" for i in range(50)])
    cache.add(written)
    path = _files(cache)[0]
    data = bytearray(path.read_bytes())
    for where, value in flips:
        data[min(int(where * len(data)), len(data) - 1)] = value
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))] if cut < 1 else data))
    got = cache.lookup(written["id"].to_pylist())
    expected = dict(zip(written["id"].to_pylist(), written["score"].to_pylist(), strict=True))
    for record_id, score in zip(got["id"].to_pylist(), got["score"].to_pylist(), strict=True):
        assert score == expected[record_id]


def test_schema_problem_names_the_difference() -> None:
    assert schema_problem(SCHEMA, SCHEMA) is None
    assert "no column score" in schema_problem(pa.schema([("id", pa.string())]), SCHEMA)
    extra = SCHEMA.append(pa.field("x", pa.int8()))
    assert "unexpected column x" in schema_problem(extra, SCHEMA)


def test_another_model_version_never_reads_the_old_rows(tmp_path: Path) -> None:
    """A changed model, revision or built-in wheel is another fingerprint, so another cache
    folder: the old rows are invisible to it."""
    lm = registered("lm")

    def key(**block: Any) -> str:
        job = parse_job(
            {"inputs": [{"path": "x.jsonl"}], "signals": ["lm"], "stages": {"lm": block}}
        )
        return lm.fingerprint(job)

    keys = {
        key(),
        key(revision="abc123"),
        key(revision="def456"),
        key(model="HuggingFaceTB/SmolLM2-135M-Instruct"),
    }
    assert len(keys) == 4
    first, *others = sorted(keys)
    ScoreCache(tmp_path, first, SCHEMA).add(_table(["a", "b"]))
    for other in others:
        assert ScoreCache(tmp_path, other, SCHEMA).lookup(["a", "b"]).num_rows == 0


# -- Spark's local master ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("master", "conf", "expected"),
    [
        ("local[*]", {}, "local[*,4]"),
        ("local[2]", {}, "local[2,4]"),
        ("local", {}, "local[1,4]"),
        ("local[2]", {"spark.task.maxFailures": "1"}, "local[2,1]"),
        ("local[2,1]", {}, "local[2,1]"),  # the user's own F stays
        ("local[*, 3]", {}, "local[*, 3]"),
        ("spark://host:7077", {}, "spark://host:7077"),
        ("local-cluster[2,1,1024]", {}, "local-cluster[2,1,1024]"),
    ],
)
def test_local_master_retries_failed_tasks(master: str, conf: dict, expected: str) -> None:
    assert local_master_with_retries(master, conf) == expected


# -- real runs ---------------------------------------------------------------------------------


def _job(path: Path, cache: Path) -> Any:
    return parse_job(
        {
            "inputs": [{"path": str(path)}],
            "signals": ["tokens", "lm"],
            "select": {
                "budget": 8,
                "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
            },
            "stages": {
                "tokens": {"resources": {"batch_size": 16, "num_cpus": 0.5}},
                "lm": {
                    "max_length": 48,
                    "resources": {"batch_size": 8, "num_cpus": 1},
                    "cache": {"dir": str(cache)},
                },
            },
        }
    )


def _execute(job: Any, out: Path) -> tuple[dict, str]:
    from engine.pipeline import JobRunner

    text = io.StringIO()
    console = Console(file=text, width=400, color_system=None)
    manifest = JobRunner(job, out, console=console).execute()
    return manifest.model_dump(mode="json", by_alias=True), text.getvalue()


def _scores(out: Path) -> pd.DataFrame:
    return (
        pd.read_parquet(out / "scores.parquet")
        .sort_values(["source", "row"])
        .reset_index(drop=True)
    )


def _result(out: Path) -> tuple[pd.DataFrame, list[str], dict]:
    selected = [
        json.loads(line)["id"]
        for line in (out / "selected.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return _scores(out), selected, manifest["counts"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict]) -> dict[str, Any]:
    """One undamaged run (its cache filled), kept as the reference."""
    base = tmp_path_factory.mktemp("fault-state")
    path = base / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows[:ROWS]), encoding="utf-8")
    cache = base / "scores-cache"
    out = base / "run"
    manifest, _ = _execute(_job(path, cache), out)
    assert manifest["skipped_stages"] == []
    return {"path": path, "cache": cache, "out": out, "result": _result(out)}


def _same_as_baseline(out: Path, baseline: dict[str, Any]) -> None:
    scores, selected, counts = _result(out)
    want_scores, want_selected, want_counts = baseline["result"]
    pd.testing.assert_frame_equal(scores, want_scores, check_exact=False, rtol=1e-5)
    assert selected == want_selected
    assert counts == want_counts


@pytest.mark.slow
@pytest.mark.usefixtures("spark", "ray_local")
def test_damaged_sidecar_and_corrupt_marker_are_named_and_recomputed(
    baseline: dict[str, Any],
) -> None:
    """A truncated tokens sidecar and a corrupt lm marker: both named, both stages re-run (lm
    from its cache), and select and export too (they read what was redone); ingest is sound."""
    out = baseline["out"]
    tokens_part = next((out / "signals" / "tokens").glob("*.parquet"))
    _truncate(tokens_part, 0.6)
    (out / "_stages" / "lm.json").write_text('{"fingerprint": "', encoding="utf-8")
    manifest, log = _execute(_job(baseline["path"], baseline["cache"]), out)
    tokens_name = tokens_part.relative_to(out).as_posix()
    assert f"tokens: {tokens_name} is damaged (Parquet magic bytes not found" in log
    assert "— re-running tokens" in log
    assert "lm: _stages/lm.json is damaged (" in log and "— re-running lm" in log
    assert manifest["skipped_stages"] == ["ingest"]
    assert manifest["signals"]["lm"]["cache_hits"] == ROWS
    _same_as_baseline(out, baseline)


@pytest.mark.slow
@pytest.mark.usefixtures("spark", "ray_local")
def test_output_gone_under_a_marker_reruns_that_stage_only(baseline: dict[str, Any]) -> None:
    out = baseline["out"]
    (out / "selected.jsonl").unlink()
    manifest, log = _execute(_job(baseline["path"], baseline["cache"]), out)
    assert "export: selected.jsonl is missing — re-running export" in log
    assert manifest["skipped_stages"] == ["ingest", "tokens", "lm", "select"]
    _same_as_baseline(out, baseline)


@pytest.mark.slow
@pytest.mark.usefixtures("spark", "ray_local")
def test_damaged_shard_stale_work_and_cache_file_are_never_read(baseline: dict[str, Any]) -> None:
    """A record shard (ingest's Spark output) cut short; an interrupted earlier run's `_work/`
    (ingest's raw/parsed, lm's input/scored) holding garbage; lm's cache file cut short. Ingest
    is named and everything after it runs again; every stage rebuilds its `_work` from scratch;
    the cache file is set aside and named, its rows scored again and added back."""
    out, cache_root = baseline["out"], baseline["cache"]
    shard = sorted((out / "records").glob("part-*.parquet"))[-1]
    _truncate(shard, 0.5)
    for folder in ("raw", "parsed", "lm_input", "lm_scored"):
        work = out / "_work" / folder
        work.mkdir(parents=True, exist_ok=True)
        (work / "input.parquet").write_bytes(b"PAR1 half a file")
        (work / "part-99999.parquet").write_bytes(os.urandom(64))
    cache_files = sorted(cache_root.glob("*/*.parquet"))
    assert len(cache_files) == 1  # one lm fingerprint, one file (the baseline's)
    damaged = cache_files[0]
    _truncate(damaged, 0.7)
    manifest, log = _execute(_job(baseline["path"], cache_root), out)
    assert f"ingest: records/{shard.name} is damaged (" in log and "— re-running ingest" in log
    assert manifest["skipped_stages"] == []
    moved = cache_root / DAMAGED / damaged.parent.name / damaged.name
    assert moved.is_file() and not damaged.exists()
    assert f"score cache: {damaged.parent.name}/{damaged.name} is damaged (" in log
    assert str(moved) in log
    lm = manifest["signals"]["lm"]
    assert (lm["cache_hits"], lm["cache_misses"]) == (0, ROWS)
    assert not (out / "_work").exists() or not any((out / "_work").iterdir())
    _same_as_baseline(out, baseline)
    # The re-scored rows are back in the cache, in a sound file.
    (again,) = sorted(damaged.parent.glob("*.parquet"))
    assert pq.read_table(again).num_rows == ROWS


def test_atomic_outputs_get_the_users_umask_not_mkstemps_0600(tmp_path: Path) -> None:
    """Outputs are written through a mkstemp temp file (0600); the promoted file must be as
    readable as any other the user creates (report.html is opened by other people)."""
    import stat

    from engine.runtime.rundir import write_json_atomic

    old = os.umask(0o022)
    os.umask(old)
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"ok": True})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old
