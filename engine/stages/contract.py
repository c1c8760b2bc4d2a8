"""The stage contract: what every stage declares once, and what the executor derives from it.

A stage is a `Stage` value registered in `engine.stages.registry.STAGES`. It says:
  - its name, version and engine (spark, ray or driver: the executor, not the stage, starts
    Spark or Ray and places actor pools);
  - what it reads and writes in the run directory (the stage graph, the skip check and the
    "a changed stage re-runs everything after it" rule all come from these paths);
  - its output schema (signal stages: the sidecar columns, `id` first);
  - a `settings` model — every field that changes its numbers — and a separate `resources`
    model — CPUs, GPUs, pool size, batch size, endpoint, timeouts, retries — that never does.
Stage markers and score caches both derive their fingerprints from `settings` (plus the model's
identity, computed once in engine.models), so "what changes the numbers" has one source of truth.

In a job spec a stage's block holds its settings at the top and its resources under
`resources:` (plus `cache:` for stages with a score cache). Resource keys written at the top, as
job files did before the contract, are moved under `resources:` with a warning naming the new
path: one release of grace, never a silent change.
"""

from __future__ import annotations

import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.runtime.rundir import fingerprint
from engine.signals.turns import turn_rule_settings

if TYPE_CHECKING:
    from engine.config import JobSpec
    from engine.runtime.rundir import RunDir

Engine = Literal["spark", "ray", "driver"]


class ConfigDeprecationWarning(UserWarning):
    """A job spec key that still works but has moved; the CLI prints these before any work."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Settings(Strict):
    """What changes a stage's numbers: every field is part of its fingerprint."""


class Resources(Strict):
    """How fast a stage runs, never what it computes: a change never re-runs the stage."""


class ActorResources(Resources):
    """A Ray actor pool: one model per actor; the executor decides placement."""

    num_cpus: Annotated[float, Field(gt=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    concurrency: Annotated[int, Field(ge=1)] = Field(default=1, description="actors in the pool")
    batch_size: Annotated[int, Field(ge=1)] = Field(
        default=256, description="rows per actor call (Ray Data batch)"
    )
    num_threads: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="torch threads per actor; null = num_cpus rounded up (more threads than "
        "the cores an actor really has is far slower: see the runtime notes)",
    )

    def threads(self) -> int:
        """Torch threads per actor: `num_threads`, else the CPUs it holds, rounded up."""
        return self.num_threads or max(1, math.ceil(self.num_cpus))


class CacheSpec(Strict):
    """The score cache shared across runs, keyed by (id, the stage's settings fingerprint)."""

    enabled: bool = True
    dir: str | None = Field(default=None, description="default: $WINNOW_CACHE/scores")


class StageSpec(Settings):
    """A stage's block in the job spec: its settings, then `resources:` (and `cache:`).

    Subclasses set `stage_name` and add `resources: <their Resources model>`; the settings are
    the fields of the Settings class they also derive from (`settings_fields`)."""

    stage_name: ClassVar[str] = ""

    @classmethod
    def settings_fields(cls) -> set[str]:
        return set(cls.model_fields) - {"resources", "cache"}

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        """Resource and cache keys written at the top of the block (before the contract)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        resources_field = cls.model_fields.get("resources")
        if resources_field is not None and isinstance(resources_field.annotation, type):
            moved = [k for k in resources_field.annotation.model_fields if k in data]
            moved = [k for k in moved if k not in cls.settings_fields()]
            if moved:
                block = dict(data.get("resources") or {})
                for key in moved:
                    block.setdefault(key, data.pop(key))
                data["resources"] = block
                warn_moved(cls.stage_name, moved, "resources")
        if "cache" in cls.model_fields:
            legacy = {}
            if isinstance(data.get("cache"), bool):
                legacy["enabled"] = data.pop("cache")
            if "cache_dir" in data:
                legacy["dir"] = data.pop("cache_dir")
            if legacy:
                data["cache"] = {**(data.get("cache") or {}), **legacy}
                names = ["cache" if k == "enabled" else "cache_dir" for k in legacy]
                warn_moved(cls.stage_name, names, "cache", {"cache": "enabled", "cache_dir": "dir"})
        return data

    def settings(self) -> dict[str, Any]:
        """The part of this block that changes the stage's numbers (JSON-ready)."""
        return self.model_dump(mode="json", include=self.settings_fields())


class TurnScoringSpec(StageSpec):
    """A block whose settings have `max_turns` (LM, judges, reward model): what it counts joins
    the settings when a limit is set (engine.signals.turns.turn_rule_settings)."""

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **turn_rule_settings(getattr(self, "max_turns", None))}


