"""Render a run's `report.html`: one self-contained page a person would rather read than logs.

The page has no external resources at all (no CSS/JS/font/image links, no <script>): styling is
a small inline <style> block and plots are matplotlib PNGs embedded as base64 data URIs. All
text that comes from the data (corpus text, source paths, reasons, config values) is treated as
untrusted and HTML-escaped. Aggregates are computed with pandas/numpy so the page stays small and
fast for a million rows; only the handful of example rows are rendered individually.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: must happen before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

__all__ = ["render_report"]

# Columns of the scores frame that describe a row rather than measure it.
_META_COLUMNS = frozenset(
    {"id", "source", "row", "selected", "reason", "dup_of", "random_baseline"}
)
# Signals worth plotting first, in this order; other numeric signals fill up to _MAX_PLOTS.
_PREFERRED_SIGNALS = (
    "ifd",
    "ifd_ppl",
    "ppl_cond",
    "assistant_chars",
    "user_chars",
    "turns",
    "mtld",
    "tokens_chat",
    "repeated_line_ratio",
    "non_printable_ratio",
)
_MAX_PLOTS = 10
_HIST_BINS = 40
_LOG_X_RATIO = 20.0  # max/median above which a non-negative signal is drawn on a log x axis
_TURN_CHARS = 600
_MAX_TURNS = 8
_MAX_SOURCES = 50
_MAX_WARNINGS_PER_SOURCE = 20
_TOP_REASONS_PER_SOURCE = 4
_MAX_LANGUAGES = 60
_PLOT_LANGUAGES = 15
_SELECTED_COLOR = "#2a9d8f"
_REJECTED_COLOR = "#e76f51"

# C0 control characters (except tab/newline/CR) and DEL are shown as visible \xNN escapes so
# garbage bytes in the corpus are noticeable instead of silently vanishing in the browser.
_CONTROL_MAP = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20)]}
_CONTROL_MAP[0x7F] = "\\x7f"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;
 margin:0;background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;
 border-bottom:1px solid #d8dce3;padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.meta{color:#566070;margin:2px 0}code,pre{font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace}
code{background:#e9ecf1;padding:1px 4px;border-radius:3px;word-break:break-all}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:10px 0}
.card{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:10px 16px;min-width:140px}
.card .v{font-size:26px;font-weight:600}.card .k{color:#566070;font-size:12px;
 text-transform:uppercase;letter-spacing:.04em}
.card.sel .v{color:#1f7a6f}.card.rej .v{color:#b3472d}.card.qua .v{color:#8a6d00}
.check{padding:8px 12px;border-radius:6px;font-weight:600;margin:8px 0}
.check.ok{background:#e3f4ec;color:#17623a;border:1px solid #a9dcc0}
.check.bad{background:#fde4e1;color:#a4161a;border:2px solid #e5383b}
.check.warn,.note{background:#fff5d6;color:#6b5200;border:1px solid #f0d27a}
.note{padding:6px 10px;border-radius:6px;margin:6px 0}
.warnbox{background:#fff5d6;border:2px solid #e0a800;border-radius:8px;padding:8px 14px;
 margin:14px 0}
.warnbox h2{border:0;margin:4px 0;color:#7a5600}.warnbox li{margin:3px 0}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #d8dce3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.num,th.num{text-align:right;
 font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:9px;background:#e76f51;border-radius:2px;vertical-align:middle}
.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:6px}
figcaption{font-size:12px;color:#566070;padding:2px 4px;max-width:440px}
.ex{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:8px 12px;margin:8px 0}
.ex .hdr{font-size:12px;color:#566070;margin-bottom:4px}
.turn{margin:4px 0}.role{display:inline-block;min-width:70px;font-size:11px;font-weight:700;
 text-transform:uppercase;color:#3d4a5c}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f8fa;border:1px solid #e3e6eb;
 border-radius:4px;padding:6px 8px;margin:2px 0 6px}
.muted{color:#7a8494}details{margin:8px 0}summary{cursor:pointer;font-weight:600}
"""


class _Html(str):
    """A string that is already safe HTML; `_cell` and `_e` pass it through unescaped."""


def _e(value: Any) -> str:
    """Escape any untrusted value for HTML text/attribute context (None renders as empty)."""
    if isinstance(value, _Html):
        return value
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    # Lone surrogates (possible in JSON-decoded corpus text) would make writing UTF-8 fail.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text.translate(_CONTROL_MAP), quote=True)


