"""The run manifest (`manifest.json`): one typed record of what a run did, read by the report.

The pipeline builds a `Manifest` and writes it; the report and anyone scripting against a run read
it back with `Manifest.read`. The JSON keys are the ones users already rely on. The fixed parts
forbid unknown keys so that a typo in the pipeline fails loudly instead of silently dropping a
fact; per-stage details (`signals`, `selection`, `export`, `config`) stay free-form dicts because
each stage owns its own shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

__all__ = [
    "Counts",
    "IngestSummary",
    "Manifest",
    "Outputs",
    "Sampling",
    "SourceSummary",
    "StageRecord",
]


class _Fixed(BaseModel):
    """Base of the fixed-shape parts: unknown keys are an error, not silently kept.

    NaN/Infinity are written as JSON constants (as `json.dumps` did before) rather than `null`,
    so that a float field reads back as the float it was.
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Counts(_Fixed):
    """Where every input row went: quarantined at ingest, rejected by selection, or selected."""

    input: NonNegativeInt
    quarantined: NonNegativeInt
    rejected: dict[str, NonNegativeInt] = Field(default_factory=dict)  # by reason
    selected: NonNegativeInt
    quarantine_reasons: dict[str, NonNegativeInt] = Field(default_factory=dict)

    @property
    def total_rejected(self) -> int:
        """Rows rejected for any reason."""
        return sum(self.rejected.values())

    def reconciles(self) -> bool:
        """True when no row is lost or counted twice: input = quarantined + rejected + selected."""
        return self.input == self.quarantined + self.total_rejected + self.selected


class IngestSummary(_Fixed):
    """Rows that passed ingest, and how many of them were exact copies of another."""

    ingested: NonNegativeInt
    unique: NonNegativeInt
    exact_duplicates: NonNegativeInt


class SourceSummary(_Fixed):
    """What framing saw in one input source (`rows` are the rows kept after any sampling)."""

    source: str
    container: str
    schema_: str | None = Field(alias="schema")  # `schema` would shadow a BaseModel attribute
    rows: NonNegativeInt = 0
    framed_rows: NonNegativeInt = 0
    bytes_read: NonNegativeInt = 0
    blank_lines: NonNegativeInt = 0
    warnings: list[str] = Field(default_factory=list)

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class Sampling(_Fixed):
    """Per-source sampling settings and their effect; present only when a run was sampled."""

    fraction: float
    max_rows: NonNegativeInt | None = None
    framed_rows: NonNegativeInt
    kept_rows: NonNegativeInt


class StageRecord(_Fixed):
    """One stage of the run: where it ran, which code/config it ran with and how long it took."""

    name: str
    engine: Literal["spark", "ray", "driver"]
    version: int
    fingerprint: str
    seconds: float
    skipped: bool = False  # complete from an earlier run; `seconds` is that run's time
    phases: dict[str, float] = Field(default_factory=dict)  # timed sub-phases, if measured


class Outputs(_Fixed):
    """Paths of the run's public outputs."""

    selected: str
    random_baseline: str
    scores: str
    quarantine: str
    report: str


class Pin(_Fixed):
    """What one model or dataset a run used resolved to, so a rerun can ask for exactly it.

    `resolved` is a commit sha for a hub snapshot, `sha256:<hex>` of the files of a plain local
    folder or file, `<package>==<version>` for a built-in; None when it could not be resolved
    without a download (a hub name not in the local cache: transformers fetched it itself).
    """

    kind: Literal["model", "dataset"]
    stage: str | None = None  # the stage that loads the model; None for an input dataset
    name: str
    requested_revision: str | None = None
    resolved: str | None = None
    source: Literal["builtin", "hub", "local", "remote"]  # remote: an endpoint serves it


class Manifest(_Fixed):
    """Everything a person or a script needs to know about one run, without reading its logs."""

    run_id: str
    started_at: str
    finished_at: str | None = None
    command: str | None = None
    out: str
    config: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    skipped_stages: list[str] = Field(default_factory=list)
    counts: Counts
    ingest: IngestSummary
    sources: list[SourceSummary] = Field(default_factory=list)
    quarantine_by_source: dict[str, NonNegativeInt] = Field(default_factory=dict)
    sampling: Sampling | None = None
    signals: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per signal stage
    selection: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    # The `eval:` block's stages (train, generate, judge_pairwise): what each one reported.
    evaluation: dict[str, dict[str, Any]] | None = None
    outputs: Outputs
    stages: list[StageRecord] = Field(default_factory=list)  # absent in older manifests
    # Models and `hf:` datasets as resolved (engine.models.job_pins); absent in older manifests.
    pins: list[Pin] = Field(default_factory=list)
    logs: str | None = None  # the run's logs folder

    def to_json(self) -> str:
        """The manifest as indented JSON text; odd values in free-form parts become strings."""
        return (
            self.model_dump_json(indent=2, ensure_ascii=False, by_alias=True, fallback=str) + "\n"
        )

    def write(self, path: str | Path) -> None:
        """Write atomically (temp file in the same folder, then rename): never half a manifest."""
        from engine.runtime.rundir import atomic_write

        text = self.to_json()
        with atomic_write(path) as handle:
            handle.write(text)

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Load and validate a `manifest.json`."""
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
