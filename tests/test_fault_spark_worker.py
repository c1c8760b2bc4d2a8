"""A Spark Python worker killed mid-task (issue 14, "Workers dying").

`winnow select` runs in a subprocess with its own JVM and the default master (`local[*]`, which
Winnow runs as `local[*,4]`: engine.runtime.spark.local_master_with_retries). While ingest
parses, the test SIGKILLs one busy `pyspark.daemon` child (a Python worker running a task) that
descends from the subprocess it started. Spark loses that task and runs it again: the run
finishes with every input row exactly once. With retries off (`local[2,1]`) the run ends with
exit 7 and one line naming the stage and the dead worker, and the same command resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from engine.records import content_id, to_canonical

pytestmark = pytest.mark.slow

TIMEOUT_S = 300


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, command line, CPU ticks used) of every process we can read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = (int(fields[1]), cmdline, int(fields[11]) + int(fields[12]))
    return found


def _descendants(root: int, table: dict[int, tuple[int, str, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _python_workers(root: int) -> dict[int, int]:
    """The Python workers (forked children of a `pyspark.daemon`) below `root`: pid -> ticks."""
    table = _processes()
    mine = _descendants(root, table)
    return {
        pid: table[pid][2]
        for pid in mine
        if "pyspark.daemon" in table[pid][1]
        and table[pid][0] in table
        and "pyspark.daemon" in table[table[pid][0]][1]
    }


def _kill_a_busy_worker(proc: subprocess.Popen, out: Path) -> int:
    """SIGKILL the first Python worker seen using CPU (so inside a task) while ingest runs."""
    deadline = time.monotonic() + TIMEOUT_S
    before: dict[int, int] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "_stages" / "ingest.json").exists():
            break
        now = _python_workers(proc.pid)
        busy = [pid for pid, ticks in now.items() if pid in before and ticks > before[pid]]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            return busy[0]
        before = now
        time.sleep(0.2)
    raise AssertionError("no busy Spark Python worker seen while ingest ran")


def _select(source: Path, out: Path, config: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "engine", "select", str(source), "--out", str(out)]
    command += ["--budget", "50", "--dedup", "none"]
    return command + (["--config", str(config)] if config is not None else [])


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # WINNOW_CACHE: the session's tmp cache
    env.pop("SPARK_HOME", None)
    return env


def _run_killing_a_worker(command: list[str], out: Path) -> tuple[int, str, int]:
    """(exit code, console output, the killed worker's pid) of `command` in its own session."""
    proc = subprocess.Popen(
        command,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        killed = _kill_a_busy_worker(proc, out)
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait()
    return proc.returncode, output.decode(errors="replace"), killed


def _assert_every_row_once(out: Path, rows: list[dict]) -> None:
    """Every input row exactly once: the same ids as the input, counts reconcile."""
    scores = pd.read_parquet(out / "scores.parquet")
    expected = {content_id(to_canonical(r, "alpaca").conversation) for r in rows}
    assert len(scores) == len(rows)
    assert not scores[["source", "row"]].duplicated().any()
    assert sorted(scores["row"]) == list(range(len(rows)))
    assert set(scores["id"]) == expected
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    counts = manifest["counts"]
    assert counts["input"] == len(rows) and counts["quarantined"] == 0
    assert counts["input"] == sum(counts["rejected"].values()) + counts["selected"]


def test_killed_python_worker_task_is_retried_and_no_row_is_lost_or_doubled(
    tmp_path: Path, alpaca_rows: list[dict]
) -> None:
    rows = alpaca_rows
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    code, text, killed = _run_killing_a_worker(_select(source, out), out)
    assert code == 0, text[-3000:]

    # Spark saw the worker die and ran the task again.
    spark_log = (out / "logs" / "spark.log").read_text(encoding="utf-8", errors="replace")
    assert "Lost task" in spark_log, f"worker {killed} was killed but no task was lost"
    assert "Python worker exited unexpectedly (crashed)" in spark_log
    _assert_every_row_once(out, rows)


def test_without_retries_the_death_is_named_and_the_same_command_resumes(
    tmp_path: Path, alpaca_rows: list[dict]
) -> None:
    """`local[2,1]` (no retry): the run ends with exit 7 and one line naming the stage and the
    dead worker, no traceback on the console; the same command then completes, every row once."""
    from engine.cli import EXIT_WORKER_LOST

    rows = alpaca_rows
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "job.yaml"
    config.write_text('spark: {master: "local[2,1]"}\n', encoding="utf-8")
    out = tmp_path / "run"
    command = _select(source, out, config)
    code, text, _ = _run_killing_a_worker(command, out)
    assert code == EXIT_WORKER_LOST, text[-3000:]
    assert "winnow: ingest: a Spark Python worker crashed, and tasks are not retried" in text
    assert "Traceback" not in text and "Py4JJavaError" not in text
    log = (out / "logs" / "winnow.log").read_text(encoding="utf-8")
    assert "Python worker exited unexpectedly" in log  # the traceback went to the run's log
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _assert_every_row_once(out, rows)
