"""A full disk (or a file-size limit) while a run writes into a completed run directory.

The promise: the command fails with exit code 6 and one line naming the output it was writing
(the traceback goes to the run's log), the previous completed state stays byte for byte, no temp
file is left for a later run to read, and a later run without the limit completes and equals a
clean run. RLIMIT_FSIZE always works (a process limit: CPython, and the JVM it starts, ignore
SIGXFSZ, so a write past the limit fails with EFBIG); a real ENOSPC needs a tmpfs, so that test
runs only where mounting one works.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.cli import EXIT_DISK_FULL
from engine.runtime.disk_full import disk_full_error
from engine.runtime.rundir import atomic_write

REPO = Path(__file__).resolve().parents[1]
WINNOW = [sys.executable, "-m", "engine"]
PUBLIC = ("selected.jsonl", "random_baseline.jsonl", "scores.parquet", "manifest.json")
ROWS = 200
FIRST_BUDGET, CHANGED_BUDGET = "50", "100"
# Above what the JVM itself must write (snappy-java extracts its 281 KB native library into
# /tmp: under a smaller limit Spark fails on that, not on our outputs) and the raw shard the
# driver writes (~0.65 MB), below the Parquet file Spark writes for the long row (~1.2 MB).
SPARK_LIMIT = 900_000


# -- The classifier (fast) -----------------------------------------------------------------------


@given(
    code=st.sampled_from([errno.ENOSPC, errno.EFBIG, errno.EDQUOT]),
    depth=st.integers(0, 3),
    use_cause=st.booleans(),
)
def test_disk_full_errors_are_found_through_any_chain(code: int, depth: int, use_cause: bool):
    exc: BaseException = OSError(code, os.strerror(code), "/runs/a/scores.parquet")
    for level in range(depth):  # wrapped as a stage would wrap it: raised from, or during
        try:
            try:
                raise exc
            except BaseException as inner:
                if use_cause:
                    raise RuntimeError(f"stage failed at level {level}") from inner
                raise RuntimeError(f"stage failed at level {level}")  # noqa: B904
        except RuntimeError as outer:
            exc = outer
    assert disk_full_error(exc, "/runs/a") == ("/runs/a/scores.parquet", os.strerror(code))


@given(code=st.sampled_from([errno.EACCES, errno.ENOENT, errno.EIO, errno.EROFS, None]))
def test_other_errors_are_not_disk_full(code: int | None):
    exc = OSError(code, "boom") if code is not None else ValueError("not an OSError")
    assert disk_full_error(exc, "/runs/a") is None


def test_a_jvm_error_is_found_by_its_text_and_names_the_file_under_the_run():
    # How a Spark executor's failure reads in the driver (a Py4J exception's text).
    text = (
        "An error occurred while calling o123.parquet.\n: org.apache.spark.SparkException: "
        "Job aborted due to stage failure: ... java.io.IOException: File too large\n"
        "\tat java.io.FileOutputStream.writeBytes(Native Method) ... writing "
        "file:/runs/a/records/part-00000-1.snappy.parquet"
    )
    assert disk_full_error(RuntimeError(text), "/runs/a") == (
        "/runs/a/records/part-00000-1.snappy.parquet",
        os.strerror(errno.EFBIG),
    )
    enospc = RuntimeError("ray.exceptions.RayTaskError: OSError: No space left on device")
    assert disk_full_error(enospc, "/runs/a") == ("/runs/a", os.strerror(errno.ENOSPC))


def test_a_real_file_size_limit_in_atomic_write_names_the_output_and_keeps_the_old_file(
    tmp_path: Path,
):
    """A real EFBIG from the kernel (this process's own limit, lowered for one write)."""
    target = tmp_path / "selected.jsonl"
    target.write_text("old\n", encoding="utf-8")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as raised, atomic_write(target) as handle:
            for _ in range(100):
                handle.write("x" * 1000 + "\n")
                handle.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert raised.value.errno == errno.EFBIG
    assert disk_full_error(raised.value, tmp_path) == (str(target), os.strerror(errno.EFBIG))
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selected.jsonl"]


# -- Whole runs (slow) ---------------------------------------------------------------------------


def _limit(max_bytes: int | None):
    if max_bytes is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def winnow_select(
    inputs: Path, out: Path, budget: str, *extra: str, max_bytes: int | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    command = [*WINNOW, "select", str(inputs), "--out", str(out), "--dedup", "none"]
    return subprocess.run(
        [*command, "--budget", budget, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit(max_bytes),
    )


def digests(run: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((run / name).read_bytes()).hexdigest()
        for name in (*PUBLIC, "report.html")
    }


def temp_leftovers(run: Path) -> list[str]:
    return sorted(
        str(p.relative_to(run))
        for p in run.rglob("*")
        if p.name.endswith((".tmp", ".spill")) or ".tmp" in p.suffixes
    )


def assert_clear_disk_failure(
    done: subprocess.CompletedProcess, out: Path, written: str, replaced: str | None = None
) -> None:
    """Exit 6, one `winnow:` line naming the output (and what this run had already replaced),
    no traceback on the console (it is in the run's log)."""
    assert done.returncode == EXIT_DISK_FULL, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("winnow: out of disk")]
    assert len(lines) == 1, done.stderr
    assert f"writing {written}" in lines[0], lines[0]
    if replaced is None:
        assert f"the previous completed state in {out} is unchanged" in lines[0]
    else:
        assert f"stages that completed before it replaced {replaced} in {out}" in lines[0]
    assert "Traceback" not in done.stderr, done.stderr
    assert "Traceback" in (out / "logs" / "winnow.log").read_text(encoding="utf-8")


def assert_same_result(run: Path, clean: Path) -> None:
    """The same rows and decisions (`scores.parquet`), the same exported bytes, the same counts."""
    ours, theirs = (
        pd.read_parquet(run / "scores.parquet"),
        pd.read_parquet(clean / "scores.parquet"),
    )
    pd.testing.assert_frame_equal(ours, theirs)
    for name in ("selected.jsonl", "random_baseline.jsonl"):
        assert (run / name).read_bytes() == (clean / name).read_bytes(), name
    counts = [json.loads((r / "manifest.json").read_text())["counts"] for r in (run, clean)]
    assert counts[0] == counts[1]


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict]) -> Path:
    """200 Alpaca rows and one long row (~1 MB of words drawn from them, seeded): its raw shard,
    which the driver writes, stays under SPARK_LIMIT; the Parquet that Spark's executors write
    for it (conversation and original text: twice the words) does not."""
    rows = alpaca_rows[:ROWS]
    vocabulary = sorted({word for row in rows for word in row["output"].split()})
    rng = random.Random(14)
    long_text = " ".join(rng.choice(vocabulary) for _ in range(120_000))
    rows = [*rows, {"instruction": "Write a very long essay.", "input": "", "output": long_text}]
    path = tmp_path_factory.mktemp("disk-input") / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> Path:
    """A completed run with the first budget (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("disk-first") / "run"
    done = winnow_select(alpaca_file, out, FIRST_BUDGET)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def clean_changed(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> Path:
    """A clean run with the changed budget: what a resumed run must equal."""
    out = tmp_path_factory.mktemp("disk-clean") / "run"
    done = winnow_select(alpaca_file, out, CHANGED_BUDGET)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_file_size_limit_in_driver_and_spark_stages_keeps_the_completed_state(
    tmp_path: Path, alpaca_file: Path, completed: Path, clean_changed: Path
):
    out = tmp_path / "run"
    shutil.copytree(completed, out)
    before = digests(out)
    # Smaller than the scores.parquet the changed budget rewrites (the first public output
    # the re-run writes), larger than a stage marker or the lock file.
    limit = (out / "scores.parquet").stat().st_size // 2

    # 1. A driver stage (select) cannot write scores.parquet: nothing public changes.
    done = winnow_select(alpaca_file, out, CHANGED_BUDGET, max_bytes=limit)
    assert_clear_disk_failure(done, out, str(out / "scores.parquet"))
    assert digests(out) == before
    assert temp_leftovers(out) == []

    # 2. select and export complete, the report (the largest output) cannot be written: the line
    # names what this run had already replaced; the markers say select and export are done, so
    # the next run redoes only the report and the manifest.
    sizes = {name: (clean_changed / name).stat().st_size for name in (*PUBLIC, "report.html")}
    rewritten = ("scores.parquet", "selected.jsonl", "random_baseline.jsonl")
    largest = max(sizes[name] for name in rewritten)
    assert sizes["report.html"] > 1.2 * largest, sizes  # else this step tests nothing
    done = winnow_select(
        alpaca_file, out, CHANGED_BUDGET, max_bytes=(largest + sizes["report.html"]) // 2
    )
    assert_clear_disk_failure(
        done, out, str(out / "report.html"), replaced=", ".join(sorted(rewritten))
    )
    now = digests(out)
    assert all(now[name] != before[name] for name in rewritten)
    assert now["report.html"] == before["report.html"]
    assert now["manifest.json"] == before["manifest.json"]
    assert temp_leftovers(out) == []
    before = now

    # 3. A Spark stage (ingest, forced) cannot write its Parquet in the executors: the
    # failure comes back through Py4J as text ("File too large"); the public outputs stay.
    done = winnow_select(alpaca_file, out, CHANGED_BUDGET, "--force", max_bytes=SPARK_LIMIT)
    assert_clear_disk_failure(done, out, str(out))
    assert digests(out) == before
    assert temp_leftovers(out) == []

    # 4. Without the limit the same command completes and equals a clean run.
    done = winnow_select(alpaca_file, out, CHANGED_BUDGET)
    assert done.returncode == 0, done.stderr
    assert_same_result(out, clean_changed)
    assert temp_leftovers(out) == []


def _mount_tmpfs(target: Path, size: str) -> str | None:
    """Mount a tmpfs at `target`; the reason when this machine does not allow it."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"winnow-{uuid.uuid4().hex[:8]}", target],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else f"mount -t tmpfs refused: {done.stderr.strip()}"


