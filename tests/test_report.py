"""Tests for the self-contained HTML run report (`engine.report.render_report`, `run_report`)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from markupsafe import escape

from engine.manifest import Counts, IngestSummary, Manifest, Outputs, SourceSummary, StageRecord
from engine.report import render_report
from engine.runtime.rundir import RunDir
from engine.stages.report import run_report

EVIL = "<script>alert(1)</script>"
EVIL_SOURCE = f"data/{EVIL}.jsonl"
SOURCES = ("data/alpaca.json", "data/sharegpt.jsonl", EVIL_SOURCE)
QUARANTINE_BY_SOURCE = {"data/alpaca.json": 5, "data/sharegpt.jsonl": 2}
FORMATS = {
    "data/alpaca.json": ("json", "alpaca"),
    "data/sharegpt.jsonl": ("jsonl", "sharegpt"),
    EVIL_SOURCE: ("jsonl", None),
}
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


def _outputs(root: str = "/runs/x") -> Outputs:
    return Outputs(
        selected=f"{root}/selected.jsonl",
        random_baseline=f"{root}/random_baseline.jsonl",
        scores=f"{root}/scores.parquet",
        quarantine=f"{root}/quarantine.jsonl",
        report=f"{root}/report.html",
    )


def _manifest(scores: pd.DataFrame) -> Manifest:
    """A manifest whose counts reconcile with `scores` plus N_QUARANTINED quarantined rows."""
    rejected = scores.loc[~scores["selected"], "reason"].value_counts()
    per_source = scores["source"].value_counts()
    duplicates = int((scores["reason"] == "exact_duplicate").sum())
    return Manifest(
        run_id="run-2024-abc",
        started_at="2024-05-01T10:00:00Z",
        finished_at="2024-05-01T10:05:00Z",
        command=f"winnow select --input '{EVIL_SOURCE}'",
        out="/runs/x",
        config={"selection": {"preset": "longest", "note": EVIL}, "budget": 90},
        versions={"winnow": "0.1.0", "pyspark": "4.3.0"},
        timings_s={"ingest": 12.0, "tokens": 4.5, "select": 0.5},
        counts=Counts(
            input=len(scores) + N_QUARANTINED,
            quarantined=N_QUARANTINED,
            quarantine_reasons={"bad_json": 5, "missing_response": 2},
            rejected={str(k): int(v) for k, v in rejected.items()},
            selected=int(scores["selected"].sum()),
        ),
        ingest=IngestSummary(
            ingested=len(scores), unique=len(scores) - duplicates, exact_duplicates=duplicates
        ),
        quarantine_by_source=QUARANTINE_BY_SOURCE,
        sources=[
            SourceSummary(
                source=name,
                container=FORMATS[name][0],
                schema=FORMATS[name][1],
                rows=int(per_source.get(name, 0)) + QUARANTINE_BY_SOURCE.get(name, 0),
                warnings=[f"truncated JSON at byte 12345: {EVIL}"] if name == EVIL_SOURCE else [],
            )
            for name in SOURCES
        ],
        signals={"tokens": {"rows": len(scores), "cache_hits": 12, "note": EVIL}},
        selection={"preset": "longest", "score": "assistant_chars", "budget": 90},
        export={"selected_rows": int(scores["selected"].sum()), "random_baseline_rows": 31},
        outputs=_outputs(),
        stages=[
            StageRecord(
                name="ingest",
                engine="spark",
                version=2,
                fingerprint="f00dfeed",
                seconds=12.0,
                phases={"frame": 3.25, "parse": 8.5},
            ),
            StageRecord(
                name="tokens",
                engine="ray",
                version=2,
                fingerprint="beef",
                seconds=4.5,
                skipped=True,
            ),
            StageRecord(name="select", engine="driver", version=2, fingerprint="c0de", seconds=0.5),
        ],
        logs="/runs/x/logs",
    )


def _empty_manifest(**counts: Any) -> Manifest:
    """A manifest of a run that kept nothing."""
    values = {"input": 0, "quarantined": 0, "selected": 0, **counts}
    return Manifest(
        run_id="empty",
        started_at="2024-05-01T10:00:00Z",
        out="/runs/empty",
        counts=Counts(**values),
        ingest=IngestSummary(ingested=0, unique=0, exact_duplicates=0),
        outputs=_outputs("/runs/empty"),
    )


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


def _with_counts(manifest: Manifest, **changes: Any) -> Manifest:
    return manifest.model_copy(update={"counts": manifest.counts.model_copy(update=changes)})


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
    assert "href=" not in lowered
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,"), src[:60]
    assert "main{max-width:1180px" in page  # the stylesheet is inlined verbatim


def test_untrusted_text_is_escaped(page: str) -> None:
    assert EVIL not in page
    escaped = str(escape(EVIL))
    # conversation, source name (table, warning, examples), command, config and signals carry it
    assert page.count(escaped) >= 5
    assert escape("Explain " + EVIL + " please") in page
    assert escape('{"a": <b') in page


HOSTILE = (
    "</textarea></pre><!-- comment --> <a href='javascript:alert(1)'>x</a> "
    "<img src=x onerror=alert(1)> {{ 7*191919 }} {% if true %}yes{% endif %} {# gone #} "
    "ctl\x00\x1b[31m\x7f end \ud800"
)


def test_hostile_corpus_text_is_inert(scores: pd.DataFrame) -> None:
    manifest = _manifest(scores)
    manifest = manifest.model_copy(
        update={
            "run_id": HOSTILE,
            "command": HOSTILE,
            "counts": manifest.counts.model_copy(
                update={"rejected": {**manifest.counts.rejected, HOSTILE: 0}}
            ),
        }
    )
    examples = {
        "kept": [
            {
                "id": HOSTILE,
                "source": HOSTILE,
                "row": 3,
                "conversation": [{"role": HOSTILE, "content": HOSTILE}],
            }
        ],
        "quarantined": [{"source": "s", "row": 1, "reason": HOSTILE, "excerpt": HOSTILE}],
        HOSTILE: [{"id": "x", "conversation": HOSTILE}],
    }
    page = render_report(scores, manifest, examples)
    page.encode("utf-8")  # lone surrogates must not make the page unwritable
    lowered = page.lower()
    for raw in ("</textarea>", "<!--", "<a ", "<img src=x", "<script", "\x00"):
        assert raw not in lowered, raw
    for tag in re.findall(r"<[^>]*>", lowered):  # the markup itself: no link, handler or URL
        bare = re.sub(r'"[^"]*"', '""', tag)  # quoted values are escaped text: they cannot end
        assert "href" not in bare and "javascript:" not in bare and "onerror" not in bare, tag
    anchors = re.findall(r'<h3 id="([^"]*)"', page)
    assert anchors[:2] == ["examples-kept", "examples-quarantined"]
    assert all(re.fullmatch(r"examples-[a-z0-9_-]+", a) for a in anchors), anchors
    # template syntax in corpus text is text, never evaluated
    assert "{{ 7*191919 }}" in page and "{% if true %}yes{% endif %}" in page
    assert "{# gone #}" in page and "1343433" not in page
    # control characters stay visible as escapes, in examples and everywhere else
    assert "ctl\\x00\\x1b[31m\\x7f end \\ud800" in page
    assert page.count(str(escape("</textarea>"))) >= 6
    assert "\x1b" not in page and "\x7f" not in page


def test_headline_counts_come_from_the_manifest(page: str, scores: pd.DataFrame) -> None:
    counts = _manifest(scores).counts
    for value in (counts.input, N_QUARANTINED, counts.total_rejected, counts.selected):
        assert f'<div class="v">{value:,}</div>' in page
    line = _reconcile_line(page)
    assert line.startswith("ok: ✓ OK")
    assert f"input {counts.input:,}" in line
    assert f"selected {counts.selected:,}" in line
    assert "random-baseline comparison subset: <b>31</b> rows" in page  # export, not scores

    # The manifest's numbers are shown even when the scores table disagrees; the page says so.
    manifest = _with_counts(_manifest(scores), selected=counts.selected + 1000, input=10**6)
    other = render_report(scores, manifest, {})
    assert f'<div class="v">{counts.selected + 1000:,}</div>' in other
    assert '<div class="v">1,000,000</div>' in other
    assert "scores table marks" in other and f"manifest says {counts.selected + 1000:,}" in other


def test_reconciliation_flags_mismatch(scores: pd.DataFrame) -> None:
    manifest = _with_counts(_manifest(scores), selected=_manifest(scores).counts.selected + 3)
    assert not manifest.counts.reconciles()
    line = _reconcile_line(render_report(scores, manifest, {}))
    assert line.startswith("bad: ✗ MISMATCH")
    assert "3 rows too many" in line

    manifest = _with_counts(_manifest(scores), input=_manifest(scores).counts.input + 5)
    line = _reconcile_line(render_report(scores, manifest, {}))
    assert line.startswith("bad: ✗ MISMATCH") and "5 rows unaccounted for" in line


def test_reasons_table(page: str, scores: pd.DataFrame) -> None:
    manifest = _manifest(scores)
    input_n = manifest.counts.input
    expected = dict(manifest.counts.rejected)
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

    # No per-reason breakdown of the quarantine: one "quarantined" row.
    bare = _with_counts(manifest, quarantine_reasons={})
    rows = {r[0]: r for r in _table_rows(render_report(scores, bare, {}), "reasons-table")[1:]}
    assert rows["quarantined"][1] == str(N_QUARANTINED)


def test_per_source_table(page: str, scores: pd.DataFrame) -> None:
    rows = _table_rows(page, "sources-table")
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    assert header[:8] == [
        "source",
        "format",
        "input",
        "quarantined",
        "ingested",
        "selected",
        "% selected",
        "rejected",
    ]
    col = {name: i for i, name in enumerate(header)}
    assert set(body) == set(SOURCES)
    manifest = _manifest(scores)
    inputs = {s.source: s.rows for s in manifest.sources}
    for source, group in scores.groupby("source"):
        row = body[source]
        assert row[col["input"]] == f"{inputs[source]:,}"
        assert row[col["ingested"]] == f"{len(group):,}"
        assert row[col["selected"]] == f"{int(group['selected'].sum()):,}"
        assert row[col["rejected"]] == f"{int((~group['selected']).sum()):,}"
        n_dup = int((group["reason"] == "exact_duplicate").sum())
        assert row[col["rejected: exact_duplicate"]] == f"{n_dup:,}"
        assert row[col["quarantined"]] == str(QUARANTINE_BY_SOURCE.get(source, 0))
    assert body["data/alpaca.json"][col["format"]] == "json:alpaca"
    assert body[EVIL_SOURCE][col["format"]] == "jsonl"

    # Input rows are the manifest's; a disagreement with the scores table is pointed out.
    sources = [s.model_copy(update={"rows": 10_000}) for s in manifest.sources[:1]]
    changed = manifest.model_copy(update={"sources": sources + manifest.sources[1:]})
    other = render_report(scores, changed, {})
    row = {r[0]: r for r in _table_rows(other, "sources-table")[1:]}[SOURCES[0]]
    assert row[col["input"]] == "10,000"
    assert "the manifest has 10,000 input rows" in html.unescape(other)


def test_sources_without_manifest_summaries(scores: pd.DataFrame) -> None:
    manifest = _manifest(scores).model_copy(update={"sources": []})
    rows = _table_rows(render_report(scores, manifest, {}), "sources-table")
    assert rows[0][:3] == ["source", "quarantined", "ingested"]
    assert {r[0] for r in rows[1:]} == set(SOURCES)


def test_warnings_plots_flags_and_details(page: str) -> None:
    warnings = re.search(r'<section class="warnbox" id="warnings">(.*?)</section>', page, re.S)
    assert warnings and "truncated JSON at byte 12345" in warnings.group(1)
    assert "1 source warning<" in warnings.group(1)
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
    assert '<details id="config">' in page and "&#34;budget&#34;: 90" in page
    assert "stage time <b>17.0 s</b>" in page
    assert "logs: <code>/runs/x/logs</code>" in page
    outputs = {r[0]: r[1] for r in _table_rows(page, "outputs-table")[1:]}
    assert outputs["report"] == "/runs/x/report.html"


def test_stage_table(page: str) -> None:
    rows = _table_rows(page, "stages-table")
    assert rows[0] == ["stage", "engine", "version", "fingerprint", "time", "run", "phases"]
    body = {r[0]: r for r in rows[1:]}
    assert body["ingest"] == [
        "ingest",
        "spark",
        "2",
        "f00dfeed",
        "12.0 s",
        "ran",
        "frame 3.2 s · parse 8.5 s",
    ]
    assert body["tokens"][1] == "ray" and body["tokens"][5] == "skipped"
    assert body["select"][1] == "driver" and body["select"][6] == ""
    assert page.index('id="stages-table"') < page.index('id="timings-table"')


def test_no_stage_table_for_older_manifests(scores: pd.DataFrame) -> None:
    manifest = _manifest(scores).model_copy(update={"stages": [], "logs": None})
    page = render_report(scores, manifest, {})
    assert 'id="stages-table"' not in page and "logs:" not in page


def test_examples_are_truncated_with_roles(page: str) -> None:
    section = page[page.index('id="examples"') :]
    assert '<span class="role">user</span>' in section
    assert '<span class="role">assistant</span>' in section
    assert "x" * 700 not in section
    assert "[+4,409 chars]" in section  # 9 + 5000 chars cut to 600
    assert escape("I'm sorry") in section
    assert 'id="examples-quarantined"' in section
    assert section.index('id="examples-kept"') < section.index('id="examples-dropped"')


def test_long_conversations_are_cut() -> None:
    conversation = [{"role": "user", "content": f"turn {i}"} for i in range(11)]
    page = render_report(None, _empty_manifest(), {"kept": [{"conversation": conversation}]})
    assert "turn 7" in page and "turn 8" not in page
    assert "… 3 more turns" in page


def test_empty_frame_renders() -> None:
    empty = _scores().iloc[0:0]
    open_before = plt.get_fignums()
    page = render_report(empty, _empty_manifest(), {})
    assert "<html" in page and "data:image/png" not in page
    assert "No numeric signal values to plot" in page
    assert "No rows dropped." in page
    assert _reconcile_line(page).startswith("ok:")
    assert 'id="sources"' not in page and 'id="examples"' not in page
    assert plt.get_fignums() == open_before

    bare = render_report(pd.DataFrame(), _empty_manifest(input=4), None)
    assert _reconcile_line(bare).startswith("bad:")


def test_odd_values(scores: pd.DataFrame) -> None:
    """Odd dtypes in the frame and odd values in the free-form parts still render."""
    odd = scores.assign(
        selected=pd.array([True, None] * (len(scores) // 2), dtype="boolean"),
        nullable_ints=pd.array([1, None, 7] * (len(scores) // 3), dtype="Int64"),
        infinite=np.full(len(scores), np.inf),
        mixed=[1, "a", None] * (len(scores) // 3),
        arrow_floats=pd.array(np.linspace(0, 5, len(scores)), dtype="float64[pyarrow]"),
    )
    odd["$math$"] = np.arange(len(scores), dtype=float)
    manifest = _manifest(scores).model_copy(
        update={
            "timings_s": {"ingest": float("nan"), "select": float("inf"), "export": 1.0},
            "selection": {"nested": {"a": [1, None]}, "none": None, "np": np.int64(3)},
            "signals": {"lm": {}, "judge": {"weird": object()}},
            "export": {"random_baseline_rows": "lots"},
        }
    )
    examples = {
        "kept": [
            {"conversation": None},
            {"conversation": ["bare string turn", {"role": None, "content": 42}]},
            {"conversation": []},
            "not a mapping",
        ],
        "dropped": "not a list",
        "other": [{"excerpt": None}],
    }
    page = render_report(odd, manifest, examples)
    timings = {r[0]: r for r in _table_rows(page, "timings-table")[1:]}
    assert timings["ingest"][1] == "–" and timings["export"][1:] == ["1.0 s", "100.0%"]
    assert "(empty conversation)" in page and "bare string turn" in page
    assert 'id="examples-other"' in page and 'id="examples-dropped"' not in page
    assert 'alt="distribution of $math$"' in page
    assert 'alt="distribution of infinite"' not in page
    # a non-integer baseline count in the manifest falls back to the scores table
    assert "random-baseline comparison subset" in page


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


def test_run_report_writes_the_page(tmp_path: Path, scores: pd.DataFrame) -> None:
    """The stage reads scores, example text and quarantine lines from a run directory."""
    run = RunDir(tmp_path / "run")
    scores.to_parquet(run.scores, index=False)
    run.records.mkdir()
    records = pa.table(
        {
            "id": scores["id"].tolist(),
            "source": scores["source"].tolist(),
            "row": scores["row"].tolist(),
            "conversation": [
                [{"role": "user", "content": f"question {i} {EVIL}"}] for i in range(len(scores))
            ],
        }
    )
    pq.write_table(records, run.records / "part-0.parquet")
    lines = [{"source": "data/alpaca.json", "row": 9, "reason": "bad_json", "excerpt": EVIL}]
    run.quarantine.write_text(
        "".join(json.dumps(line) + "\n" for line in lines * 3), encoding="utf-8"
    )
    run_report(run, _manifest(scores))
    page = run.report.read_text(encoding="utf-8")
    assert EVIL not in page and "question " in page
    assert 'id="examples-kept"' in page and 'id="examples-quarantined"' in page
    assert not list(run.root.glob("*.tmp"))
