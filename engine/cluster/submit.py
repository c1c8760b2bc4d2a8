"""Submit a job spec to a Ray cluster through the Ray Jobs API, and follow, inspect or stop it.

What a submission carries (`plan_submission`, checked locally before anything is sent):
  - the working directory: the project root (the folder holding `engine/`), uploaded by Ray as a
    zip, minus `.venv/`, `runs/`, `.git/`, caches, `__pycache__`, the job's own output folder and
    any file of 10 MiB or more (Ray's working-directory upload must stay small; we refuse more
    than 100 MiB). The driver's current directory on the cluster is that copy, so `python -m
    engine` imports the submitted code and no console script is needed there;
    With `code_on_cluster` the project root is instead a folder every node sees (shared
    storage) and Ray uses it in place: nothing is uploaded;
  - the job spec: shipped inside the working directory (a path relative to it), or, with
    `job_on_cluster`, a path the cluster's nodes already see (shared storage) passed as is;
  - the entry point `python -m engine run <job> [--out OUT]`, with no secret in it: the only
    environment passed are behaviour flags (HF_HUB_OFFLINE and the like) and what `--env` names,
    and a name that looks like a secret is refused there. API keys a job needs (`api_key_env`
    in its stage blocks) must be defined in the cluster's own environment: the submission only
    names them, because runtime-env variables are visible to anyone who can read the dashboard.

The run directory (`out`) must be an absolute path on storage every node sees: a relative one
would land inside the job's temporary working-directory copy and vanish with it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from engine.config import JobSpec

__all__ = [
    "BIG_FILE_BYTES",
    "DEFAULT_EXCLUDES",
    "MAX_UPLOAD_BYTES",
    "PASSED_ENV",
    "Submission",
    "SubmitError",
    "client",
    "entrypoint_for",
    "follow_logs",
    "is_secret_name",
    "plan_submission",
    "project_root",
    "scan_working_dir",
    "secret_env_names",
    "submit",
    "wait_for",
]

# gitignore-style patterns, relative to the working directory (Ray's `excludes` syntax).
EXCLUDED_DIRS = (
    ".venv",
    ".venv-peers",  # the benchmark's peer tools (make bench-peers), gigabytes
    "venv",
    "runs",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    ".cache",
    "node_modules",
    "spark-warehouse",
    "metastore_db",
)
EXCLUDED_FILES = ("*.pyc", "*.egg-info", "derby.log")
# Bare names, not `name/`: Ray tests each folder against the patterns before walking into it,
# and a `name/` pattern only matches what is inside, so Ray would still walk all of `.venv`.
DEFAULT_EXCLUDES = EXCLUDED_DIRS + EXCLUDED_FILES
BIG_FILE_BYTES = 10 * 1024 * 1024  # Ray warns about single files this large in a working dir
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
# Flags that mean the same on every machine; paths (WINNOW_CACHE, HF_HOME) differ between the
# submitting machine and the cluster, so they travel only when `--env` names them.
PASSED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)
_SECRET = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A submission that would fail or lose its results on the cluster; says what to change."""


@dataclass(frozen=True)
class Submission:
    """Everything `submit` sends, decided locally."""

    entrypoint: str
    runtime_env: dict[str, Any]
    working_dir: Path
    job_path: str  # the job spec as the driver on the cluster sees it
    upload_bytes: int  # what the working directory weighs after the excludes
    big_files: list[str] = field(default_factory=list)  # left out for their size
    cluster_env: list[str] = field(default_factory=list)  # secrets the cluster must define
    notes: list[str] = field(default_factory=list)  # warnings worth printing


