"""Two nights of `winnow refresh` on a real local Spark and Ray with the real LM stage, and two
real concurrent `winnow run` processes on one run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NIGHT1_ROWS = 60
NEW_ROWS = 3  # 5%
EDITED = (7,)  # about 1%: row 7's answer is edited in place
runner = CliRunner()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def nights(
    tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict], spark, ray_local
) -> dict:
    base = tmp_path_factory.mktemp("nightly")
    corpus, out, scores = base / "corpus.jsonl", base / "out", base / "scores"
    job = base / "job.yaml"
    job.write_text(
        f"inputs: [{{path: {corpus}}}]\nout: {out}\nsignals: [lm]\n"
        "select: {budget: 20, dedup: {near: {enabled: true}, semantic: {enabled: false}}}\n"
        f"stages: {{lm: {{max_length: 96, cache: {{dir: {scores}}}}}}}\n",
        encoding="utf-8",
    )
    night1 = alpaca_rows[:NIGHT1_ROWS]
    _write_jsonl(corpus, night1)
    started = time.perf_counter()
    first = runner.invoke(app, ["refresh", str(job), "--date", "2026-11-01"])
    assert first.exit_code == 0, first.output
    seconds1 = time.perf_counter() - started
    night2 = [dict(r) for r in night1] + alpaca_rows[NIGHT1_ROWS : NIGHT1_ROWS + NEW_ROWS]
    for k in EDITED:
        night2[k]["output"] += " (edited overnight)"
    _write_jsonl(corpus, night2)
    started = time.perf_counter()
    second = runner.invoke(app, ["refresh", str(job), "--date", "2026-11-02"])
    assert second.exit_code == 0, second.output
    seconds2 = time.perf_counter() - started
    print(f"night 1 {seconds1:.1f}s, night 2 {seconds2:.1f}s")
    return {"out": out, "scores": scores, "night1": night1, "night2": night2}


def _unique(rows: list[dict]) -> set[str]:
    return {json.dumps(r, sort_keys=True) for r in rows}


def test_night2_sends_exactly_new_and_edited_rows_to_the_model(nights: dict) -> None:
    out = nights["out"]
    one = json.loads((out / "2026-11-01" / "manifest.json").read_text())["signals"]["lm"]
    two = json.loads((out / "2026-11-02" / "manifest.json").read_text())["signals"]["lm"]
    fresh = _unique(nights["night2"]) - _unique(nights["night1"])  # new + edited, unique
    assert len(fresh) == NEW_ROWS + len(EDITED)
    assert one["cache_misses"] == len(_unique(nights["night1"])) and one["cache_hits"] == 0
    assert two["cache_misses"] == len(fresh)
    assert two["cache_hits"] == len(_unique(nights["night2"])) - len(fresh)
    changes = json.loads((out / "2026-11-02" / "changes.json").read_text())
    assert changes["model_stages"]["lm"]["cache_misses"] == len(fresh)


def test_changes_json_counts_rows_selection_and_drift(nights: dict) -> None:
    out = nights["out"]
    changes = json.loads((out / "2026-11-02" / "changes.json").read_text())
    assert changes["previous"] == "2026-11-01"
    assert changes["rows"] == {
        "added": NEW_ROWS,
        "removed": 0,
        "changed": len(EDITED),
        "unchanged": NIGHT1_ROWS - len(EDITED),
    }
    assert [s["key"] for s in changes["sources"].values()] == ["row"]  # alpaca rows have no id
    drift = changes["score_drift"]
    assert drift["max_abs_diff"] == 0 and "ifd_ppl" in drift["columns"]
    assert drift["rows_compared"] == NIGHT1_ROWS - len(EDITED)
    # Every move is a real one, with a why that matches the two runs' decisions.
    before = pq.read_table(out / "2026-11-01" / "scores.parquet").to_pandas()
    now = pq.read_table(out / "2026-11-02" / "scores.parquet").to_pandas()
    sel_before = set(before.loc[before["selected"], "id"])
    sel_now = set(now.loc[now["selected"], "id"])
    sel = changes["selection"]
    assert sel["entered"]["rows"] == len(sel_now - sel_before)
    assert sel["left"]["rows"] == len(sel_before - sel_now)
    assert sel["stayed"] == len(sel_now & sel_before)
    for example in sel["entered"]["examples"]:
        assert example["id"] in sel_now - sel_before
        assert (example["why"] == "new row") == (example["id"] not in set(before["id"]))
    report = (out / "2026-11-02" / "report.html").read_text()
    assert "Changes since 2026-11-01" in report and 'id="changes-no-drift"' in report


def test_latest_points_at_the_newest_night(nights: dict) -> None:
    out = nights["out"]
    assert os.readlink(out / "latest") == "2026-11-02"
    assert (out / "LATEST").read_text().strip() == "2026-11-02"
    first = json.loads((out / "2026-11-01" / "changes.json").read_text())
    assert first["previous"] is None
    assert (
        not (out / ".winnow.lock").exists() and not (out / "2026-11-02" / ".winnow.lock").exists()
    )


def test_two_concurrent_runs_on_one_out(tmp_path: Path, alpaca_rows: list[dict]) -> None:
    corpus, out = tmp_path / "c.jsonl", tmp_path / "out"
    _write_jsonl(corpus, alpaca_rows[:40])
    job = tmp_path / "job.yaml"
    job.write_text(
        f"inputs: [{{path: {corpus}}}]\nselect: {{budget: 10, dedup: {{near: {{enabled: false}}, "
        "semantic: {enabled: false}}}\nspark: {master: 'local[1]'}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    command = [sys.executable, "-m", "engine", "run", str(job), "--out", str(out)]
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / ".winnow.lock").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 4  # EXIT_LOCKED
    said = " ".join(second.stderr.split())
    assert f"pid {first.pid}" in said and "is in use by another run" in said
    assert (out / "manifest.json").is_file() and not (out / ".winnow.lock").exists()
