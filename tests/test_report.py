"""Tests for the self-contained HTML run report (`engine.report.render_report`)."""

from __future__ import annotations

import copy
import html
import re
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from engine.report import render_report

EVIL = "<script>alert(1)</script>"
EVIL_SOURCE = f"data/{EVIL}.jsonl"
SOURCES = ("data/alpaca.json", "data/sharegpt.jsonl", EVIL_SOURCE)
N_ROWS = 300
N_QUARANTINED = 7


def _scores(n: int = N_ROWS, seed: int = 0) -> pd.DataFrame:
    """A realistic scores frame: meta columns, numeric signals with NaNs, bool flags."""
    rng = np.random.default_rng(seed)
    source = np.array(SOURCES, dtype=object)[rng.integers(0, len(SOURCES), n)]
    reason = rng.choice(
        np.array(["exact_duplicate", "empty_response", "refusal", "below_budget", None], object),
        n,
        p=[0.15, 0.05, 0.05, 0.45, 0.30],
    )
    selected = np.array([r is None for r in reason])
    dup = reason == "exact_duplicate"
    assistant = rng.lognormal(6, 1.6, n).round()
    mtld = rng.normal(70, 20, n)
    assistant[dup] = np.nan
    mtld[dup] = np.nan
    return pd.DataFrame(
        {
            "id": [f"id-{i}" for i in range(n)],
            "source": source,
            "row": np.arange(n, dtype="int64"),
            "selected": selected,
            "reason": reason,
            "dup_of": np.where(dup, "id-0", None),
            "random_baseline": rng.random(n) < 0.1,
            "assistant_chars": assistant,
            "user_chars": rng.lognormal(5, 1, n).round(),
            "turns": rng.integers(2, 9, n).astype("int32"),
            "mtld": mtld,
            "repeated_line_ratio": np.where(rng.random(n) < 0.8, 0.0, rng.random(n)),
            "non_printable_ratio": rng.random(n) / 100,
            "tokens_chat": rng.integers(10, 4000, n),
            "never_computed": np.full(n, np.nan),
            "empty_response": reason == "empty_response",
            "refusal": pd.Series(reason == "refusal", dtype=object).where(~dup, None),
        }
    )


def _manifest(scores: pd.DataFrame) -> dict[str, Any]:
    """A manifest whose counts reconcile with `scores` plus N_QUARANTINED quarantined rows."""
    rejected = scores.loc[~scores["selected"], "reason"].value_counts().to_dict()
    return {
        "run_id": "run-2024-abc",
        "started_at": "2024-05-01T10:00:00Z",
        "finished_at": "2024-05-01T10:05:00Z",
        "command": f"winnow select --input '{EVIL_SOURCE}'",
        "config": {"selection": {"preset": "longest", "note": EVIL}, "budget": 90},
        "versions": {"winnow": "0.1.0", "pyspark": "4.3.0"},
        "timings_s": {"ingest": 12.0, "tokens": 4.5, "select": 0.5},
        "counts": {
            "input": len(scores) + N_QUARANTINED,
            "quarantined": N_QUARANTINED,
            "quarantine_reasons": {"bad_json": 5, "missing_response": 2},
            "rejected": rejected,
            "selected": int(scores["selected"].sum()),
        },
        "quarantine_by_source": {"data/alpaca.json": 5, "data/sharegpt.jsonl": 2},
        "sources": [
            {"source": "data/alpaca.json", "format": "alpaca", "rows": 105, "warnings": []},
            {
                "source": EVIL_SOURCE,
                "format": "sharegpt",
                "rows": 100,
                "warnings": [f"truncated JSON at byte 12345: {EVIL}"],
            },
        ],
        "selection": {"preset": "longest", "score": "assistant_chars", "budget": 90},
        "sampling": None,
    }


def _examples() -> dict[str, list[dict[str, Any]]]:
    """Example rows per outcome, with hostile and over-long text."""
    return {
        "kept": [
            {
                "id": "id-1",
                "source": EVIL_SOURCE,
                "row": 1,
                "reason": None,
                "conversation": [
                    {"role": "user", "content": f"Explain {EVIL} please"},
                    {"role": "assistant", "content": "LONGTEXT " + "x" * 5000},
                ],
            }
        ],
        "dropped": [
            {
                "id": "id-2",
                "source": "data/alpaca.json",
                "row": 2,
                "reason": "refusal",
                "conversation": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "I'm sorry, I can't help with that."},
                ],
            }
        ],
        "quarantined": [
            {"source": "data/alpaca.json", "row": 9, "reason": "bad_json", "excerpt": '{"a": <b'}
        ],
    }


def _cells(row_html: str) -> list[str]:
    """Text of each cell in one table row, tags stripped and entities unescaped."""
    cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row_html, flags=re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells]