@pytest.mark.slow
def test_no_space_left_on_a_full_filesystem_keeps_the_completed_state(
    tmp_path: Path, alpaca_file: Path, completed: Path, clean_changed: Path
):
    mount = tmp_path / "small-disk"
    reason = _mount_tmpfs(mount, "4m")
    if reason is not None:
        pytest.skip(reason)
    try:
        out = mount / "run"
        shutil.copytree(completed, out)
        before = digests(out)
        # Fill the filesystem up to a few KB, less than the scores.parquet the re-run writes.
        free = shutil.disk_usage(mount).free
        filler = mount / "filler"
        with open(filler, "wb") as handle:
            handle.write(b"\0" * max(0, free - 8192))
        done = winnow_select(alpaca_file, out, CHANGED_BUDGET)
        assert done.returncode == EXIT_DISK_FULL, done.stderr
        line = next(x for x in done.stderr.splitlines() if x.startswith("winnow: out of disk"))
        assert "No space left on device" in line, line
        assert "Traceback" not in done.stderr
        assert digests(out) == before
        assert temp_leftovers(out) == []

        filler.unlink()  # space again: the same command completes and equals a clean run
        done = winnow_select(alpaca_file, out, CHANGED_BUDGET)
        assert done.returncode == 0, done.stderr
        assert_same_result(out, clean_changed)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
