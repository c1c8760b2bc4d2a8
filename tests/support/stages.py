"""Run one registered stage directly, as the executor would, for tests of a single stage."""

from __future__ import annotations

from engine.stages.registry import run_alone as run_stage

__all__ = ["run_stage"]