def project_root() -> Path | None:
    """The folder holding the `engine` package, when it is a project checkout (has a
    pyproject.toml); None for an installed package, where the caller names the folder."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def is_secret_name(name: str) -> bool:
    return bool(_SECRET.search(name))


def _excluded(rel: Path, is_dir: bool) -> bool:
    if is_dir:
        return rel.name in EXCLUDED_DIRS or rel.name.endswith(".egg-info")
    return rel.suffix == ".pyc" or rel.name == "derby.log"


def scan_working_dir(
    root: Path, skip: Iterable[Path] = (), big_file_bytes: int = BIG_FILE_BYTES
) -> tuple[int, list[str]]:
    """Bytes the upload will hold after the default excludes and `skip` (absolute folders),
    and the files of `big_file_bytes` or more (relative POSIX paths, left out of the total)."""
    root = root.resolve()
    skipped = {Path(p).resolve() for p in skip}
    total, big = 0, []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if not _excluded(here / d, True)
            and (here / d).resolve() not in skipped
            and not (here / d).is_symlink()
        )
        for name in sorted(files):
            path = here / name
            if _excluded(path, False) or path.is_symlink():
                continue
            size = path.stat().st_size
            if size >= big_file_bytes:
                big.append(path.relative_to(root).as_posix())
            else:
                total += size
    return total, big


def secret_env_names(job: JobSpec) -> list[str]:
    """Environment variables the job's enabled stages read secrets from (`api_key_env`)."""
    from engine.stages.registry import enabled_stages

    names: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key.endswith("api_key_env") and isinstance(item, str) and item:
                    names.add(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    stages = job.model_dump(mode="json").get("stages") or {}
    for stage in enabled_stages(job):
        block = stages.get(stage.name)
        # A stage with a local backend has a default endpoint block it never uses.
        if isinstance(block, dict) and block.get("backend", "openai") != "openai":
            continue
        walk(block)
    return sorted(names)


def entrypoint_for(job_path: str, out: str | None, python: str = "python") -> str:
    """The shell command the cluster runs: the package's own entry point, quoted."""
    words = [python, "-m", "engine", "run", job_path]
    if out is not None:
        words += ["--out", out]
    return shlex.join(words)


def _within(path: Path, root: Path) -> Path | None:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return None


def plan_submission(
    job_file: Path,
    job: JobSpec,
    *,
    working_dir: Path,
    out: str | None = None,
    job_on_cluster: bool = False,
    code_on_cluster: bool = False,
    env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    python: str = "python",
) -> Submission:
    """Check a parsed job spec for a cluster and decide what to send (see the module docstring).
    `code_on_cluster`: every node sees `working_dir` at this path (shared storage): Ray uses it
    in place (a `local://` working directory) and nothing is uploaded. `env`: extra variables
    for the job (`--env`); `environ`: where PASSED_ENV is read from."""
    environ = os.environ if environ is None else environ
    notes: list[str] = []
    if not working_dir.is_dir():
        raise SubmitError(f"working directory {working_dir} is not a folder")
    if not (working_dir / "engine" / "__init__.py").is_file():
        raise SubmitError(
            f"working directory {working_dir} has no engine/ package: `python -m engine` would "
            "not find Winnow on the cluster; pass the project root"
        )
    if job.ray.num_cpus is not None:
        raise SubmitError(
            "ray.num_cpus sizes a Ray that Winnow starts itself; a submitted job joins the "
            "cluster it runs on (Ray sets RAY_ADDRESS for it): remove ray.num_cpus"
        )
    if job.ray.address not in (None, "auto"):
        notes.append(
            f"ray.address is {job.ray.address!r}: the job will connect there, not to the "
            "cluster it was submitted to (use `auto` or leave it out)"
        )
    target = out if out is not None else job.out
    if target is None:
        raise SubmitError("no output directory: pass --out DIR or set `out:` in the job spec")
    if "://" not in target and not Path(target).is_absolute():
        raise SubmitError(
            f"out: {target!r} is relative: on the cluster it would land inside the job's "
            "temporary copy of the working directory and be lost; give an absolute path on "
            "storage every node sees"
        )
    for spec in job.inputs:
        path = spec.path
        if ":" in path.split("/", 1)[0] or Path(path).is_absolute():
            continue  # builtin:, hf:, s3://, or an absolute path the cluster must see
        notes.append(
            f"input {path!r} is relative: on the cluster it is read from the uploaded working "
            "directory, which leaves out runs/, caches and files of 10 MiB or more"
        )

    skip = []
    if "://" not in target and _within(Path(target), working_dir) is not None:
        skip.append(Path(target))  # never upload a previous run's outputs
    rel_job = _within(job_file, working_dir)
    if job_on_cluster:
        if not job_file.is_absolute():
            raise SubmitError(
                f"{job_file}: with --job-on-cluster give the absolute path the cluster's nodes "
                "see the job spec at"
            )
        job_path = job_file.as_posix()
    elif rel_job is None:
        raise SubmitError(
            f"{job_file} is outside the working directory {working_dir}: move it inside (it "
            "is uploaded with the code) or, if the cluster sees it on shared storage at this "
            "path, pass --job-on-cluster"
        )
    else:
        excluded_parent = any(_excluded(Path(part), True) for part in rel_job.parts[:-1]) or any(
            _within(job_file, s) is not None for s in skip
        )
        if excluded_parent:
            raise SubmitError(
                f"{job_file} lies in a folder that is not uploaded ({rel_job.parent}): move it, "
                "or pass --job-on-cluster if the cluster sees it at this path"
            )
        job_path = rel_job.as_posix()

    size, big = (0, []) if code_on_cluster else scan_working_dir(working_dir, skip)
    if not job_on_cluster and job_path in big:
        raise SubmitError(f"{job_file} is too large to upload ({BIG_FILE_BYTES // 2**20} MiB+)")
    if size > MAX_UPLOAD_BYTES:
        raise SubmitError(
            f"working directory {working_dir} holds {size / 2**20:.0f} MiB after the excludes "
            f"(limit {MAX_UPLOAD_BYTES // 2**20} MiB): move data to shared storage"
        )

    env_vars = {name: environ[name] for name in PASSED_ENV if name in environ}
    for name, value in (env or {}).items():
        if is_secret_name(name):
            raise SubmitError(
                f"--env {name}: looks like a secret; runtime-env variables are visible in the "
                "Ray dashboard and job info. Define it in the cluster's own environment instead"
            )
        env_vars[name] = value

    runtime_env: dict[str, Any]
    if code_on_cluster:
        runtime_env = {"working_dir": f"local://{working_dir.resolve().as_posix()}"}
    else:
        excludes = list(DEFAULT_EXCLUDES) + [f"/{p}" for p in big]
        excludes += [f"/{_within(s, working_dir).as_posix()}" for s in skip]  # type: ignore[union-attr]
        runtime_env = {"working_dir": str(working_dir.resolve()), "excludes": excludes}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return Submission(
        entrypoint=entrypoint_for(job_path, out, python),
        runtime_env=runtime_env,
        working_dir=working_dir.resolve(),
        job_path=job_path,
        upload_bytes=size,
        big_files=big,
        cluster_env=secret_env_names(job),
        notes=notes,
    )


def client(address: str) -> JobSubmissionClient:
    """A Jobs API client for the dashboard at `address` (http://HEAD:8265). Ray's token
    authentication (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) is picked
    up from the environment by Ray itself."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(jobs: JobSubmissionClient, plan: Submission, submission_id: str | None = None) -> str:
    """Send the submission; returns its submission id."""
    return jobs.submit_job(
        entrypoint=plan.entrypoint,
        runtime_env=plan.runtime_env,
        submission_id=submission_id,
        metadata={"tool": "winnow", "job": plan.job_path},
    )


def wait_for(
    jobs: JobSubmissionClient,
    submission_id: str,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status. Raises
    TimeoutError after `timeout_s`."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(jobs.get_job_status(submission_id))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def follow_logs(jobs: JobSubmissionClient, submission_id: str, write: Callable[[str], Any]) -> None:
    """Write the job's logs as they come until the job ends (Ray's log tail over a websocket)."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission_id):
            write(chunk)

    asyncio.run(tail())