def _table_rows(page: str, table_id: str) -> list[list[str]]:
    """All rows (header first) of the table with the given id, as lists of cell texts."""
    match = re.search(rf'<table id="{table_id}">(.*?)</table>', page, flags=re.S)
    assert match, f"table {table_id} missing"
    return [_cells(r) for r in re.findall(r"<tr>(.*?)</tr>", match.group(1), flags=re.S)]


def _reconcile_line(page: str) -> str:
    match = re.search(r'<p class="check (\w+)" id="reconcile">(.*?)</p>', page, flags=re.S)
    assert match, "reconciliation line missing"
    return f"{match.group(1)}: {html.unescape(match.group(2))}"


@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    return _scores()


@pytest.fixture(scope="module")
def page(scores: pd.DataFrame) -> str:
    return render_report(scores, _manifest(scores), _examples())


def test_page_is_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    lowered = page.lower()
    assert "<link" not in lowered
    assert 'src="http' not in lowered and "src='http" not in lowered
    assert "url(" not in lowered  # no CSS-loaded resources either
    assert "@import" not in lowered
    assert "<script" not in lowered  # the report needs no JavaScript at all
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,"), src[:60]


def test_untrusted_text_is_escaped(page: str) -> None:
    assert EVIL not in page
    escaped = html.escape(EVIL)
    # conversation, source name (table, warning, examples), command and config all carry it
    assert page.count(escaped) >= 5
    assert html.escape("Explain " + EVIL + " please") in page
    assert html.escape('{"a": <b') in page


def test_headline_counts_and_reconciliation(page: str, scores: pd.DataFrame) -> None:
    counts = _manifest(scores)["counts"]
    rejected_total = sum(counts["rejected"].values())
    for value in (counts["input"], N_QUARANTINED, rejected_total, counts["selected"]):
        assert f'<div class="v">{value:,}</div>' in page
    line = _reconcile_line(page)
    assert line.startswith("ok: ✓ OK")
    assert f"input {counts['input']:,}" in line
    assert f"selected {counts['selected']:,}" in line


def test_reconciliation_flags_mismatch(scores: pd.DataFrame) -> None:
    manifest = _manifest(scores)
    manifest["counts"]["selected"] += 3
    line = _reconcile_line(render_report(scores, manifest, {}))
    assert line.startswith("bad: ✗ MISMATCH")
    assert "3 rows too many" in line

    manifest = _manifest(scores)
    del manifest["counts"]["input"]
    line = _reconcile_line(render_report(scores, manifest, {}))
    assert line.startswith("warn:") and "input" in line


def test_reasons_table(page: str, scores: pd.DataFrame) -> None:
    manifest = _manifest(scores)
    input_n = manifest["counts"]["input"]
    expected = dict(manifest["counts"]["rejected"])
    expected["quarantined:bad_json"] = 5
    expected["quarantined:missing_response"] = 2
    rows = _table_rows(page, "reasons-table")
    assert rows[0][:3] == ["reason", "rows", "% of input"]
    body = rows[1:]
    assert {r[0]: int(r[1].replace(",", "")) for r in body} == expected
    counts = [int(r[1].replace(",", "")) for r in body]
    assert counts == sorted(counts, reverse=True)
    top = body[0]
    assert top[2] == f"{100 * expected[top[0]] / input_n:.1f}%"


def test_per_source_table(page: str, scores: pd.DataFrame) -> None:
    rows = _table_rows(page, "sources-table")
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    assert header[:4] == ["source", "format", "ingested", "quarantined"]
    col = {name: i for i, name in enumerate(header)}
    assert set(body) == set(SOURCES)
    quarantined = _manifest(scores)["quarantine_by_source"]
    for source, group in scores.groupby("source"):
        row = body[source]
        assert row[col["ingested"]] == f"{len(group):,}"
        assert row[col["selected"]] == f"{int(group['selected'].sum()):,}"
        assert row[col["rejected"]] == f"{int((~group['selected']).sum()):,}"
        n_dup = int((group["reason"] == "exact_duplicate").sum())
        assert row[col["rejected: exact_duplicate"]] == f"{n_dup:,}"
        assert row[col["quarantined"]] == str(quarantined.get(source, 0))
    assert body["data/alpaca.json"][col["format"]] == "alpaca"


