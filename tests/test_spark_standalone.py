"""A job on a real Spark standalone cluster (master + worker JVMs started here from pip
pyspark's `bin/spark-class`) gives the same outputs as the same job on `local[2]`.

Each run is its own `winnow run` process: a JVM can hold one SparkContext, and the session
fixture of other tests (a local[2] one) would otherwise be reused silently. The standalone run
is checked to have used the cluster (an executor directory of its application appears under
the worker's SPARK_WORKER_DIR), not a local master.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyspark
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).parent
ROWS_PER_SOURCE = 100


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until `text` appears in `log` (the daemons print their state there), or fail naming why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: exited with {proc.returncode}:\n{content[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"{log.name}: no {text!r} within {timeout:.0f}s:\n{content[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemons shut down their executors), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def standalone(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A standalone master and one worker (2 cores, 2g) on 127.0.0.1; yields (URL, work dir)."""
    base = tmp_path / "spark-cluster"
    work, logs = base / "work", base / "logs"
    work.mkdir(parents=True)
    logs.mkdir()
    env = {
        **os.environ,
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_WORKER_DIR": str(work),
        "SPARK_LOG_DIR": str(logs),
        "SPARK_DAEMON_MEMORY": "512m",
        # The master's REST submission server listens on a fixed port (6066) by default.
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
        "PYSPARK_PYTHON": sys.executable,
    }
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        with open(logs / "master.out", "wb") as sink:
            master = subprocess.Popen(
                [
                    spark_class,
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--webui-port",
                    str(_free_port()),
                ],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=base,
            )
        procs.append(master)
        _wait_for(logs / "master.out", "I have been elected leader", master, 120)
        with open(logs / "worker.out", "wb") as sink:
            worker = subprocess.Popen(
                [
                    spark_class,
                    "org.apache.spark.deploy.worker.Worker",
                    url,
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    "2",
                    "--memory",
                    "2g",
                    "--work-dir",
                    str(work),
                    "--webui-port",
                    str(_free_port()),
                ],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=base,
            )
        procs.append(worker)
        _wait_for(logs / "worker.out", "Successfully registered with master", worker, 120)
        yield url, work
    finally:
        for proc in reversed(procs):  # the worker first: it stops its executors
            _stop(proc)


def _compare_runs():
    """jobs/tools/compare_runs.py (a script, not a package), loaded by path."""
    path = REPO / "jobs" / "tools" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(tmp: Path, sources: list[Path], master: str) -> Path:
    """Default signals (indicators; MinHash near-duplicates on Spark), no model stage."""
    spec = {
        "inputs": [{"path": str(p)} for p in sources],
        "seed": 0,
        "select": {"preset": "longest", "budget": 60, "dedup": {"semantic": {"enabled": False}}},
        "spark": {
            "master": master,
            "driver_memory": "1g",
            "shuffle_partitions": 2,
            "conf": {"spark.executor.memory": "1g", "spark.cores.max": "2"},
        },
    }
    name = "standalone" if master.startswith("spark://") else "local"
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _winnow_run(job: Path, out: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from engine.cli import app; app()",
            "run",
            str(job),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, f"winnow run {job.name} failed:\n{done.stderr[-4000:]}"
    return time.perf_counter() - started


def test_standalone_cluster_matches_local(
    tmp_path: Path,
    standalone: tuple[str, Path],
    alpaca_rows: list[dict],
    dolly_rows: list[dict],
) -> None:
    url, work = standalone
    sources = []
    # One row of each source is the same conversation: a cross-source duplicate on both masters.
    dolly = [*dolly_rows[:ROWS_PER_SOURCE]]
    dolly[-1] = {**alpaca_rows[0], "category": "planted"}
    for name, rows in (("alpaca", alpaca_rows[:ROWS_PER_SOURCE]), ("dolly", dolly)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        sources.append(path)

    on_cluster = tmp_path / "run-standalone"
    seconds_cluster = _winnow_run(_job(tmp_path, sources, url), on_cluster)
    seconds_local = _winnow_run(_job(tmp_path, sources, "local[2]"), tmp_path / "run-local")

    # The standalone run really ran on the cluster: its application's executor directory.
    apps = [p.name for p in work.iterdir() if p.name.startswith("app-")]
    assert apps, f"no application ran on the standalone worker ({work})"
    manifest = json.loads((on_cluster / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["spark"]["master"] == url
    assert manifest["counts"]["input"] == 2 * ROWS_PER_SOURCE

    compare = _compare_runs()
    problems = compare.compare_scores(on_cluster, tmp_path / "run-local")
    for name in ("selected.jsonl", "random_baseline.jsonl"):
        problems += compare.compare_lines(on_cluster, tmp_path / "run-local", name)
    assert not problems, problems
    selected = (on_cluster / "selected.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(selected) == 60
    print(f"standalone {seconds_cluster:.1f}s, local[2] {seconds_local:.1f}s")
