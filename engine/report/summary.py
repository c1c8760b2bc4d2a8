"""What the report shows straight from the manifest: headline counts, reasons, warnings, timings.

These are the run's own numbers; nothing here looks at the scores frame except to point out
where it disagrees with the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.manifest import Counts, Manifest
from engine.report.format import as_number, fmt_seconds, pct
from engine.report.tables import Table

MAX_WARNINGS_PER_SOURCE = 20
BAR_PX = 120  # width of the longest bar in the reasons table


@dataclass
class Card:
    """One headline number; `share` is its percentage of the input (None for the input itself)."""

    label: str
    value: int
    css: str = ""
    share: str | None = None


def cards(counts: Counts) -> list[Card]:
    """Input, quarantined, rejected and selected rows, as the manifest counted them."""
    return [
        Card("input rows", counts.input),
        Card("quarantined", counts.quarantined, "qua", pct(counts.quarantined, counts.input)),
        Card("rejected", counts.total_rejected, "rej", pct(counts.total_rejected, counts.input)),
        Card("selected", counts.selected, "sel", pct(counts.selected, counts.input)),
    ]


@dataclass
class Check:
    """The accounting check as shown: its verdict (`Counts.reconciles`) and the sum spelled out."""

    ok: bool
    text: str


def reconciliation(counts: Counts) -> Check:
    """Every input row must be quarantined, rejected or selected; say so, or by how much not."""
    terms = (
        f"quarantined {counts.quarantined:,} + rejected {counts.total_rejected:,} "
        f"+ selected {counts.selected:,}"
    )
    if counts.reconciles():
        return Check(True, f"✓ OK: input {counts.input:,} = {terms}")
    accounted = counts.quarantined + counts.total_rejected + counts.selected
    diff = counts.input - accounted
    gap = "unaccounted for" if diff > 0 else "too many"
    return Check(
        False,
        f"✗ MISMATCH: input {counts.input:,} ≠ {terms} = {accounted:,} ({abs(diff):,} rows {gap})",
    )


def consistency_notes(manifest: Manifest, scores_rows: int, scores_selected: int) -> list[str]:
    """Soft warnings where the manifest's own numbers, or the scores table, disagree with it."""
    counts, ingest = manifest.counts, manifest.ingest
    notes = []
    if counts.input - counts.quarantined != ingest.ingested:
        notes.append(
            f"input − quarantined = {counts.input - counts.quarantined:,} but ingest reports "
            f"{ingest.ingested:,} rows ingested"
        )
    if counts.quarantine_reasons and sum(counts.quarantine_reasons.values()) != counts.quarantined:
        notes.append(
            f"quarantine reasons add up to {sum(counts.quarantine_reasons.values()):,} "
            f"but {counts.quarantined:,} rows were quarantined"
        )
    if scores_rows != ingest.ingested:
        notes.append(
            f"scores table has {scores_rows:,} rows but ingest reports {ingest.ingested:,}"
        )
    if scores_rows and scores_selected != counts.selected:
        notes.append(
            f"scores table marks {scores_selected:,} rows selected but the manifest says "
            f"{counts.selected:,}"
        )
    return notes


@dataclass
class Reason:
    reason: str
    rows: int
    share: str
    bar: int  # bar width in px


def reasons(counts: Counts) -> list[Reason]:
    """Rejection and quarantine reasons, largest first, with bars scaled to the largest."""
    rows: dict[str, int] = dict(counts.rejected)
    if counts.quarantine_reasons:
        for reason, n in counts.quarantine_reasons.items():
            rows[f"quarantined:{reason}"] = rows.get(f"quarantined:{reason}", 0) + n
    elif counts.quarantined:
        rows["quarantined"] = counts.quarantined
    ordered = sorted(rows.items(), key=lambda kv: (-kv[1], kv[0]))
    biggest = max((n for _, n in ordered), default=0) or 1
    return [
        Reason(r, n, pct(n, counts.input), max(1, round(BAR_PX * n / biggest)) if n else 0)
        for r, n in ordered
    ]


@dataclass
class SourceWarnings:
    source: str
    shown: list[str]
    more: int


def warnings(manifest: Manifest) -> tuple[int, list[SourceWarnings]]:
    """Source warnings (e.g. truncated files), capped per source, and their total."""
    items = [
        SourceWarnings(
            s.source,
            s.warnings[:MAX_WARNINGS_PER_SOURCE],
            max(0, len(s.warnings) - MAX_WARNINGS_PER_SOURCE),
        )
        for s in manifest.sources
        if s.warnings
    ]
    return sum(len(s.warnings) for s in manifest.sources), items


def total_seconds(manifest: Manifest) -> float:
    """Sum of the finite stage timings."""
    return sum(v for v in (as_number(t) for t in manifest.timings_s.values()) if v is not None)


def timings_table(manifest: Manifest) -> Table | None:
    """Seconds per stage (`timings_s`) and each stage's share of the total."""
    if not manifest.timings_s:
        return None
    total = total_seconds(manifest)
    rows: list[list[Any]] = []
    for name, secs in manifest.timings_s.items():
        finite = as_number(secs)
        rows.append([name, fmt_seconds(finite), "" if finite is None else pct(finite, total)])
    return Table(
        id="timings-table",
        headers=["stage", "time", "share"],
        rows=rows,
        num_columns={1, 2},
        total=["total", fmt_seconds(total), ""],
    )


def stages_table(manifest: Manifest) -> Table | None:
    """One row per stage record: where it ran, its version and fingerprint, time and sub-phases."""
    if not manifest.stages:
        return None
    rows: list[list[Any]] = [
        [
            s.name,
            s.engine,
            s.version,
            s.fingerprint,
            fmt_seconds(s.seconds),
            "skipped" if s.skipped else "ran",
            " · ".join(f"{phase} {fmt_seconds(secs)}" for phase, secs in s.phases.items()),
        ]
        for s in manifest.stages
    ]
    return Table(
        id="stages-table",
        headers=["stage", "engine", "version", "fingerprint", "time", "run", "phases"],
        rows=rows,
        num_columns={2, 4},
    )


def kv_rows(mapping: Mapping[str, Any]) -> list[list[Any]]:
    """Key/value rows; nested values are shown as compact JSON."""
    rows = []
    for key, value in mapping.items():
        if isinstance(value, Mapping | list | tuple):
            value = json.dumps(value, default=str, ensure_ascii=False)
        rows.append([str(key), "" if value is None else value])
    return rows


def kv_table(mapping: Mapping[str, Any], table_id: str | None = None) -> Table:
    return Table(id=table_id, headers=["key", "value"], rows=kv_rows(mapping))
