"""The quiet console: one progress line or bar per stage, library logs in the run's logs/."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from engine.runtime.console import StageProgress, configure_logging

REPO = Path(__file__).resolve().parents[1]


def plain_console() -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, force_terminal=False, width=120), out


def terminal_console() -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, force_terminal=True, width=120, color_system=None), out


def test_not_a_terminal_one_final_line_per_stage_with_its_count() -> None:
    console, out = plain_console()
    with StageProgress(console) as progress:
        with progress.stage("ingest"):
            report = progress.factory("ingest")
            advance = report("framing alpaca", 2_000_000)
            advance(1_500_000)
            advance(500_000)
            report("framing dolly", 1_000_000)(1_000_000)
        with progress.stage("lm"):
            advance = progress.factory("lm")("lm", 9000)
            for _ in range(9):
                advance(1000)
        with progress.stage("minhash"):
            pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("ingest: 3.0 MB in ")
    assert lines[1].startswith("lm: 9,000 rows in ")
    assert lines[2].startswith("minhash: done in ")


def test_units_follow_the_sub_step_and_slow_rates_read_as_time_per_item() -> None:
    """Training counts optimizer steps ("train <arm>"), framing bytes, everything else rows; a
    rate under 0.1 per second reads as seconds per item ("26.3 s/step", not "0.0 steps/s")."""
    from engine.runtime.console import _rate, unit_of

    assert [unit_of(d) for d in ("train random", "framing a.jsonl", "lm", "judge a vs b")] == [
        "steps",
        "bytes",
        "rows",
        "rows",
    ]
    assert _rate(18 / 473, "steps") == "26.3 s/step"
    assert _rate(0.3, "rows") == "0.3 rows/s"
    assert _rate(250.0, "rows") == "250 rows/s"


def test_a_failed_stage_says_so_and_the_error_propagates() -> None:
    console, out = plain_console()
    with (
        pytest.raises(ValueError, match="boom"),
        StageProgress(console) as progress,
        progress.stage("select"),
    ):
        progress.factory("select")("ranking", 10)(3)
        raise ValueError("boom")
    (line,) = out.getvalue().splitlines()
    assert line.startswith("select: failed after ")


def label(task) -> str:
    return Text.from_markup(task.description).plain


def test_factory_sub_steps_reset_the_stage_bar() -> None:
    console, out = terminal_console()
    with StageProgress(console) as progress:
        assert progress.bars is not None
        with progress.stage("ingest"):
            report = progress.factory("ingest")
            first = report("framing sharegpt", 3_000_000)
            first(1_000_000)
            (task,) = progress.bars.tasks
            assert (task.completed, task.total, task.fields["unit"]) == (
                1_000_000,
                3_000_000,
                "bytes",
            )
            assert label(task) == "ingest · framing sharegpt"
            second = report("parse", 500)
            (task,) = progress.bars.tasks  # still one bar for the stage
            assert (task.completed, task.total, task.fields["unit"]) == (0, 500, "rows")
            assert label(task) == "ingest · parse"
            first(1_000_000)  # a finished sub-step's callback no longer moves the bar
            second(200)
            assert task.completed == 200
            report("unknown size", None)
            assert task.total is None and task.completed == 0  # indeterminate
        with progress.stage("lm"):
            progress.factory("lm")("lm", 40)(40)
    tasks = progress.bars.tasks
    assert len(tasks) == 2 and all(t.finished for t in tasks)
    final = out.getvalue().rsplit("\r", 1)[-1]  # the last frame stays on screen
    assert "✓ ingest" in final and "200 rows, 1.0 MB" in final
    assert "✓ lm" in final and "40 rows" in final


def test_verbose_prints_a_plain_line_when_a_stage_starts_and_ends() -> None:
    console, out = terminal_console()
    with StageProgress(console, enabled=False) as progress:
        assert progress.bars is None
        with progress.stage("lm"):
            progress.factory("lm")("lm", 10)(10)
    assert out.getvalue().splitlines()[0] == "lm: started"
    assert out.getvalue().splitlines()[1].startswith("lm: 10 rows in ")


@pytest.fixture
def routed(tmp_path: Path):
    logs = tmp_path / "logs"
    yield logs
    configure_logging(None)


def test_configure_logging_sends_library_logs_to_the_run_logs(
    routed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ray_data = logging.getLogger("ray.data")
    terminal = logging.StreamHandler(sys.stderr)  # what Ray Data installs on import
    ray_data.addHandler(terminal)
    ray_data.setLevel(logging.DEBUG)
    try:
        configure_logging(routed, verbose=False)
        ray_data.info("Running Dataset: quiet please")
        logging.getLogger("py4j.clientserver").warning("py4j says hello")
        assert capsys.readouterr().err == ""
        winnow_log = (routed / "winnow.log").read_text(encoding="utf-8")
        assert "Running Dataset: quiet please" in winnow_log
        assert "py4j says hello" in winnow_log
        assert "quiet please" in (routed / "ray.log").read_text(encoding="utf-8")
        assert "py4j" not in (routed / "ray.log").read_text(encoding="utf-8")

        configure_logging(routed, verbose=True)  # verbose: back on the terminal
        ray_data.info("Running Dataset: live")
        assert "live" in capsys.readouterr().err
        assert "live" not in (routed / "winnow.log").read_text(encoding="utf-8")
    finally:
        ray_data.removeHandler(terminal)
        ray_data.setLevel(logging.NOTSET)


QUIET_SPARK = """
import sys
from pathlib import Path
from engine.config import SparkSpec
from engine.runtime.spark import spark_session

session = spark_session(SparkSpec(master="local[1]", shuffle_partitions=2), logs=Path(sys.argv[1]))
assert session.range(10).count() == 10
session.stop()
"""


def _runs_silently(script: str, logs: Path, cwd: Path = REPO) -> Path:
    """Run `script` in a fresh Python process in `cwd` with `logs` as its argument; it must print
    nothing. Returns `logs` as seen from here."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(logs)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""
    return cwd / logs


@pytest.mark.slow
def test_a_quiet_spark_session_logs_to_files_not_the_terminal(tmp_path: Path) -> None:
    """In a fresh process, so that this test starts the JVM (Spark keeps one per process). The
    logs folder is relative, as `out: runs/demo` makes it (`make demo` once failed on that)."""
    logs = _runs_silently(QUIET_SPARK, Path("runs/demo/logs"), cwd=tmp_path)
    assert "Running Spark version" in (logs / "spark.log").read_text(encoding="utf-8")
    assert "incubator" in (logs / "spark-jvm.log").read_text(encoding="utf-8")


QUIET_RAY = """
import sys
from pathlib import Path
import ray
from engine.config import RaySpec
from engine.runtime.ray_cluster import ensure_ray

ensure_ray(RaySpec(num_cpus=1), logs=Path(sys.argv[1]))
assert ray.data.range(100).map_batches(lambda b: b).count() == 100
ray.shutdown()
"""


@pytest.mark.slow
def test_a_quiet_ray_logs_to_files_not_the_terminal(tmp_path: Path) -> None:
    logs = _runs_silently(QUIET_RAY, tmp_path / "logs")
    ray_log = (logs / "ray.log").read_text(encoding="utf-8")
    assert "Started a local Ray instance" in ray_log
    assert "Starting execution of Dataset" in ray_log


def test_cli_prints_moved_config_keys_as_deprecated_before_anything_else(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(
        "inputs: [{path: data.jsonl}]\nsignals: [lm]\nstages:\n  lm: {batch_size: 8}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("deprecated: stages.lm.batch_size -> stages.lm.resources.batch_size")
    assert any(line.startswith("ok:") for line in lines)