def warn_moved(
    stage: str, keys: list[str], block: str, renames: dict[str, str] | None = None
) -> None:
    where = f"stages.{stage}" if stage else "a stage block"
    moves = ", ".join(f"{where}.{k} -> {where}.{block}.{(renames or {}).get(k, k)}" for k in keys)
    warnings.warn(
        f"{moves}: these keys moved (they do not change results); the old place is read "
        "for this release only",
        ConfigDeprecationWarning,
        stacklevel=2,
    )


@dataclass
class StageContext:
    """What the executor hands a stage: the job, the run directory, engines, progress, phases."""

    job: JobSpec
    run: RunDir
    stage: Stage
    log: Callable[[str], None]
    progress: Callable[[str, int | None], Callable[[int], None]]
    spark_factory: Callable[[], Any] | None = None
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def spark(self) -> Any:
        if self.spark_factory is None:
            raise RuntimeError(f"{self.stage.name}: a {self.stage.engine} stage has no Spark")
        return self.spark_factory()

    @property
    def spec(self) -> Any:
        """The stage's block of the job spec (`stages.<name>`), when it has one."""
        return getattr(self.job.stages, self.stage.name)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one step of the stage; the figures land in the manifest's stage record."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - started, 3)


@dataclass(frozen=True)
class Stage:
    """One stage, declared once (see the module docstring)."""

    name: str
    version: int  # bump when the output's format or meaning changes: old markers stop matching
    engine: Engine
    reads: tuple[str, ...]  # run-directory paths; "signals/*" matches every enabled sidecar
    writes: tuple[str, ...]  # run-directory paths that must exist for the stage to be done
    run: Callable[[StageContext], dict[str, Any]]
    spec: type[StageSpec] | None = None  # its block under `stages:` in the job spec
    settings_of: Callable[[JobSpec], Any] | None = None  # settings kept elsewhere in the job
    schema: pa.Schema | Callable[[list[str]], pa.Schema] | None = None
    signal: str | None = None  # the `signals:` name that enables it (None: always runs)
    model_of: Callable[[Any], str] | None = None  # the model named in its block
    cache_keys: Callable[[JobSpec], dict[str, str]] | None = None  # default: one cache
    check: Callable[[JobSpec], str | None] | None = None  # a config error ("path: why"), if any
    when: Callable[[JobSpec], bool] | None = None  # runs only if true (e.g. an `eval:` block)
    description: str = ""

    def enabled(self, job: JobSpec) -> bool:
        if self.when is not None and not self.when(job):
            return False
        if self.signal is None:
            return True
        return any(s == self.signal or s.startswith(f"{self.signal}.") for s in job.signals)

    def settings(self, job: JobSpec) -> Any:
        """Everything in the job that changes this stage's numbers."""
        if self.settings_of is not None:
            value = self.settings_of(job)
            return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        if self.spec is not None:
            return getattr(job.stages, self.name).settings()
        return None

    def resources(self, job: JobSpec) -> Resources | None:
        if self.spec is None or "resources" not in self.spec.model_fields:
            return None
        return getattr(job.stages, self.name).resources

    def model_identity(self, job: JobSpec) -> str | None:
        if self.model_of is None:
            return None
        from engine.models import model_identity

        return model_identity(self.model_of(getattr(job.stages, self.name)))

    def fingerprint(self, job: JobSpec) -> str:
        """The stage's own fingerprint: name, version, model identity and settings. Score caches
        key on it; the stage marker chains it with the upstream stages' fingerprints."""
        return fingerprint(self.name, self.version, self.model_identity(job), self.settings(job))

    def caches(self, job: JobSpec) -> dict[str, str]:
        """Score-cache keys by cache name (judges keep one cache each)."""
        if self.cache_keys is not None:
            return self.cache_keys(job)
        return {self.name: self.fingerprint(job)}

    def output_schema(self, signals: list[str]) -> pa.Schema | None:
        if callable(self.schema):
            return self.schema(signals)
        return self.schema

    def reads_from(self, other: Stage) -> bool:
        """True when this stage reads something `other` writes (the stage graph's edges)."""
        return any(fnmatch.fnmatchcase(w, r) for r in self.reads for w in other.writes)


def model_signal_stage(
    name: str,
    *,
    version: int,
    run: Callable[[StageContext], dict[str, Any]],
    spec: type[StageSpec],
    schema: pa.Schema | Callable[[list[str]], pa.Schema],
    description: str,
    **hooks: Any,
) -> Stage:
    """The usual model-backed signal: a Ray actor pool over `records/`, writing
    `signals/<name>/`, switched on by the signal `name`, keyed on the model its block names."""
    return Stage(
        name=name,
        version=version,
        engine="ray",
        reads=("records",),
        writes=(f"signals/{name}",),
        run=run,
        spec=spec,
        schema=schema,
        signal=name,
        model_of=hooks.pop("model_of", lambda block: block.model),
        description=description,
        **hooks,
    )
