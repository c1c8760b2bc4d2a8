"""Aggregates of the scores frame that the manifest does not hold: per source, per language, flags.

Counts that the manifest records (input, quarantined, rejected, selected, per-source rows and
quarantine) are never recomputed here; the scores frame (one row per ingested record) only adds
breakdowns. Everything is vectorised with pandas/numpy so a million rows stay fast; results are
plain Python values ready for the templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from engine.manifest import Manifest
from engine.report.format import pct

# Columns of the scores frame that describe a row rather than measure it.
META_COLUMNS = frozenset({"id", "source", "row", "selected", "reason", "dup_of", "random_baseline"})
# Signals worth plotting first, in this order; other numeric signals fill up the plot budget.
PREFERRED_SIGNALS = (
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
MAX_SOURCES = 50
TOP_REASONS = 4
MAX_LANGUAGES = 60
PLOT_LANGUAGES = 15


@dataclass
class Table:
    """Headers, rows of cell values, which columns are numeric, and how many rows were cut.

    Cells are raw values (ints, floats, text); the template formats and escapes them. `total`
    is an optional bold footer row.
    """

    id: str | None
    headers: list[str]
    rows: list[list[Any]]
    num_columns: set[int] = field(default_factory=set)
    hidden: int = 0
    notes: list[str] = field(default_factory=list)
    total: list[Any] | None = None


def bool_mask(scores: pd.DataFrame, name: str) -> np.ndarray:
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


def string_column(scores: pd.DataFrame, name: str, missing: str) -> pd.Series:
    """A column as strings with nulls replaced; a constant series if the column is absent."""
    if name not in scores.columns:
        return pd.Series([missing] * len(scores), index=scores.index, dtype=object)
    col = scores[name]
    return col.where(col.notna(), missing).astype(str)


def float_values(series: pd.Series) -> np.ndarray:
    """Numeric series (incl. nullable dtypes) as a float64 array with NaN for missing."""
    if isinstance(series.dtype, pd.api.extensions.ExtensionDtype):
        return series.to_numpy(dtype="float64", na_value=np.nan)
    return series.to_numpy(dtype="float64", copy=False)


def _is_flag_object(series: pd.Series) -> bool:
    """True for object columns holding only booleans (bool flags with nulls from Arrow)."""
    non_null = series.dropna()
    return len(non_null) > 0 and bool(non_null.map(type).isin((bool, np.bool_)).all())


def classify_signals(scores: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Split non-meta columns into numeric signals (to plot) and boolean flags (to tabulate).

    Numeric columns that hold only 0/1 and are not known numeric signals are treated as flags,
    since a two-bar histogram says less than a rate. Numeric signals come back in plot order:
    preferred signals first, then the rest as they appear.
    """
    numeric: list[str] = []
    flags: list[str] = []
    for name in scores.columns:
        if not isinstance(name, str) or name in META_COLUMNS:
            continue
        col = scores[name]
        dtype = col.dtype
        if pd.api.types.is_bool_dtype(dtype):
            flags.append(name)
        elif pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype):
            if name not in PREFERRED_SIGNALS:
                vals = float_values(col)
                vals = vals[~np.isnan(vals)]
                if vals.size and np.isin(vals, (0.0, 1.0)).all():
                    flags.append(name)
                    continue
            numeric.append(name)
        elif pd.api.types.is_object_dtype(dtype) and _is_flag_object(col):
            flags.append(name)
    ordered = [c for c in PREFERRED_SIGNALS if c in numeric]
    ordered += [c for c in numeric if c not in PREFERRED_SIGNALS]
    return ordered, flags


def _source_format(container: str, schema: str | None) -> str:
    """`container:schema`, the spelling `--format` takes."""
    return f"{container}:{schema}" if schema else container


