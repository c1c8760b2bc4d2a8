"""Render a run's `report.html` from Jinja2 templates: one self-contained page.

The page has no external resources (no CSS/JS/font/image links, no <script>): styling is an
inline <style> block and plots are PNG data URIs. Autoescaping is on for every template, and the
environment's `finalize` makes control characters visible in every value, so untrusted text
(corpus rows, source paths, reasons, config values) is always inert. Corpus text only ever enters
as template variables, never as template source, so `{{ }}` or `{% %}` in a row stays literal.

Counts come from the `Manifest`; the scores frame adds distributions and breakdowns only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from engine.manifest import Manifest
from engine.refresh import report_section as changes_section
from engine.report import evaluation as eval_section
from engine.report import examples as example_rows
from engine.report import plots, summary, tables
from engine.report.format import fmt_cell, fmt_int, fmt_seconds, is_numeric, visible

__all__ = ["environment", "render_report"]


@cache
def environment() -> jinja2.Environment:
    """The report's Jinja2 environment (built once): autoescaped, strict about undefined names."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("engine.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        finalize=visible,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(visible=visible, cell=fmt_cell, count=fmt_int, seconds=fmt_seconds)
    env.tests["numeric"] = is_numeric
    return env


def _languages(scores: pd.DataFrame, selected: Any) -> dict[str, Any] | None:
    """The language table and its plot (or the reason the plot failed)."""
    langs = tables.languages_table(scores, selected)
    if langs is None:
        return None
    figure, failed = None, None
    try:
        figure = plots.languages(langs.plot_names, langs.plot_kept, langs.plot_rejected)
    except Exception as exc:  # a broken plot must never cost the run its report
        failed = f"{type(exc).__name__}: {exc}"
    return {"table": langs.table, "figure": figure, "failed": failed}


def render_report(
    scores: pd.DataFrame | None,
    manifest: Manifest,
    examples: Mapping[str, list[Mapping[str, Any]]] | None = None,
    run_root: Path | None = None,
) -> str:
    """The run report as one self-contained HTML page (the caller writes it as UTF-8).

    `scores` has one row per ingested record (meta columns plus any signal columns); `examples`
    holds a few rows per outcome group ({"kept": [...], "dropped": [...], "quarantined": [...]}).
    `run_root` (default `manifest.out`) is where the Evaluation section reads `eval/`.
    """
    scores = pd.DataFrame() if scores is None else scores
    selected = tables.bool_mask(scores, "selected")
    numeric, flags = tables.classify_signals(scores)
    figures, plot_failures = plots.distributions(scores, numeric, selected)
    warning_total, warning_items = summary.warnings(manifest)

    baseline = manifest.export.get("random_baseline_rows")
    if not isinstance(baseline, int) or isinstance(baseline, bool):
        baseline = int(tables.bool_mask(scores, "random_baseline").sum())

    context = {
        "m": manifest,
        "stage_seconds": summary.total_seconds(manifest),
        "warning_total": warning_total,
        "warnings": warning_items,
        "cards": summary.cards(manifest.counts),
        "check": summary.reconciliation(manifest.counts),
        "notes": summary.consistency_notes(manifest, len(scores), int(selected.sum())),
        "baseline_rows": baseline,
        "selection": summary.kv_table(manifest.selection) if manifest.selection else None,
        "sampling": summary.kv_table(manifest.sampling.model_dump()) if manifest.sampling else None,
        "evaluation": eval_section.section(manifest, run_root),
        "changes": changes_section(run_root or manifest.out),  # nightly refresh (engine.refresh)
        "reasons": summary.reasons(manifest.counts),
        "sources": tables.sources_table(scores, selected, manifest),
        "languages": _languages(scores, selected),
        "figures": figures,
        "plot_failures": plot_failures,
        "flags": tables.flags_table(scores, flags, selected),
        "examples": example_rows.groups(examples),
        "stages": summary.stages_table(manifest),
        "timings": summary.timings_table(manifest),
        "versions": summary.kv_table(manifest.versions, "versions-table")
        if manifest.versions
        else None,
        "export": summary.kv_table(manifest.export) if manifest.export else None,
        "outputs": summary.kv_table(manifest.outputs.model_dump(), "outputs-table"),
        "signals": {name: summary.kv_table(info) for name, info in manifest.signals.items()},
        "config_json": json.dumps(
            manifest.config, indent=2, sort_keys=True, default=str, ensure_ascii=False
        ),
    }
    return environment().get_template("report.html").render(context)
