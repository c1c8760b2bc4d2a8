"""Run one registered stage directly, as the executor would, for tests of a single stage."""

from __future__ import annotations

from typing import Any

from engine.config import JobSpec
from engine.runtime.rundir import RunDir
from engine.stages.contract import StageContext
from engine.stages.registry import stage as registered


def run_stage(name: str, job: JobSpec, run: RunDir, spark: Any = None) -> dict[str, Any]:
    """The stage's info dict; Ray stages need a Ray already started (the `ray_local` fixture)."""
    stage = registered(name)
    ctx = StageContext(
        job=job,
        run=run,
        stage=stage,
        log=lambda message: None,
        progress=lambda description, total: lambda n: None,
        spark_factory=(lambda: spark) if spark is not None else None,
    )
    return stage.run(ctx)