def test_warnings_plots_flags_and_details(page: str) -> None:
    warnings = re.search(r'<section class="warnbox" id="warnings">(.*?)</section>', page, re.S)
    assert warnings and "truncated JSON at byte 12345" in warnings.group(1)
    # warnings come before the counts so they are seen first
    assert page.index('id="warnings"') < page.index('id="counts"')

    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert 6 <= len(images) <= 8
    assert all(len(img) > 1000 for img in images)
    assert 'alt="distribution of assistant_chars"' in page
    assert "never_computed" not in page  # all-NaN column is skipped
    assert "assistant_chars (log x)" not in page  # titles live inside the PNG, not the HTML

    flags = {r[0]: r for r in _table_rows(page, "flags-table")[1:]}
    assert set(flags) == {"empty_response", "refusal"}

    timings = {r[0]: r for r in _table_rows(page, "timings-table")[1:]}
    assert timings["ingest"][1:] == ["12.0 s", "70.6%"]
    assert timings["total"][1] == "17.0 s"
    versions = {r[0]: r[1] for r in _table_rows(page, "versions-table")[1:]}
    assert versions == {"winnow": "0.1.0", "pyspark": "4.3.0"}
    assert "<details id='config'>" in page and "&quot;budget&quot;: 90" in page


def test_examples_are_truncated_with_roles(page: str) -> None:
    section = page[page.index('id="examples"') :]
    assert '<span class="role">user</span>' in section
    assert '<span class="role">assistant</span>' in section
    assert "x" * 700 not in section
    assert "[+4,409 chars]" in section  # 9 + 5000 chars cut to 600
    assert "I&#x27;m sorry" in section
    assert 'id="examples-quarantined"' in section


def test_empty_frame_renders() -> None:
    empty = _scores().iloc[0:0]
    open_before = plt.get_fignums()
    page = render_report(empty, {}, {})
    assert "<html" in page and "data:image/png" not in page
    assert "No numeric signal values to plot" in page
    assert _reconcile_line(page).startswith("warn:")
    assert plt.get_fignums() == open_before

    bare = render_report(pd.DataFrame(), {"counts": {"input": 0, "quarantined": 0}}, {})
    assert _reconcile_line(bare).startswith("ok:")


def test_missing_manifest_keys_and_odd_values(scores: pd.DataFrame) -> None:
    manifest = copy.deepcopy(_manifest(scores))
    manifest["counts"] = {"input": "lots", "rejected": None}
    manifest["timings_s"] = {"ingest": "n/a"}
    manifest["sources"] = "not a list"
    page = render_report(scores, manifest, {"kept": [{"conversation": None}]})
    # selected/rejected fall back to the scores table and are marked as derived
    assert f'<div class="v">{int(scores["selected"].sum()):,}*</div>' in page
    assert _reconcile_line(page).startswith("warn:")


def test_no_figures_leak(scores: pd.DataFrame) -> None:
    before = len(plt.get_fignums())
    render_report(scores, _manifest(scores), _examples())
    assert len(plt.get_fignums()) == before


def _multilingual_scores(n: int = 400, seed: int = 1) -> pd.DataFrame:
    """The realistic frame plus lang columns: 20 languages (one hostile label), some und."""
    frame = _scores(n, seed)
    rng = np.random.default_rng(seed)
    codes = ["en", "zh", "ko", "es", "fr", "de", "pt", "ja", "ru", "und", EVIL]
    codes += [f"l{i}" for i in range(9)]
    weights = np.linspace(20, 1, len(codes))
    lang = rng.choice(np.array(codes, object), n, p=weights / weights.sum())
    mismatch = pd.Series(rng.random(n) < 0.1, dtype=object)
    mismatch[lang == "und"] = None
    return frame.assign(
        lang=lang,
        lang_confidence=np.where(lang == "und", np.nan, rng.random(n)),
        lang_mismatch=mismatch,
    )


def test_per_language_table_and_plot() -> None:
    scores = _multilingual_scores()
    page = render_report(scores, _manifest(scores), {})
    assert EVIL not in page
    rows = _table_rows(page, "languages-table")
    header, body = rows[0], rows[1:]
    assert header == [
        "language",
        "rows in",
        "kept",
        "kept %",
        "top rejection reasons",
        "mismatches",
    ]
    sizes = scores["lang"].value_counts()
    assert [r[0] for r in body] == sorted(sizes.index, key=lambda c: (-sizes[c], c))
    for row in body:
        group = scores[scores["lang"] == row[0]]
        kept = int(group["selected"].sum())
        assert row[1:4] == [f"{len(group):,}", f"{kept:,}", f"{100 * kept / len(group):.1f}%"]
        reasons = group.loc[~group["selected"], "reason"].value_counts()
        if len(reasons):
            top_reason, top_count = row[4].split(", ")[0].rsplit(" ", 1)
            assert int(top_count) == reasons.max() and reasons[top_reason] == reasons.max()
        assert row[5] == str(int((group["lang_mismatch"] == True).sum()))  # noqa: E712
    section = page[page.index('id="languages"') :]
    assert re.search(r'<figure id="languages-plot"><img [^>]*src="data:image/png;base64,', section)
    assert page.index('id="sources"') < page.index('id="languages"')


def test_no_language_section_without_lang(page: str) -> None:
    assert 'id="languages"' not in page
