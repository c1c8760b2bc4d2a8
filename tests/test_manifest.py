"""Tests for the typed run manifest (`engine.manifest`): shape, reconciliation, atomic write/read."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine.manifest import Counts, Manifest, SourceSummary, StageRecord

# The keys of manifest.json that users and scripts rely on (as JobRunner.execute wrote them).
LEGACY_KEYS = {
    "run_id",
    "started_at",
    "finished_at",
    "command",
    "out",
    "config",
    "versions",
    "timings_s",
    "skipped_stages",
    "counts",
    "ingest",
    "sources",
    "quarantine_by_source",
    "sampling",
    "signals",
    "selection",
    "export",
    "outputs",
}


def _legacy_dict() -> dict[str, Any]:
    """A manifest as the pipeline wrote it before `stages` and `logs` existed."""
    return {
        "run_id": "3f9a0c1d2e4b5a6c",
        "started_at": "2024-05-01T10:00:00+00:00",
        "finished_at": "2024-05-01T10:05:00+00:00",
        "command": "winnow run jobs/demo.yaml",
        "out": "/runs/demo",
        "config": {"select": {"budget": 200, "preset": "ifd"}, "seed": 0},
        "versions": {"python": "3.11.9", "pyspark": "4.3.0", "java": 'openjdk version "17"'},
        "timings_s": {"ingest": 12.5, "tokens": 3.25, "select": 0.5, "export": 0.1},
        "skipped_stages": ["ingest"],
        "counts": {
            "input": 1000,
            "quarantined": 10,
            "rejected": {"exact_duplicate": 40, "below_budget": 750},
            "selected": 200,
            "quarantine_reasons": {"invalid_json": 6, "too_large": 4},
        },
        "ingest": {"ingested": 990, "unique": 950, "exact_duplicates": 40},
        "sources": [
            {
                "source": "data/alpaca.json",
                "container": "json",
                "schema": "alpaca",
                "rows": 1000,
                "framed_rows": 4000,
                "bytes_read": 123456,
                "blank_lines": 1,
                "warnings": ["truncated at byte 123456 — ünïcode kept"],
            }
        ],
        "quarantine_by_source": {"data/alpaca.json": 10},
        "sampling": {"fraction": 0.25, "max_rows": None, "framed_rows": 4000, "kept_rows": 1000},
        "signals": {"tokens": {"rows": 950, "cache_hits": 0}},
        "selection": {"preset": "ifd", "score": "ifd", "eligible": 950, "rejected": {}},
        "export": {"selected_rows": 200, "random_baseline_rows": 200},
        "outputs": {
            "selected": "/runs/demo/selected.jsonl",
            "random_baseline": "/runs/demo/random_baseline.jsonl",
            "scores": "/runs/demo/scores.parquet",
            "quarantine": "/runs/demo/quarantine.jsonl",
            "report": "/runs/demo/report.html",
        },
    }


def _manifest() -> Manifest:
    data = _legacy_dict()
    data["stages"] = [
        {
            "name": "ingest",
            "engine": "spark",
            "version": 2,
            "fingerprint": "a1b2c3",
            "seconds": 12.5,
            "skipped": True,
            "phases": {"frame": 2.0, "parse": 10.5},
        },
        {"name": "select", "engine": "driver", "version": 2, "fingerprint": "d4", "seconds": 0.5},
    ]
    data["logs"] = "/runs/demo/logs"
    return Manifest.model_validate(data)


def test_round_trip(tmp_path: Path) -> None:
    manifest = _manifest()
    path = tmp_path / "run" / "manifest.json"
    manifest.write(path)
    assert Manifest.read(path) == manifest
    assert os.listdir(path.parent) == ["manifest.json"]  # no temp file left behind

    text = path.read_text(encoding="utf-8")
    assert "ünïcode" in text  # not \u-escaped
    assert text.startswith('{\n  "run_id"') and text.endswith("}\n")  # indent 2
    data = json.loads(text)
    assert set(data) == LEGACY_KEYS | {"stages", "logs", "evaluation", "pins"}
    assert data["evaluation"] is None  # no `eval:` block
    assert data["sources"][0]["schema"] == "alpaca"
    assert data["stages"][1] == {
        "name": "select",
        "engine": "driver",
        "version": 2,
        "fingerprint": "d4",
        "seconds": 0.5,
        "skipped": False,
        "phases": {},
    }
    # the keys users rely on keep their values
    legacy = _legacy_dict()
    assert {k: data[k] for k in LEGACY_KEYS} == legacy


def test_legacy_manifest_reads_with_defaults() -> None:
    manifest = Manifest.model_validate(_legacy_dict())
    assert manifest.stages == [] and manifest.logs is None
    assert manifest.sources[0].schema_ == "alpaca"
    assert manifest.sampling is not None and manifest.sampling.kept_rows == 1000


def test_write_replaces_and_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manifest.json"
    first = _manifest()
    first.write(path)
    second = first.model_copy(update={"run_id": "second"})
    second.write(path)
    assert Manifest.read(path).run_id == "second"

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        first.model_copy(update={"run_id": "third"}).write(path)
    assert Manifest.read(path).run_id == "second"  # the old file is intact
    assert os.listdir(tmp_path) == ["manifest.json"]  # and the temp file is gone


def test_non_finite_and_odd_values_survive(tmp_path: Path) -> None:
    manifest = _manifest().model_copy(
        update={
            "timings_s": {"ingest": math.inf, "lm": math.nan},
            "selection": {"odd": object(), "set": {1}},
        }
    )
    path = tmp_path / "manifest.json"
    manifest.write(path)
    back = Manifest.read(path)
    assert back.timings_s["ingest"] == math.inf and math.isnan(back.timings_s["lm"])
    assert isinstance(back.selection["odd"], str)  # written with str(), never a crash


def test_counts_reconcile() -> None:
    counts = Counts(input=10, quarantined=2, rejected={"a": 3, "b": 1}, selected=4)
    assert counts.total_rejected == 4
    assert counts.reconciles()
    assert not counts.model_copy(update={"selected": 5}).reconciles()
    assert not counts.model_copy(update={"input": 11}).reconciles()
    assert Counts(input=0, quarantined=0, selected=0).reconciles()
    assert _manifest().counts.reconciles()


@pytest.mark.parametrize(
    "path",
    [(), ("counts",), ("ingest",), ("sources", 0), ("sampling",), ("stages", 0), ("outputs",)],
)
def test_extra_key_rejected(path: tuple) -> None:
    data = _manifest().model_dump()
    target = data
    for key in path:
        target = target[key]
    target["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        Manifest.model_validate(data)


def test_free_form_parts_accept_anything() -> None:
    data = _manifest().model_dump()
    data["signals"]["lm"] = {"backend": "vllm", "nested": {"a": [1, 2]}}
    data["selection"]["quota"] = {"by": "lang"}
    data["config"]["anything"] = None
    assert Manifest.model_validate(data).signals["lm"]["backend"] == "vllm"


@pytest.mark.parametrize(
    "bad",
    [
        {"engine": "gpu"},
        {"seconds": "slow"},
        {"version": "two"},
    ],
)
def test_stage_record_is_typed(bad: dict[str, Any]) -> None:
    fields = {"name": "lm", "engine": "ray", "version": 1, "fingerprint": "f", "seconds": 1.0}
    assert StageRecord(**fields).phases == {}
    with pytest.raises(ValidationError):
        StageRecord(**{**fields, **bad})


def test_counts_are_non_negative_integers() -> None:
    with pytest.raises(ValidationError):
        Counts(input=-1, quarantined=0, selected=0)
    with pytest.raises(ValidationError):
        Counts(input=1, quarantined=0, selected=0, rejected={"a": 1.5})
    with pytest.raises(ValidationError):
        SourceSummary(source="s", container="json", schema=None, rows=-3)
