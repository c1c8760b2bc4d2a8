"""`winnow submit` against a real two-node Ray cluster started on this machine, and what the
submission carries (fast, no cluster).

The cluster: a head (`ray start --head`, 1 CPU) and a second node process joining it (2 CPUs and a
custom resource `winnow_worker`), each a `ray start` in its own process group and temporary
folder, with token authentication on and a token of their own, so nothing touches the test
session's local Ray (`ray_local` uses `ray.init`) or the machine's default `/tmp/ray`. Stage
resources cannot name custom resources, so the tokens stage asks for 1.5 CPUs: only the second
node can hold its actor, which puts the stage there deterministically. "Shared storage" is a tmp
folder both node processes see. The CLI and Ray's state API run in subprocesses with the
cluster's environment (its token), never in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from engine.cluster.submit import (
    BIG_FILE_BYTES,
    SubmitError,
    entrypoint_for,
    is_secret_name,
    plan_submission,
    scan_working_dir,
)
from engine.config import parse_job

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS = 40
BUDGET = 10
FAULT_ROWS = 300
TOKENS_ACTOR = "MapWorker(MapBatches(TokenCountActor))"
EMBED_ACTOR = "MapWorker(MapBatches(EmbeddingActor))"
JOB_TIMEOUT_S = 540


# -- what a submission carries (no cluster) ------------------------------------------------------


def _project(tmp: Path) -> Path:
    """A minimal project root: an engine package, a runs/ folder, a venv and a big file."""
    root = tmp / "proj"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "__init__.py").write_text("")
    (root / "engine" / "mod.py").write_text("x = 1\n" * 100)
    (root / "runs" / "old").mkdir(parents=True)
    (root / "runs" / "old" / "scores.parquet").write_bytes(b"0" * 5000)
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "big.so").write_bytes(b"0" * 5000)
    (root / ".venv-peers" / "datatrove").mkdir(parents=True)  # `make bench-peers`
    (root / ".venv-peers" / "datatrove" / "big.so").write_bytes(b"0" * 5000)
    (root / "engine" / "__pycache__").mkdir()
    (root / "engine" / "__pycache__" / "mod.pyc").write_bytes(b"0" * 5000)
    (root / "data").mkdir()
    with open(root / "data" / "huge.bin", "wb") as handle:
        handle.truncate(BIG_FILE_BYTES)  # sparse: a 10 MiB file without writing it
    (root / "jobs").mkdir()
    return root


def _spec(root: Path, **extra: Any) -> tuple[Path, Any]:
    data = {"inputs": [{"path": "/shared/corpus.jsonl"}], "out": "/shared/runs/n1", **extra}
    path = root / "jobs" / "night.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, parse_job(data)


def test_plan_ships_code_without_venv_runs_caches_or_big_files(tmp_path: Path) -> None:
    root = _project(tmp_path)
    job_file, job = _spec(root)
    plan = plan_submission(
        job_file, job, working_dir=root, environ={"HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "s"}
    )
    assert plan.job_path == "jobs/night.yaml"
    assert plan.entrypoint == "python -m engine run jobs/night.yaml"
    expected = sum(p.stat().st_size for p in [*root.glob("engine/*.py"), job_file] if p.is_file())
    assert plan.upload_bytes == expected
    assert plan.big_files == ["data/huge.bin"]
    excludes = plan.runtime_env["excludes"]
    assert {".venv", ".venv-peers", "runs", "__pycache__", ".git", "/data/huge.bin"} <= set(
        excludes
    )
    assert plan.runtime_env["working_dir"] == str(root.resolve())
    # Behaviour flags travel; a secret in the submitting shell never does.
    assert plan.runtime_env["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    assert "OPENAI_API_KEY" not in json.dumps(plan.runtime_env) + plan.entrypoint


def test_plan_refuses_what_would_fail_or_vanish_on_the_cluster(tmp_path: Path) -> None:
    root = _project(tmp_path)
    job_file, job = _spec(root)
    with pytest.raises(SubmitError, match="relative"):
        plan_submission(job_file, job, working_dir=root, out="runs/n1")
    with pytest.raises(SubmitError, match="looks like a secret"):
        plan_submission(job_file, job, working_dir=root, env={"HF_TOKEN": "hf_x"})
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(job_file.read_text())
    with pytest.raises(SubmitError, match="--job-on-cluster"):
        plan_submission(outside, job, working_dir=root)
    in_runs = root / "runs" / "job.yaml"
    in_runs.write_text(job_file.read_text())
    with pytest.raises(SubmitError, match="not uploaded"):
        plan_submission(in_runs, job, working_dir=root)
    _, local_ray = _spec(root, ray={"num_cpus": 4})
    with pytest.raises(SubmitError, match=r"ray\.num_cpus"):
        plan_submission(job_file, local_ray, working_dir=root)
    with pytest.raises(SubmitError, match="no engine/ package"):
        plan_submission(job_file, job, working_dir=tmp_path)
    # A job spec on shared storage is passed as is, code in place is not uploaded.
    plan = plan_submission(
        outside,
        job,
        working_dir=root,
        job_on_cluster=True,
        code_on_cluster=True,
        out="/o",
        environ={},
    )
    assert plan.entrypoint == f"python -m engine run {outside} --out /o"
    assert plan.runtime_env == {"working_dir": f"local://{root.resolve()}"}
    assert plan.upload_bytes == 0


def test_plan_names_the_secrets_the_cluster_must_hold(tmp_path: Path) -> None:
    root = _project(tmp_path)
    job_file, job = _spec(
        root,
        signals=["judge.alpagasus"],
        stages={
            "judge": {
                "backend": "openai",
                "model": "judge-model",
                "resources": {
                    "endpoint": {"base_url": "http://judge:8000/v1", "api_key_env": "JUDGE_KEY"}
                },
            }
        },
    )
    plan = plan_submission(job_file, job, working_dir=root)
    assert plan.cluster_env == ["JUDGE_KEY"]
    assert "JUDGE_KEY" not in plan.entrypoint
    _, local = _spec(root, signals=["judge.alpagasus"], stages={"judge": {"backend": "vllm"}})
    assert plan_submission(job_file, local, working_dir=root).cluster_env == []


def test_scan_prunes_excluded_folders_and_skips(tmp_path: Path) -> None:
    root = _project(tmp_path)
    size, big = scan_working_dir(root, skip=[root / "engine"])
    assert size == 0 and big == ["data/huge.bin"]


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "DB_PASSWORD", "RAY_AUTH_TOKEN"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)
    assert not is_secret_name("HF_HUB_OFFLINE")


def test_entrypoint_quotes_paths() -> None:
    assert entrypoint_for("/data/my job.yaml", "/out dir") == (
        "python -m engine run '/data/my job.yaml' --out '/out dir'"
    )


def test_submit_cli_refuses_before_contacting_the_cluster(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    job = REPO / "cluster" / "cluster-job.yaml"  # valid, inside the project, absolute `out`
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [{path: /x.jsonl}]\nselect: {preset: nope}\n")
    nowhere = "http://127.0.0.1:9"  # nothing listens: a refusal must come before any request
    runner = CliRunner()
    result = runner.invoke(app, ["submit", str(bad), "--address", nowhere, "--job-on-cluster"])
    assert result.exit_code == 2 and "invalid job spec" in result.output
    result = runner.invoke(app, ["submit", str(job), "--address", nowhere, "--out", "runs/x"])
    assert result.exit_code == 2 and "relative" in result.output
    result = runner.invoke(app, ["submit", str(job), "--address", nowhere, "--env", "A_KEY=1"])
    assert result.exit_code == 2 and "secret" in result.output
    result = runner.invoke(app, ["submit", str(job), "--address", nowhere])
    assert result.exit_code == 5 and "127.0.0.1:9" in result.output  # valid, then unreachable


def test_main_relocates_only_a_ray_jobs_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.__main__ import _in_ray_working_dir

    ray_copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    ray_copy.mkdir(parents=True)
    monkeypatch.chdir(ray_copy)
    monkeypatch.delenv("WINNOW_DRIVER_COPY", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not _in_ray_working_dir()  # not a Ray Jobs driver
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert _in_ray_working_dir()
    monkeypatch.setenv("WINNOW_DRIVER_COPY", str(tmp_path))
    assert not _in_ray_working_dir()  # already moved
    monkeypatch.delenv("WINNOW_DRIVER_COPY")
    monkeypatch.chdir(tmp_path)
    assert not _in_ray_working_dir()  # code used in place (--code-on-cluster)


# -- a real two-node Ray cluster ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayTestCluster:
    """A head and worker nodes, each `ray start` in its own process group."""

    temp_dir: Path  # short: Ray's unix sockets live under it (path length limit ~107)
    shared: Path  # "shared storage": both node processes see it
    env: dict[str, str]
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    groups: dict[str, int] = field(default_factory=dict)  # node name -> process group id

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = self.temp_dir / f"{name}.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", *args],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its daemons share this group: one kill takes them all
            )
            self.groups[name] = proc.pid
            code = proc.wait(timeout=240)
        assert code == 0, f"ray start ({name}) failed:\n{log.read_text()[-3000:]}"

    def start_head(self) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
                "--num-cpus=1",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],
        )
        # The address file that a bare `ray.init()` looks for lives in our folder, not in
        # /tmp/ray: no other Ray user on the machine (ray_local) can join this cluster by mistake.
        assert (self.temp_dir / "ray_current_cluster").is_file()

    def start_worker(self, name: str) -> None:
        self._start(
            name,
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--dashboard-agent-listen-port={_free_port()}",
                "--num-cpus=2",
                '--resources={"winnow_worker": 1}',
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],
        )

    def kill(self, name: str) -> None:
        """SIGKILL a node's whole process group (raylet, agents, its workers and actors)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.groups.pop(name), signal.SIGKILL)

    def teardown(self) -> None:
        for name in list(self.groups):
            self.kill(name)
        # Job drivers run in sessions of their own: find ours by the job specs they were given
        # (on our shared folder) or a working directory under our temp folder; kill each by pid.
        mine = []
        for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            cwd = proc.info["cwd"] or ""
            if str(self.shared) in cmd or cwd.startswith(str(self.temp_dir)):
                mine.append(proc)
        copies = []  # a killed driver leaves its private code copy (engine/__main__.py)
        for proc in mine:
            try:
                if "winnow-driver-" in (proc.info["cwd"] or ""):
                    copies.append(proc.info["cwd"])
                for child in proc.children(recursive=True):
                    child.kill()
                proc.kill()
            except psutil.Error:
                pass
        for folder in [*copies, self.temp_dir]:
            shutil.rmtree(folder, ignore_errors=True)

    def python(self, script: str, timeout: float = 120) -> Any:
        """Run `script` with the cluster's environment; it prints one JSON value."""
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def winnow(self, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        """`python -m engine ...`: the CLI as a user runs it, against this cluster."""
        return subprocess.run(
            [sys.executable, "-m", "engine", *args, "--address", self.dashboard],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def nodes(self) -> dict[str, dict]:
        return self.python(
            f"""
            import json
            from ray.util.state import list_nodes
            nodes = list_nodes(address="{self.dashboard}")
            print(json.dumps({{n.node_id: {{"head": n.is_head_node, "state": n.state,
                "resources": n.resources_total}} for n in nodes}}))
            """
        )

    def actors(self, submission_id: str, cls: str) -> list[dict]:
        """The job's actors of class `cls`: node and state of each."""
        return self.python(
            f"""
            import json
            from ray.job_submission import JobSubmissionClient
            from ray.util.state import list_actors
            job = JobSubmissionClient("{self.dashboard}").get_job_info("{submission_id}").job_id
            found = list_actors(address="{self.dashboard}", limit=10000, detail=True, filters=[
                ("class_name", "=", "{cls}"), ("job_id", "=", job)])
            print(json.dumps([{{"node": a.node_id, "state": a.state,
                "restarts": getattr(a, "num_restarts", None)}} for a in found]))
            """
        )

    def wait_job(self, submission_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        return self.python(
            f"""
            import json
            from ray.job_submission import JobSubmissionClient
            from engine.cluster.submit import wait_for
            client = JobSubmissionClient("{self.dashboard}")
            status = wait_for(client, "{submission_id}", timeout_s={timeout})
            info = client.get_job_info("{submission_id}")
            print(json.dumps({{"status": status, "message": info.message or ""}}))
            """,
            timeout=timeout + 60,
        )


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",  # as a real cluster should run; a token of its own
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cluster = RayTestCluster(
        temp_dir=Path(tempfile.mkdtemp(prefix="wr", dir="/tmp")),
        shared=tmp_path_factory.mktemp("ray-shared"),
        env=env,
    )
    try:
        started = time.perf_counter()
        cluster.start_head()
        cluster.start_worker("worker")
        print(f"\ncluster up in {time.perf_counter() - started:.1f}s")
        yield cluster
    finally:
        cluster.teardown()


@pytest.fixture(scope="module")
def cluster_job(ray_cluster: RayTestCluster, alpaca_rows: list[dict]) -> Path:
    """A job spec on the shared storage: 40 Alpaca rows, the tokens stage on the worker node."""
    data = ray_cluster.shared / "alpaca40.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows[:ROWS]))
    spec = {
        "inputs": [{"path": str(data)}],
        "out": str(ray_cluster.shared / "runs" / "first"),
        "seed": 0,
        "signals": ["tokens"],
        "ray": {"address": "auto"},
        "spark": {"master": "local[1]", "shuffle_partitions": 2},
        "select": {
            "preset": "longest",
            "budget": BUDGET,
            "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
        },
        # 1.5 CPUs: only the 2-CPU worker node can hold the actor (the head has 1).
        "stages": {"tokens": {"resources": {"num_cpus": 1.5, "concurrency": 1, "batch_size": 4}}},
    }
    path = ray_cluster.shared / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _submit(
    cluster: RayTestCluster, job: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess:
    cache = os.environ["WINNOW_CACHE"]
    return cluster.winnow(
        "submit",
        str(job),
        "--out",
        str(out),
        "--job-on-cluster",
        "--env",
        f"WINNOW_CACHE={cache}",
        "--env",
        f"HF_HOME={Path(cache) / 'hf'}",
        *extra,
    )


def _counts_line(counts: dict) -> str:
    rejected = sum(counts["rejected"].values())
    return (
        f"done: {counts['input']} input rows → {counts['selected']} selected, "
        f"{rejected} rejected, {counts['quarantined']} quarantined"
    )


def _check_run(out: Path, rows: int = ROWS, signal: str = "tokens") -> dict:
    """The run directory: counts reconcile, every unique row has the signal's output."""
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == rows
    assert counts["selected"] == BUDGET
    assert counts["input"] == (
        counts["quarantined"] + sum(counts["rejected"].values()) + counts["selected"]
    )
    unique = manifest["ingest"]["unique"]
    if signal == "tokens":
        scores = pq.read_table(out / "scores.parquet").to_pylist()
        ids = [r["id"] for r in scores if r.get("tokens_assistant") is not None]
    else:  # embeddings live in the signal's sidecar
        sidecar = pq.read_table(out / "signals" / signal).to_pylist()
        ids = [r["id"] for r in sidecar if r.get("embedding")]
    assert len(ids) == len(set(ids)) == unique, "rows lost, unscored or scored twice"
    assert manifest["signals"][signal]["rows"] == unique
    return manifest


def _worker_id(nodes: dict[str, dict]) -> str:
    [worker] = [n for n, v in nodes.items() if not v["head"] and v["state"] == "ALIVE"]
    return worker


@pytest.mark.slow
def test_submit_runs_on_two_nodes(ray_cluster: RayTestCluster, cluster_job: Path) -> None:
    nodes = ray_cluster.nodes()
    alive = [v for v in nodes.values() if v["state"] == "ALIVE"]
    assert len(alive) == 2 and sum(v["head"] for v in alive) == 1
    worker = _worker_id(nodes)
    assert nodes[worker]["resources"].get("winnow_worker") == 1

    out = ray_cluster.shared / "runs" / "first"
    started = time.perf_counter()
    done = _submit(ray_cluster, cluster_job, out)
    elapsed = time.perf_counter() - started
    print(f"submit -> SUCCEEDED: {elapsed:.1f}s")
    assert done.returncode == 0, done.stderr[-4000:]
    submission = done.stdout.strip().splitlines()[0]
    assert submission.startswith("raysubmit_")
    assert f"winnow jobs logs {submission}" in done.stderr.replace("\n", " ")

    status = ray_cluster.winnow("jobs", "status", submission, timeout=120)
    assert status.stdout.strip() == "SUCCEEDED", status.stderr
    logs = ray_cluster.winnow("jobs", "logs", submission, timeout=120).stdout
    stop = ray_cluster.winnow("jobs", "stop", submission, timeout=120)
    assert stop.returncode == 0 and "not running" in stop.stderr  # it has finished
    manifest = _check_run(out)
    # The driver's plain (non-terminal) progress: one line per stage, then the counts.
    assert "ingest: " in logs and "tokens: 40 rows" in logs
    assert _counts_line(manifest["counts"]) in logs
    assert _counts_line(manifest["counts"]) in done.stderr  # streamed while waiting
    # The model stage ran on the second node; the driver (Spark stages) on the head.
    placed = ray_cluster.actors(submission, TOKENS_ACTOR)
    assert placed and {a["node"] for a in placed} == {worker}


@pytest.fixture(scope="module")
def fault_job(ray_cluster: RayTestCluster, alpaca_rows: list[dict]) -> Path:
    """A stage slow enough to be caught mid-run: MiniLM embeddings of 300 rows, the actor on
    the worker node (1.5 CPUs), no score cache (every row must reach the actors)."""
    data = ray_cluster.shared / "alpaca300.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows[:FAULT_ROWS]))
    spec = yaml.safe_load(Path(ray_cluster.shared / "job.yaml").read_text())
    spec["inputs"] = [{"path": str(data)}]
    spec["signals"] = ["embed"]
    spec["stages"] = {
        "embed": {
            "resources": {"num_cpus": 1.5, "concurrency": 1, "batch_size": 8},
            "cache": {"enabled": False},
        }
    }
    path = ray_cluster.shared / "fault.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait_for_file(path: Path, done: Path, timeout: float) -> float:
    """Seconds until `path` exists; fails if `done` (the run's end) appears first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if path.exists():
            return time.monotonic() - start
        assert not done.exists(), f"{done} appeared before {path}"
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear in {timeout:.0f}s")


@pytest.mark.slow
def test_node_killed_mid_stage(
    ray_cluster: RayTestCluster, cluster_job: Path, fault_job: Path
) -> None:
    """Kill the node running the embed actor once its first batches are back and the stage is
    still running; a replacement node joins (as an autoscaler or KubeRay would bring one).
    Every row must be accounted for: by the same job (its actor restarted on the new node), or
    by a resubmission that resumes."""
    worker = _worker_id(ray_cluster.nodes())
    out = ray_cluster.shared / "runs" / "fault"
    started = time.perf_counter()
    sent = _submit(ray_cluster, fault_job, out, "--no-wait")
    assert sent.returncode == 0, sent.stderr[-4000:]
    submission = sent.stdout.strip().splitlines()[0]

    # The driver appends each finished batch to this file: its existence means the stage is
    # under way, the stage marker's absence that it has not finished.
    first = out / "_work" / "embed_scored" / "part-00000.parquet"
    marker = out / "_stages" / "embed.json"
    _wait_for_file(first, out / "manifest.json", timeout=JOB_TIMEOUT_S)
    assert not marker.exists()
    ray_cluster.kill("worker")
    killed_at = time.perf_counter()
    assert not marker.exists(), "the stage finished before the kill"
    ray_cluster.start_worker("replacement")
    # The killed node may still read ALIVE until Ray's health checks notice.
    [replacement] = [
        n
        for n, v in ray_cluster.nodes().items()
        if not v["head"] and n != worker and v["state"] == "ALIVE"
    ]
    end = ray_cluster.wait_job(submission)
    print(
        f"\nworker killed {killed_at - started:.1f}s after submit; job {end['status']} "
        f"{time.perf_counter() - killed_at:.1f}s after the kill; {end['message'][-300:]!r}"
    )

    actors = ray_cluster.actors(submission, EMBED_ACTOR)
    if end["status"] == "SUCCEEDED":
        manifest = _check_run(out, FAULT_ROWS, "embed")
        assert manifest["skipped_stages"] == []
        # Ray Data restarted the killed actor (same actor id) on the replacement node.
        assert actors and {a["node"] for a in actors} == {replacement}, actors
        assert all(a["restarts"] is None or a["restarts"] >= 1 for a in actors), actors
        print(f"same job finished; embed actor restarted on the new node: {actors}")
    else:
        assert end["status"] == "FAILED"
        assert end["message"].strip(), "a failed job must say why"
        again = _submit(ray_cluster, fault_job, out)
        assert again.returncode == 0, again.stderr[-4000:]
        manifest = _check_run(out, FAULT_ROWS, "embed")
        assert "ingest" in manifest["skipped_stages"]  # resumed: finished stages are kept
        print("job failed; the resubmission resumed and finished")
    print(f"fault case: submit -> finished {time.perf_counter() - started:.1f}s")