def _as_number(value: Any) -> float | None:
    """Return a finite float for real numbers (not bools), else None: manifest values are loose."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _as_int(value: Any) -> int | None:
    """Integer count from a manifest value, or None when it is missing or not a number."""
    num = _as_number(value)
    return None if num is None else round(num)


def _fmt_int(value: int | None) -> str:
    """Thousands-separated integer, or an en dash for unknown."""
    return "–" if value is None else f"{value:,}"


def _fmt_num(value: float | None) -> str:
    """Compact human formatting for signal values of very different scales."""
    if value is None or not math.isfinite(value):
        return "–"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _pct(part: float | None, whole: float | None) -> str:
    """Percentage string, or an en dash when the denominator is unknown or zero."""
    if part is None or not whole:
        return "–"
    return f"{100.0 * part / whole:.1f}%"


def _cell(value: Any, *, right: bool = False) -> str:
    """One table cell; numbers are formatted, text escaped; numeric columns align right."""
    if isinstance(value, _Html):
        text = str(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        text, right = _fmt_int(int(value)), True
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        text, right = _e(_fmt_num(float(value))), True
    else:
        text = _e(value)
    return f'<td class="num">{text}</td>' if right else f"<td>{text}</td>"


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    table_id: str | None = None,
    num_columns: Iterable[int] = (),
) -> str:
    """Build an HTML table; cells go through `_cell`, so only `_Html` values skip escaping."""
    right = set(num_columns)
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if i in right else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>" + "".join(_cell(v, right=i in right) for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    id_attr = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(mapping: Mapping[str, Any], *, table_id: str | None = None) -> str:
    """Two-column key/value table; nested values are shown as compact JSON."""
    rows = []
    for key, value in mapping.items():
        if isinstance(value, Mapping | list | tuple):
            value = json.dumps(value, default=str, ensure_ascii=False)
        rows.append((str(key), "" if value is None else value))
    return _table(("key", "value"), rows, table_id=table_id)


def _mapping(value: Any) -> dict[str, Any]:
    """The value if it is a mapping (as a plain dict), else an empty dict."""
    return dict(value) if isinstance(value, Mapping) else {}


# --------------------------------------------------------------------------------------------
# Data preparation
# --------------------------------------------------------------------------------------------


def _bool_mask(scores: pd.DataFrame, name: str) -> np.ndarray:
    """A boolean column as a numpy mask; a missing column or nulls count as False."""
    if name not in scores.columns:
        return np.zeros(len(scores), dtype=bool)
    col = scores[name]
    if col.dtype == np.dtype(bool):
        return col.to_numpy()
    try:  # object/nullable/Arrow booleans or 0/1 numbers, possibly with nulls
        return col.astype("boolean").fillna(False).to_numpy(dtype=bool)
    except (TypeError, ValueError):
        return col.map(lambda v: v is True or v is np.True_).to_numpy(dtype=bool)


def _string_column(scores: pd.DataFrame, name: str, missing: str) -> pd.Series:
    """A column as strings with nulls replaced; a constant series if the column is absent."""
    if name not in scores.columns:
        return pd.Series([missing] * len(scores), index=scores.index, dtype=object)
    col = scores[name]
    return col.where(col.notna(), missing).astype(str)


def _float_values(series: pd.Series) -> np.ndarray:
    """Numeric series (incl. nullable dtypes) as a float64 array with NaN for missing."""
    if isinstance(series.dtype, pd.api.extensions.ExtensionDtype):
        return series.to_numpy(dtype="float64", na_value=np.nan)
    return series.to_numpy(dtype="float64", copy=False)


def _is_flag_object(series: pd.Series) -> bool:
    """True for object columns holding only booleans (bool flags with nulls from Arrow)."""
    non_null = series.dropna()
    return len(non_null) > 0 and bool(non_null.map(type).isin((bool, np.bool_)).all())


def _classify_signals(scores: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Split non-meta columns into numeric signals (to plot) and boolean flags (to tabulate).

    Numeric columns that hold only 0/1 and are not known numeric signals are treated as flags,
    since a two-bar histogram says less than a rate.
    """
    numeric: list[str] = []
    flags: list[str] = []
    for name in scores.columns:
        if not isinstance(name, str) or name in _META_COLUMNS:
            continue
        col = scores[name]
        dtype = col.dtype
        if pd.api.types.is_bool_dtype(dtype):
            flags.append(name)
        elif pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype):
            if name not in _PREFERRED_SIGNALS:
                vals = _float_values(col)
                vals = vals[~np.isnan(vals)]
                if vals.size and np.isin(vals, (0.0, 1.0)).all():
                    flags.append(name)
                    continue
            numeric.append(name)
        elif pd.api.types.is_object_dtype(dtype) and _is_flag_object(col):
            flags.append(name)
    return numeric, flags


