"""Matplotlib plots for the report, rendered headless (Agg) to PNG data URIs.

Plots are embedded as `data:` URIs so the page stays one self-contained file. Every figure is
closed in a `finally`, so rendering many reports in one process never leaks figures, and a plot
that fails is reported on the page instead of costing the run its report.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: must happen before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from engine.report.format import fmt_num
from engine.report.tables import float_values

MAX_PLOTS = 10
HIST_BINS = 40
LOG_X_RATIO = 20.0  # max/median above which a non-negative signal is drawn on a log x axis
SELECTED_COLOR = "#2a9d8f"
REJECTED_COLOR = "#e76f51"


@dataclass
class Figure:
    """One embedded plot: its PNG as a data URI, alt text and caption (plain text)."""

    name: str
    uri: str
    alt: str
    caption: str
    width: int | None = None
    height: int | None = None


def _bin_edges(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Shared histogram edges for both groups, and whether the x axis should be logarithmic.

    Heavy-tailed non-negative signals (lengths) get log-spaced bins; small-range integer signals
    (turns) get one bin per integer; everything else gets evenly spaced bins.
    """
    lo, hi = float(values.min()), float(values.max())
    median = float(np.median(values))
    if lo >= 0 and median > 0 and hi / median > LOG_X_RATIO:
        low_edge = float(values[values > 0].min())
        return np.logspace(math.log10(low_edge), math.log10(hi), HIST_BINS + 1), True
    if np.all(values == np.round(values)) and hi - lo <= 60:
        return np.arange(lo - 0.5, hi + 1.5, 1.0), False
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5]), False
    return np.linspace(lo, hi, HIST_BINS + 1), False


def _png_data_uri(fig: Any) -> str:
    """Serialise a figure to an embeddable PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _mathtext_safe(label: str) -> str:
    """Escape '$' so a column name or label from the data never triggers mathtext parsing."""
    return label.replace("$", r"\$")


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if values.size else None


def distribution(name: str, values: np.ndarray, selected: np.ndarray) -> Figure | None:
    """Overlaid selected-vs-rejected histogram of one signal, or None when it has no values.

    Each group is normalised to its own size (share of rows per bin) because the selected set
    is often a small fraction of the input and would vanish next to raw rejected counts.
    """
    finite = np.isfinite(values)
    if not finite.any():
        return None
    edges, log_x = _bin_edges(values[finite])
    groups = (
        ("selected", values[finite & selected], SELECTED_COLOR),
        ("rejected", values[finite & ~selected], REJECTED_COLOR),
    )
    zeros_clipped = False
    fig, ax = plt.subplots(figsize=(4.4, 2.9))
    try:
        for label, vals, color in groups:
            if not vals.size:
                continue
            if log_x:
                zeros_clipped |= bool((vals < edges[0]).any())
                vals = np.clip(vals, edges[0], edges[-1])
            share = np.histogram(vals, bins=edges)[0] / vals.size
            ax.stairs(
                share, edges, fill=True, alpha=0.45, color=color, label=f"{label} (n={vals.size:,})"
            )
            ax.stairs(share, edges, color=color, linewidth=1.0)
        if log_x:
            ax.set_xscale("log")
        title = _mathtext_safe(name) + (" (log x)" if log_x else "")
        uri = _finish(fig, ax, title, "share of group")
    finally:
        plt.close(fig)

    caption = [f"median selected {fmt_num(_median(groups[0][1]))}"]
    caption.append(f"rejected {fmt_num(_median(groups[1][1]))}")
    missing = int((~finite).sum())
    if missing:
        caption.append(f"{missing:,} rows without a value")
    if zeros_clipped:
        caption.append("values ≤ 0 drawn in the first bin")
    return Figure(name, uri, f"distribution of {name}", " · ".join(caption), 440, 290)


def distributions(
    scores: pd.DataFrame, numeric: Sequence[str], selected: np.ndarray
) -> tuple[list[Figure], list[str]]:
    """Histograms of the first MAX_PLOTS numeric signals with values, and any plot failures."""
    figures: list[Figure] = []
    failed: list[str] = []
    for name in numeric:
        if len(figures) >= MAX_PLOTS:
            break
        try:
            figure = distribution(name, float_values(scores[name]), selected)
        except Exception as exc:  # a broken plot must never cost the run its report
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if figure is not None:
            figures.append(figure)
    return figures, failed


def _finish(fig: Any, ax: Any, title: str, ylabel: str) -> str:
    """The report's common plot styling, then the figure as a PNG data URI."""
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _png_data_uri(fig)


def languages(names: Sequence[str], kept: Sequence[int], rejected: Sequence[int]) -> Figure:
    """Stacked kept/rejected bars per language."""
    fig, ax = plt.subplots(figsize=(max(4.4, 0.45 * len(names) + 1.5), 3.0))
    try:
        x = np.arange(len(names))
        ax.bar(x, kept, color=SELECTED_COLOR, label="kept")
        ax.bar(x, rejected, bottom=kept, color=REJECTED_COLOR, label="rejected")
        ax.set_xticks(x)
        ax.set_xticklabels([_mathtext_safe(n) for n in names], fontsize=8, rotation=45)
        uri = _finish(fig, ax, f"rows per language (top {len(names)})", "rows")
    finally:
        plt.close(fig)
    return Figure(
        "languages",
        uri,
        "kept and rejected rows per language",
        "kept (bottom) and rejected (top) rows of the largest languages",
    )