def sources_table(scores: pd.DataFrame, selected: np.ndarray, manifest: Manifest) -> Table | None:
    """Per-source accounting: input rows and quarantine from the manifest, outcomes from scores."""
    known = {s.source: s for s in manifest.sources}
    quarantined = manifest.quarantine_by_source
    if not len(scores) and not known and not quarantined:
        return None

    source_col = string_column(scores, "source", "(unknown)").to_numpy()
    reason_col = string_column(scores, "reason", "(unspecified)").to_numpy()
    frame = pd.DataFrame({"source": source_col, "selected": selected})
    per = frame.groupby("source", sort=False)["selected"].agg(["size", "sum"])
    rejected_reasons = reason_col[~selected]
    top = pd.Series(rejected_reasons).value_counts().index[:TOP_REASONS].tolist()
    crosstab = (
        pd.crosstab(source_col[~selected], rejected_reasons)
        if rejected_reasons.size
        else pd.DataFrame()
    )
    other = len(top) < len(crosstab.columns)

    def size(name: str) -> int:
        if name in known:
            return known[name].rows
        return int(per["size"].get(name, 0)) + quarantined.get(name, 0)

    names = list(dict.fromkeys([*known, *per.index, *quarantined]))
    names.sort(key=lambda s: (-size(s), s))
    shown = names[:MAX_SOURCES]

    headers = ["source"] + (["format", "input"] if known else [])
    headers += ["quarantined", "ingested", "selected", "% selected", "rejected"]
    headers += [f"rejected: {r}" for r in top] + (["rejected: other"] if other else [])
    rows, notes = [], []
    for name in shown:
        ingested = int(per["size"].get(name, 0))
        sel = int(per["sum"].get(name, 0))
        row: list[Any] = [name]
        if known:
            summary = known.get(name)
            row += (
                [_source_format(summary.container, summary.schema_), summary.rows]
                if summary
                else ["", "–"]
            )
            expected = summary.rows - quarantined.get(name, 0) if summary else None
            if expected is not None and len(scores) and expected != ingested:
                notes.append(
                    f"{name}: the manifest has {summary.rows:,} input rows and "
                    f"{quarantined.get(name, 0):,} quarantined, but the scores table holds "
                    f"{ingested:,} rows of it"
                )
        row += [quarantined.get(name, 0), ingested, sel, pct(sel, ingested), ingested - sel]
        by_reason = crosstab.loc[name] if name in crosstab.index else pd.Series(dtype="int64")
        row += [int(by_reason.get(r, 0)) for r in top]
        if other:
            row.append(int(by_reason.drop(labels=top, errors="ignore").sum()))
        rows.append(row)
    first_num = 2 if known else 1
    return Table(
        id="sources-table",
        headers=headers,
        rows=rows,
        num_columns=set(range(first_num, len(headers))),
        hidden=len(names) - len(shown),
        notes=notes,
    )


@dataclass
class Languages:
    """The per-language table and the data for its bar plot (largest languages first)."""

    table: Table
    plot_names: list[str]
    plot_kept: list[int]
    plot_rejected: list[int]


def languages_table(scores: pd.DataFrame, selected: np.ndarray) -> Languages | None:
    """Per-language accounting (instruction-side `lang`): rows in, kept, why the rest went."""
    if "lang" not in scores.columns or not len(scores):
        return None
    lang = string_column(scores, "lang", "(none)").to_numpy()
    reason = string_column(scores, "reason", "(unspecified)").to_numpy()
    frame = pd.DataFrame(
        {"lang": lang, "selected": selected, "mismatch": bool_mask(scores, "lang_mismatch")}
    )
    per = frame.groupby("lang", sort=False).agg(
        rows=("selected", "size"), kept=("selected", "sum"), mismatches=("mismatch", "sum")
    )
    per = per.assign(name=per.index).sort_values(["rows", "name"], ascending=[False, True])
    rejected = pd.DataFrame({"lang": lang[~selected], "reason": reason[~selected]})
    reasons = rejected.groupby(["lang", "reason"]).size() if len(rejected) else pd.Series()
    has_mismatch = "lang_mismatch" in scores.columns
    rows = []
    for name, item in per.head(MAX_LANGUAGES).iterrows():
        n, kept = int(item["rows"]), int(item["kept"])
        top = (
            reasons.loc[name].sort_values(ascending=False).head(TOP_REASONS)
            if name in reasons.index.get_level_values(0)
            else pd.Series(dtype="int64")
        )
        why = ", ".join(f"{r} {int(c):,}" for r, c in top.items())
        row: list[Any] = [str(name), n, kept, pct(kept, n), why]
        if has_mismatch:
            row.append(int(item["mismatches"]))
        rows.append(row)
    headers = ["language", "rows in", "kept", "kept %", "top rejection reasons"]
    headers += ["mismatches"] if has_mismatch else []
    top_langs = per.head(PLOT_LANGUAGES)
    return Languages(
        table=Table(
            id="languages-table",
            headers=headers,
            rows=rows,
            num_columns={1, 2, 3, 5},
            hidden=max(0, len(per) - MAX_LANGUAGES),
        ),
        plot_names=[str(n) for n in top_langs.index],
        plot_kept=top_langs["kept"].astype(int).tolist(),
        plot_rejected=(top_langs["rows"] - top_langs["kept"]).astype(int).tolist(),
    )


def _flag_share(values: pd.Series) -> tuple[int, float | None]:
    """Number of non-null values and the share that is True."""
    non_null = values.dropna()
    if not len(non_null):
        return 0, None
    return len(non_null), float(non_null.astype(bool).to_numpy().mean())


def flags_table(scores: pd.DataFrame, flags: Sequence[str], selected: np.ndarray) -> Table | None:
    """Share of rows with each boolean flag set, overall and by outcome."""
    if not flags or not len(scores):
        return None
    rows: list[list[Any]] = []
    for name in flags:
        col = scores[name]
        n, share = _flag_share(col)
        shares = [share, _flag_share(col[selected])[1], _flag_share(col[~selected])[1]]
        rows.append([name, n, *(pct(s, 1) for s in shares)])
    return Table(
        id="flags-table",
        headers=["flag", "rows with value", "true (all)", "true (selected)", "true (rejected)"],
        rows=rows,
        num_columns={1, 2, 3, 4},
    )