def _plot_order(numeric: Sequence[str]) -> list[str]:
    """Preferred signals first (in their fixed order), then the rest as they appear."""
    ordered = [c for c in _PREFERRED_SIGNALS if c in numeric]
    ordered += [c for c in numeric if c not in _PREFERRED_SIGNALS]
    return ordered


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _bin_edges(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Shared histogram edges for both groups, and whether the x axis should be logarithmic.

    Heavy-tailed non-negative signals (lengths) get log-spaced bins; small-range integer signals
    (turns) get one bin per integer; everything else gets evenly spaced bins.
    """
    lo, hi = float(values.min()), float(values.max())
    median = float(np.median(values))
    if lo >= 0 and median > 0 and hi / median > _LOG_X_RATIO:
        low_edge = float(values[values > 0].min())
        return np.logspace(math.log10(low_edge), math.log10(hi), _HIST_BINS + 1), True
    if np.all(values == np.round(values)) and hi - lo <= 60:
        return np.arange(lo - 0.5, hi + 1.5, 1.0), False
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5]), False
    return np.linspace(lo, hi, _HIST_BINS + 1), False


def _png_data_uri(fig: Any) -> str:
    """Serialise a figure to an embeddable PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_distribution(name: str, values: np.ndarray, selected: np.ndarray) -> str | None:
    """Overlaid selected-vs-rejected histogram of one signal as an HTML <figure>, or None.

    Each group is normalised to its own size (share of rows per bin) because the selected set
    is often a small fraction of the input and would vanish next to raw rejected counts.
    """
    finite = np.isfinite(values)
    if not finite.any():
        return None
    edges, log_x = _bin_edges(values[finite])
    groups = (
        ("selected", values[finite & selected], _SELECTED_COLOR),
        ("rejected", values[finite & ~selected], _REJECTED_COLOR),
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
            counts, _ = np.histogram(vals, bins=edges)
            ax.stairs(
                counts / vals.size,
                edges,
                fill=True,
                alpha=0.45,
                color=color,
                label=f"{label} (n={vals.size:,})",
            )
            ax.stairs(counts / vals.size, edges, color=color, linewidth=1.0)
        if log_x:
            ax.set_xscale("log")
        # Escape '$' so a column name can never trigger mathtext parsing.
        title = name.replace("$", r"\$") + (" (log x)" if log_x else "")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("share of group", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        uri = _png_data_uri(fig)
    finally:
        plt.close(fig)

    caption = [f"median selected {_fmt_num(_median(groups[0][1]))}"]
    caption.append(f"rejected {_fmt_num(_median(groups[1][1]))}")
    missing = int((~finite).sum())
    if missing:
        caption.append(f"{missing:,} rows without a value")
    if zeros_clipped:
        caption.append("values ≤ 0 drawn in the first bin")
    return (
        f'<figure><img alt="distribution of {_e(name)}" src="{uri}" width="440" height="290">'
        f"<figcaption><b>{_e(name)}</b>: {_e(' · '.join(caption))}</figcaption></figure>"
    )


def _median(values: np.ndarray) -> float | None:
    """Median of a possibly empty array."""
    return float(np.median(values)) if values.size else None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _section_header(manifest: Mapping[str, Any]) -> str:
    """Title, run id, times and the exact command that produced the run."""
    run_id = manifest.get("run_id")
    parts = [f"<h1>Winnow run report{': ' + _e(run_id) if run_id else ''}</h1>"]
    times = []
    if manifest.get("started_at"):
        times.append(f"started <b>{_e(manifest['started_at'])}</b>")
    if manifest.get("finished_at"):
        times.append(f"finished <b>{_e(manifest['finished_at'])}</b>")
    timings = [_as_number(v) for v in _mapping(manifest.get("timings_s")).values()]
    total = sum(t for t in timings if t is not None)
    if total:
        times.append(f"stage time <b>{_e(_fmt_seconds(total))}</b>")
    if times:
        parts.append(f'<p class="meta">{" · ".join(times)}</p>')
    if manifest.get("command"):
        parts.append(f'<p class="meta">command: <code>{_e(manifest["command"])}</code></p>')
    return "\n".join(parts)


def _fmt_seconds(seconds: float) -> str:
    """Seconds as '4.5 s' or '12 min 3 s' for long stages."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"


def _section_warnings(manifest: Mapping[str, Any]) -> str:
    """Source warnings (e.g. truncated files) in a box near the top, so they cannot be missed."""
    items = []
    total = 0
    sources = manifest.get("sources")
    for src in sources if isinstance(sources, list) else []:
        if not isinstance(src, Mapping):
            continue
        warnings = src.get("warnings")
        if isinstance(warnings, str):
            warnings = [warnings]
        if not isinstance(warnings, list) or not warnings:
            continue
        total += len(warnings)
        shown = warnings[:_MAX_WARNINGS_PER_SOURCE]
        lis = "".join(f"<li>{_e(w)}</li>" for w in shown)
        if len(warnings) > len(shown):
            lis += f'<li class="muted">… and {len(warnings) - len(shown):,} more</li>'
        items.append(f"<li><code>{_e(src.get('source', '?'))}</code><ul>{lis}</ul></li>")
    if not items:
        return ""
    return (
        f'<section class="warnbox" id="warnings"><h2>⚠ {total:,} source warning'
        f"{'s' if total != 1 else ''}</h2><ul>{''.join(items)}</ul></section>"
    )


def _rejected_breakdown(
    manifest_counts: Mapping[str, Any], scores: pd.DataFrame, selected: np.ndarray
) -> tuple[dict[str, int], int, bool]:
    """Rejection counts by reason and their total; the flag says they were derived from scores.

    The manifest is authoritative; the scores frame is the fallback when the manifest has no
    rejection counts at all.
    """
    raw = manifest_counts.get("rejected")
    if isinstance(raw, Mapping):
        by_reason = {str(k): v for k, v in ((k, _as_int(v)) for k, v in raw.items()) if v}
        return by_reason, sum(by_reason.values()), False
    total = _as_int(raw)
    if total is not None:
        return {}, total, False
    reasons = _string_column(scores, "reason", "(unspecified)")[~selected]
    by_reason = {str(k): int(v) for k, v in reasons.value_counts().items()}
    return by_reason, int((~selected).sum()), True


def _quarantine_total(manifest: Mapping[str, Any]) -> int | None:
    """Quarantined count from counts, else summed from the per-reason or per-source breakdown."""
    counts = _mapping(manifest.get("counts"))
    direct = _as_int(counts.get("quarantined"))
    if direct is not None:
        return direct
    for breakdown in (counts.get("quarantine_reasons"), manifest.get("quarantine_by_source")):
        if isinstance(breakdown, Mapping):
            return sum(_count_value(v) for v in breakdown.values())
    return None


def _count_value(value: Any) -> int:
    """A count that may itself be a {reason: n} mapping (then summed); non-numbers count 0."""
    if isinstance(value, Mapping):
        return sum(_count_value(v) for v in value.values())
    return _as_int(value) or 0


def _section_counts(
    manifest: Mapping[str, Any], scores: pd.DataFrame, selected: np.ndarray
) -> tuple[str, dict[str, int], int | None]:
    """Headline cards plus the reconciliation check input == quarantined + rejected + selected.

    Returns the HTML, the rejection counts by reason, and the input count (for percentages).
    """
    counts = _mapping(manifest.get("counts"))
    derived: list[str] = []
    input_n = _as_int(counts.get("input"))
    quarantined = _quarantine_total(manifest)
    by_reason, rejected, rej_derived = _rejected_breakdown(counts, scores, selected)
    if rej_derived:
        derived.append("rejected")
    selected_n = _as_int(counts.get("selected"))
    if selected_n is None:
        selected_n = int(selected.sum())
        derived.append("selected")

    def card(key: str, label: str, value: int | None, css: str = "") -> str:
        star = "*" if key in derived else ""
        share = f" <span class='muted'>({_pct(value, input_n)})</span>" if key != "input" else ""
        return (
            f'<div class="card{css}"><div class="k">{_e(label)}</div>'
            f'<div class="v">{_fmt_int(value)}{star}</div>{share if value is not None else ""}'
            "</div>"
        )

    cards = (
        card("input", "input rows", input_n)
        + card("quarantined", "quarantined", quarantined, " qua")
        + card("rejected", "rejected", rejected, " rej")
        + card("selected", "selected", selected_n, " sel")
    )
    parts = [f'<section id="counts"><h2>Counts</h2><div class="cards">{cards}</div>']
    parts.append(_reconcile_line(input_n, quarantined, rejected, selected_n))
    if derived:
        parts.append(
            f'<p class="muted">* not in the manifest; derived from the scores table '
            f"({_e(', '.join(derived))}).</p>"
        )
    parts.extend(_consistency_notes(scores, selected, input_n, quarantined, selected_n))
    if "random_baseline" in scores.columns:
        baseline_n = int(_bool_mask(scores, "random_baseline").sum())
        if baseline_n:
            parts.append(
                f'<p class="meta">random-baseline comparison subset: <b>{baseline_n:,}</b> rows</p>'
            )
    parts.append("</section>")
    return "\n".join(parts), by_reason, input_n


def _reconcile_line(
    input_n: int | None, quarantined: int | None, rejected: int | None, selected_n: int | None
) -> str:
    """The accounting check: every input row must be quarantined, rejected or selected."""
    if input_n is None or quarantined is None or rejected is None or selected_n is None:
        names = ("input", "quarantined", "rejected", "selected")
        values = (input_n, quarantined, rejected, selected_n)
        missing = ", ".join(k for k, v in zip(names, values, strict=True) if v is None)
        return (
            f'<p class="check warn" id="reconcile">? cannot reconcile counts: missing '
            f"{_e(missing)}</p>"
        )
    accounted = quarantined + rejected + selected_n
    terms = f"quarantined {quarantined:,} + rejected {rejected:,} + selected {selected_n:,}"
    if accounted == input_n:
        return f'<p class="check ok" id="reconcile">✓ OK: input {input_n:,} = {terms}</p>'
    diff = input_n - accounted
    return (
        f'<p class="check bad" id="reconcile">✗ MISMATCH: input {input_n:,} ≠ {terms} = '
        f"{accounted:,} ({abs(diff):,} rows {'unaccounted for' if diff > 0 else 'too many'})</p>"
    )


def _consistency_notes(
    scores: pd.DataFrame,
    selected: np.ndarray,
    input_n: int | None,
    quarantined: int | None,
    selected_n: int | None,
) -> list[str]:
    """Soft warnings when the scores table disagrees with the manifest's counts."""
    notes = []
    if input_n is not None and quarantined is not None and len(scores) != input_n - quarantined:
        notes.append(
            f"scores table has {len(scores):,} rows but input − quarantined = "
            f"{input_n - quarantined:,}"
        )
    if selected_n is not None and len(scores) and int(selected.sum()) != selected_n:
        notes.append(
            f"scores table marks {int(selected.sum()):,} rows selected but the manifest says "
            f"{selected_n:,}"
        )
    return [f'<p class="note">⚠ {_e(n)}</p>' for n in notes]


def _section_selection(manifest: Mapping[str, Any]) -> str:
    """How the subset was chosen (preset, score, budget) and any sampling settings."""
    selection = _mapping(manifest.get("selection"))
    sampling = manifest.get("sampling")
    if not selection and sampling is None:
        return ""
    parts = ['<section id="selection"><h2>Selection</h2>']
    if selection:
        parts.append(_kv_table(selection))
    if isinstance(sampling, Mapping) and sampling:
        parts.append("<h3>Sampling</h3>" + _kv_table(sampling))
    elif sampling is not None and not isinstance(sampling, Mapping):
        parts.append(f'<p class="meta">sampling: <code>{_e(sampling)}</code></p>')
    parts.append("</section>")
    return "\n".join(parts)


def _section_reasons(
    manifest: Mapping[str, Any], by_reason: Mapping[str, int], input_n: int | None
) -> str:
    """Why rows did not make it: rejection and quarantine reasons, largest first."""
    rows: dict[str, int] = dict(by_reason)
    counts = _mapping(manifest.get("counts"))
    q_reasons = counts.get("quarantine_reasons")
    if isinstance(q_reasons, Mapping) and q_reasons:
        for reason, n in q_reasons.items():
            rows[f"quarantined:{reason}"] = rows.get(f"quarantined:{reason}", 0) + _count_value(n)
    else:
        quarantined = _quarantine_total(manifest)
        if quarantined:
            rows["quarantined"] = quarantined
    if not rows:
        return (
            '<section id="reasons"><h2>Reasons</h2><p class="muted">No rows dropped.</p></section>'
        )
    ordered = sorted(rows.items(), key=lambda kv: (-kv[1], kv[0]))
    biggest = max(n for _, n in ordered) or 1
    table_rows = []
    for reason, n in ordered:
        width = max(1, round(120 * n / biggest)) if n else 0
        bar = _Html(f'<span class="bar" style="width:{width}px"></span>')
        table_rows.append((reason, n, _pct(n, input_n), bar))
    table = _table(
        ("reason", "rows", "% of input", ""),
        table_rows,
        table_id="reasons-table",
        num_columns=(1, 2),
    )
    return f'<section id="reasons"><h2>Reasons</h2>{table}</section>'


def _section_sources(
    scores: pd.DataFrame, selected: np.ndarray, manifest: Mapping[str, Any]
) -> str:
    """Per-source accounting computed from the scores table (plus quarantine if reported)."""
    q_by_source = manifest.get("quarantine_by_source")
    q_map = (
        {str(k): _count_value(v) for k, v in q_by_source.items()}
        if isinstance(q_by_source, Mapping)
        else None
    )
    formats: dict[str, str] = {}
    sources = manifest.get("sources")
    for src in sources if isinstance(sources, list) else []:
        if isinstance(src, Mapping) and src.get("source") is not None and src.get("format"):
            formats[str(src["source"])] = str(src["format"])
    if not len(scores) and not q_map:
        return ""

    source_col = _string_column(scores, "source", "(unknown)")
    reason_col = _string_column(scores, "reason", "(unspecified)")
    frame = pd.DataFrame({"source": source_col.to_numpy(), "selected": selected})
    per = frame.groupby("source", sort=False)["selected"].agg(["size", "sum"])
    rejected_reasons = reason_col.to_numpy()[~selected]
    rejected_sources = source_col.to_numpy()[~selected]
    top = pd.Series(rejected_reasons).value_counts().index[:_TOP_REASONS_PER_SOURCE].tolist()
    crosstab = (
        pd.crosstab(rejected_sources, rejected_reasons) if rejected_reasons.size else pd.DataFrame()
    )

    names = list(per.index)
    if q_map:
        names += [s for s in q_map if s not in per.index]
    names.sort(key=lambda s: (-(int(per["size"].get(s, 0)) + (q_map or {}).get(s, 0)), s))
    shown = names[:_MAX_SOURCES]

    headers = ["source"] + (["format"] if formats else []) + ["ingested"]
    headers += ["quarantined"] if q_map is not None else []
    headers += ["selected", "% selected", "rejected"] + [f"rejected: {r}" for r in top]
    if len(top) < len(crosstab.columns):
        headers.append("rejected: other")
    rows = []
    for name in shown:
        ingested = int(per["size"].get(name, 0))
        sel = int(per["sum"].get(name, 0))
        row: list[Any] = [name] + ([formats.get(name, "")] if formats else []) + [ingested]
        if q_map is not None:
            row.append(q_map.get(name, 0))
        row += [sel, _pct(sel, ingested), ingested - sel]
        by_reason = crosstab.loc[name] if name in crosstab.index else pd.Series(dtype="int64")
        row += [int(by_reason.get(r, 0)) for r in top]
        if len(top) < len(crosstab.columns):
            row.append(int(by_reason.drop(labels=top, errors="ignore").sum()))
        rows.append(row)
    first_num = 2 if formats else 1
    table = _table(
        headers, rows, table_id="sources-table", num_columns=range(first_num, len(headers))
    )
    more = (
        f'<p class="muted">… {len(names) - len(shown):,} smaller sources not shown.</p>'
        if len(names) > len(shown)
        else ""
    )
    return f'<section id="sources"><h2>Sources</h2>{table}{more}</section>'


def _plot_languages(names: Sequence[str], kept: Sequence[int], rejected: Sequence[int]) -> str:
    """Stacked kept/rejected bars per language as an HTML <figure>."""
    fig, ax = plt.subplots(figsize=(max(4.4, 0.45 * len(names) + 1.5), 3.0))
    try:
        x = np.arange(len(names))
        ax.bar(x, kept, color=_SELECTED_COLOR, label="kept")
        ax.bar(x, rejected, bottom=kept, color=_REJECTED_COLOR, label="rejected")
        ax.set_xticks(x)
        # Escape '$' so a language label can never trigger mathtext parsing.
        ax.set_xticklabels([n.replace("$", r"\$") for n in names], fontsize=8, rotation=45)
        ax.set_ylabel("rows", fontsize=8)
        ax.set_title(f"rows per language (top {len(names)})", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        uri = _png_data_uri(fig)
    finally:
        plt.close(fig)
    return (
        f'<figure id="languages-plot"><img alt="kept and rejected rows per language" src="{uri}">'
        "<figcaption>kept (bottom) and rejected (top) rows of the largest languages"
        "</figcaption></figure>"
    )


def _section_languages(scores: pd.DataFrame, selected: np.ndarray) -> str:
    """Per-language accounting (instruction-side `lang`): rows in, kept, why the rest went."""
    if "lang" not in scores.columns or not len(scores):
        return ""
    lang = _string_column(scores, "lang", "(none)").to_numpy()
    reason = _string_column(scores, "reason", "(unspecified)").to_numpy()
    frame = pd.DataFrame(
        {"lang": lang, "selected": selected, "mismatch": _bool_mask(scores, "lang_mismatch")}
    )
    per = frame.groupby("lang", sort=False).agg(
        rows=("selected", "size"), kept=("selected", "sum"), mismatches=("mismatch", "sum")
    )
    per = per.assign(name=per.index).sort_values(["rows", "name"], ascending=[False, True])
    rejected = pd.DataFrame({"lang": lang[~selected], "reason": reason[~selected]})
    reasons = rejected.groupby(["lang", "reason"]).size() if len(rejected) else pd.Series()
    has_mismatch = "lang_mismatch" in scores.columns
    rows = []
    for name, item in per.head(_MAX_LANGUAGES).iterrows():
        n, kept = int(item["rows"]), int(item["kept"])
        top = (
            reasons.loc[name].sort_values(ascending=False).head(_TOP_REASONS_PER_SOURCE)
            if name in reasons.index.get_level_values(0)
            else pd.Series(dtype="int64")
        )
        why = ", ".join(f"{r} {int(c):,}" for r, c in top.items())
        row: list[Any] = [name, n, kept, _pct(kept, n), why]
        if has_mismatch:
            row.append(int(item["mismatches"]))
        rows.append(row)
    headers = ["language", "rows in", "kept", "kept %", "top rejection reasons"]
    headers += ["mismatches"] if has_mismatch else []
    table = _table(headers, rows, table_id="languages-table", num_columns=(1, 2, 3, 5))
    more = (
        f'<p class="muted">… {len(per) - _MAX_LANGUAGES:,} smaller languages not shown.</p>'
        if len(per) > _MAX_LANGUAGES
        else ""
    )
    plot = ""
    try:
        top_langs = per.head(_PLOT_LANGUAGES)
        plot = _plot_languages(
            [str(n) for n in top_langs.index],
            top_langs["kept"].astype(int).tolist(),
            (top_langs["rows"] - top_langs["kept"]).astype(int).tolist(),
        )
    except Exception as exc:  # a broken plot must never cost the run its report
        plot = f'<p class="note">plot failed — {_e(f"{type(exc).__name__}: {exc}")}</p>'
    note = (
        '<p class="muted">Language of the instruction side; <code>und</code>: undetermined '
        "(too short, code only, or no letters). Mismatches: a confident response in another "
        "language.</p>"
    )
    return f'<section id="languages"><h2>Languages</h2>{note}{table}{more}{plot}</section>'


def _section_distributions(
    scores: pd.DataFrame, numeric: Sequence[str], selected: np.ndarray
) -> str:
    """Histograms of the main numeric signals, selected vs rejected."""
    figures = []
    failed = []
    for name in _plot_order(numeric):
        if len(figures) >= _MAX_PLOTS:
            break
        try:
            figure = _plot_distribution(name, _float_values(scores[name]), selected)
        except Exception as exc:  # a broken plot must never cost the run its report
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if figure is not None:
            figures.append(figure)
    body = (
        f'<div class="plots">{"".join(figures)}</div>'
        if figures
        else '<p class="muted">No numeric signal values to plot.</p>'
    )
    notes = "".join(f'<p class="note">plot failed — {_e(f)}</p>' for f in failed)
    return f'<section id="distributions"><h2>Signal distributions</h2>{body}{notes}</section>'


def _flag_share(values: pd.Series) -> tuple[int, float | None]:
    """Number of non-null values and the share that is True."""
    non_null = values.dropna()
    if not len(non_null):
        return 0, None
    truthy = non_null.astype(bool).to_numpy()
    return len(non_null), float(truthy.mean())


def _section_flags(scores: pd.DataFrame, flags: Sequence[str], selected: np.ndarray) -> str:
    """Share of rows with each boolean flag set, overall and by outcome."""
    if not flags or not len(scores):
        return ""
    rows = []
    for name in flags:
        col = scores[name]
        n, share = _flag_share(col)
        _, share_sel = _flag_share(col[selected])
        _, share_rej = _flag_share(col[~selected])
        rows.append(
            (
                name,
                n,
                _pct(share, 1) if share is not None else "–",
                _pct(share_sel, 1) if share_sel is not None else "–",
                _pct(share_rej, 1) if share_rej is not None else "–",
            )
        )
    table = _table(
        ("flag", "rows with value", "true (all)", "true (selected)", "true (rejected)"),
        rows,
        table_id="flags-table",
        num_columns=(1, 2, 3, 4),
    )
    return f'<section id="flags"><h2>Flags</h2>{table}</section>'


def _truncate(text: str, limit: int = _TURN_CHARS) -> str:
    """Cut long text and say how much was cut, so examples stay skimmable."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [+{len(text) - limit:,} chars]"


def _render_conversation(conversation: Any) -> str:
    """Conversation turns with role labels, each truncated."""
    if not isinstance(conversation, list | tuple):
        return f"<pre>{_e(_truncate('' if conversation is None else str(conversation)))}</pre>"
    turns = []
    for turn in conversation[:_MAX_TURNS]:
        if isinstance(turn, Mapping):
            role, content = turn.get("role", "?"), turn.get("content", "")
        else:
            role, content = "?", turn
        content = "" if content is None else content if isinstance(content, str) else str(content)
        turns.append(
            f'<div class="turn"><span class="role">{_e(role)}</span>'
            f"<pre>{_e(_truncate(content))}</pre></div>"
        )
    if len(conversation) > _MAX_TURNS:
        turns.append(f'<p class="muted">… {len(conversation) - _MAX_TURNS:,} more turns</p>')
    return "".join(turns) or '<p class="muted">(empty conversation)</p>'


def _render_example(item: Mapping[str, Any]) -> str:
    """One example row: provenance header, then its conversation or raw excerpt."""
    hdr = []
    for key in ("id", "source", "row", "reason"):
        if item.get(key) is not None:
            hdr.append(f"{key} <code>{_e(item[key])}</code>")
    if "conversation" in item:
        body = _render_conversation(item.get("conversation"))
    else:
        excerpt = item.get("excerpt")
        body = f"<pre>{_e(_truncate('' if excerpt is None else str(excerpt)))}</pre>"
    return f'<div class="ex"><div class="hdr">{" · ".join(hdr)}</div>{body}</div>'


def _section_examples(examples: Mapping[str, Any]) -> str:
    """A few concrete rows per outcome: what was kept, dropped and quarantined, and why."""
    order = ["kept", "dropped", "quarantined"]
    order += [g for g in examples if g not in order]
    blocks = []
    for group in order:
        items = examples.get(group)
        if not isinstance(items, list) or not items:
            continue
        rows = [i for i in items if isinstance(i, Mapping)]
        rendered = "".join(_render_example(i) for i in rows)
        blocks.append(f'<h3 id="examples-{_e(group)}">{_e(group)} ({len(rows):,})</h3>{rendered}')
    if not blocks:
        return ""
    return f'<section id="examples"><h2>Examples</h2>{"".join(blocks)}</section>'


def _section_run_details(manifest: Mapping[str, Any]) -> str:
    """Timings, versions and the full config: what is needed to reproduce or explain the run."""
    parts = []
    timings = _mapping(manifest.get("timings_s"))
    if timings:
        numeric = {k: _as_number(v) for k, v in timings.items()}
        total = sum(v for v in numeric.values() if v is not None)
        rows = []
        for key, value in timings.items():
            secs = numeric[key]
            if secs is None:
                rows.append((str(key), str(value), ""))
            else:
                rows.append((str(key), _Html(_e(_fmt_seconds(secs))), _pct(secs, total)))
        rows.append(("total", _Html(f"<b>{_e(_fmt_seconds(total))}</b>"), ""))
        parts.append(
            "<h3>Timings</h3>"
            + _table(("stage", "time", "share"), rows, table_id="timings-table", num_columns=(1, 2))
        )
    versions = _mapping(manifest.get("versions"))
    if versions:
        parts.append("<h3>Versions</h3>" + _kv_table(versions, table_id="versions-table"))
    if "config" in manifest:
        config_json = json.dumps(
            manifest.get("config"), indent=2, sort_keys=True, default=str, ensure_ascii=False
        )
        parts.append(
            f"<details id='config'><summary>Config</summary><pre>{_e(config_json)}</pre></details>"
        )
    if not parts:
        return ""
    return f'<section id="run"><h2>Run details</h2>{"".join(parts)}</section>'


def render_report(
    scores: pd.DataFrame, manifest: dict[str, Any], examples: dict[str, list[dict[str, Any]]]
) -> str:
    """Render the run report as one self-contained HTML page (caller writes it as UTF-8).

    `scores` has one row per ingested record (meta columns plus any signal columns), `manifest`
    describes the run (every key optional) and `examples` holds a few rows per outcome group.
    """
    if scores is None:
        scores = pd.DataFrame()
    manifest = _mapping(manifest)
    examples = _mapping(examples)
    selected = _bool_mask(scores, "selected")
    numeric, flags = _classify_signals(scores)

    counts_html, by_reason, input_n = _section_counts(manifest, scores, selected)
    sections = [
        _section_header(manifest),
        _section_warnings(manifest),
        counts_html,
        _section_selection(manifest),
        _section_reasons(manifest, by_reason, input_n),
        _section_sources(scores, selected, manifest),
        _section_languages(scores, selected),
        _section_distributions(scores, numeric, selected),
        _section_flags(scores, flags, selected),
        _section_examples(examples),
        _section_run_details(manifest),
    ]
    run_id = manifest.get("run_id")
    title = f"Winnow report — {run_id}" if run_id else "Winnow report"
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )
