"""A report that corpus text cannot script, proven in a real Chromium on a REAL run's report.

`winnow select` (in process, on the session's real Spark and Ray, no model signal, random preset)
runs on small JSONL files whose instruction, input and response carry every payload below, whose
file names carry the payloads that hold no `/`, and one of whose lines is malformed so its raw
excerpt reaches the quarantine examples. The budget keeps half the rows, so the report shows kept
and rejected examples. Rejection reasons and language codes cannot be chosen by the corpus in a
real run (reasons match `^[a-z][a-z0-9_:.-]*$`, codes come from the language model), so a second
page is rendered by `render_report` from that run's manifest and scores with hostile `reason` and
`lang` columns added.

Each page is loaded by one headless Chromium process with `--dump-dom --enable-logging=stderr
--v=0`: the dumped DOM's `<title>` must be the report's own, the page must log no console message
and no uncaught error. A positive-control page that does run a script shows both kinds of trace
in the same capture, so the checks can fail.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.manifest import Manifest
from engine.report import render_report
from engine.stages.report import gather_examples
from tests.test_report_browser import CHROMIUM, Node, _chromium, _parse

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("spark", "ray_local"),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is absent (Debian package chromium; `make install` installs it)",
    ),
]

runner = CliRunner()
LOGGING = ("--dump-dom", "--enable-logging=stderr", "--v=0")
# Bidirectional overrides, embeddings and isolates: raw, any of them reorders the text after it.
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
PAYLOADS: tuple[str, ...] = (
    "<script>document.title='pwned';console.log('xss-log');console.error('xss-err')</script>",
    "</textarea><script>document.title='pwned-textarea'</script>",
    "</script><script>console.log('xss-breakout')</script>",
    "<img src=x onerror=\"document.title='pwned-img';console.log('xss-img')\">",
    '" autofocus onfocus="document.title=\'pwned-focus\'" x="',
    "<a href=\"javascript:console.log('xss-link')\">click</a>",
    "<svg onload=\"console.log('xss-svg')\"></svg>",
    "<svg><script>console.log('xss-svg-script')</script></svg>",
    "<iframe srcdoc=\"<script>parent.document.title='pwned-iframe'</script>\"></iframe>",
    '<meta http-equiv="refresh" content="0;url=javascript:console.log(\'xss-meta\')">',
    '<div style="width:expression(alert(1));background:url(javascript:console.log(1))">css</div>',
    "{{ 'tpl-' ~ 'ran' }} {% if true %}jinja-ran{% endif %} {{ config }}",
    f"bidi {BIDI[4]}exe.txt {BIDI[6]}gpj.{BIDI[8]} {BIDI[0]}{BIDI[1]}{BIDI[2]}{BIDI[3]}{BIDI[5]}"
    f"{BIDI[7]} end",
)
HOSTILE = " ".join(PAYLOADS)
# A file name cannot hold `/`: the payloads without one make up the source names.
NAME_PAYLOADS = tuple(p for p in PAYLOADS if "/" not in p)
# The report shows 5 kept rows and 2 per rejection reason (random preset: one reason), so with 7
# rows every row is shown and each payload opens some shown instruction, input and response.
ROWS = 7
BUDGET = 5


def shown(text: str) -> str:
    """`text` as the page shows it: bidi controls as visible `\\uXXXX` escapes."""
    return text.translate({ord(c): f"\\u{ord(c):04x}" for c in BIDI})


@dataclass
class Page:
    dom: Node
    comments: list[str]
    log: str
    seconds: float


def _load(tmp: Path, page: Path) -> Page:
    """One Chromium process: the DOM after load and everything the browser logged."""
    start = time.monotonic()
    done = _chromium(tmp, page.as_uri(), *LOGGING)
    dom, comments = _parse(done.stdout.decode("utf-8"))
    log = done.stderr.decode("utf-8", "replace")
    return Page(dom, comments, log, time.monotonic() - start)


def _console(log: str) -> list[str]:
    """The page's console messages in Chromium's stderr log (`...:INFO:CONSOLE:1] "msg"`;
    older builds write `CONSOLE(1)`)."""
    return [line for line in log.splitlines() if re.search(r"CONSOLE[:(]", line)]


def _rotated(start: int) -> str:
    """All payloads, starting at payload `start`: each shown row opens with different ones."""
    n = len(PAYLOADS)
    return " ".join(PAYLOADS[(start + k) % n] for k in range(n))


def _row(i: int) -> dict[str, str]:
    """Odd rows carry the payloads in the instruction, even rows in the input (the user turn is
    `instruction\n\ninput`, cut at 600 characters in the report), every row in the response."""
    payloads = _rotated(2 * i)
    return {
        "instruction": f"Row {i}. {payloads}" if i % 2 else f"Row {i}.",
        "input": f"Row {i}." if i % 2 else payloads,
        "output": f"Answer {i}: {_rotated(2 * i + 7)}",
    }


def lang_code(i: int) -> str:
    """A hostile language code for row i: together the rows carry every payload."""
    return " ".join(PAYLOADS[i::ROWS])


@dataclass
class Run:
    out: Path
    manifest: Manifest
    names: list[str]
    pages: dict[str, Page]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The real run, its report and the render_report variant, each loaded once."""
    tmp = tmp_path_factory.mktemp("xss")
    data = tmp / "data"
    data.mkdir()
    names = []
    for k, payload in enumerate(NAME_PAYLOADS):
        path = data / f"{k} {payload}.jsonl"
        lines = [_row(i) for i in range(k, ROWS, len(NAME_PAYLOADS))]
        lines = [json.dumps(row, ensure_ascii=False) for row in lines]
        if k == 0:
            lines.append('{"instruction": "broken ' + HOSTILE)  # malformed: quarantined
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        names.append(str(path))
    out = tmp / "out"
    args = ["select", *names, "--out", str(out), "--select", "random", "--budget", str(BUDGET)]
    result = runner.invoke(app, [*args, "--dedup", "none"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.model_validate_json((out / "manifest.json").read_text(encoding="utf-8"))

    # The variant: the same run's manifest, scores and examples, with hostile reason and lang.
    scores = pd.read_parquet(out / "scores.parquet")
    scores["lang"] = [lang_code(i) for i in range(len(scores))]
    hostile_reason = f"custom:{HOSTILE}"
    scores.loc[~scores["selected"], "reason"] = hostile_reason
    rejected = int((~scores["selected"]).sum())
    variant = manifest.model_copy(
        update={
            "counts": manifest.counts.model_copy(update={"rejected": {hostile_reason: rejected}})
        }
    )
    from engine.runtime.rundir import RunDir

    examples = gather_examples(RunDir(out), scores, None)
    rendered = tmp / "variant.html"
    rendered.write_text(render_report(scores, variant, examples), encoding="utf-8")

    control = tmp / "control.html"
    control.write_text(
        "<!DOCTYPE html><title>safe</title><script>document.title='pwned';"
        "console.log('control-log')</script><script>undefinedFunction()</script>",
        encoding="utf-8",
    )
    pages = {
        "control": _load(tmp, control),
        "report": _load(tmp, out / "report.html"),
        "variant": _load(tmp, rendered),
    }
    yield Run(out, manifest, names, pages)


def test_capture_sees_a_script_that_runs(run: Run) -> None:
    """Positive control: the same capture shows a script's title change, log and error."""
    page = run.pages["control"]
    assert [t.text for t in page.dom.find_all("title")] == ["pwned"]
    assert any("control-log" in line for line in _console(page.log))
    assert "Uncaught" in page.log


def test_real_run_report_shows_kept_and_rejected_payload_rows(run: Run) -> None:
    counts = run.manifest.counts
    assert counts.selected == BUDGET and sum(counts.rejected.values()) == ROWS - BUDGET
    assert counts.quarantined == 1
    dom = run.pages["report"].dom
    headings = [h.text for h in dom.by_id("examples").find_all("h3")]
    assert [h.split(" (")[0] for h in headings] == ["kept", "dropped", "quarantined"]
    examples = dom.by_id("examples").find_all("div", "ex")
    kept = [e for e in examples if "reason" not in e.find_all("div", "hdr")[0].text]
    assert len(examples) > len(kept) > 0


@pytest.mark.parametrize("name", ["report", "variant"])
def test_nothing_ran(run: Run, name: str) -> None:
    page = run.pages[name]
    titles = [t.text for t in page.dom.find_all("title")]
    assert titles == [f"Winnow report — {run.manifest.run_id}"], titles
    assert not _console(page.log), _console(page.log)
    assert "Uncaught" not in page.log
    assert not page.comments
    elements = list(page.dom.iter())
    assert not page.dom.find_all("script")
    for tag in ("a", "svg", "iframe", "meta", "textarea", "object", "embed", "form", "base"):
        found = [n for n in page.dom.find_all(tag) if tag != "meta" or n.attr("http-equiv")]
        assert not found, tag
    handlers = [(n.tag, a) for n in elements for a, _ in n.attrs if a.startswith("on")]
    assert not handlers
    assert not [n for n in elements if n.attr("autofocus") is not None or n.attr("srcdoc")]
    styles = [n.attr("style") or "" for n in elements]
    assert not [s for s in styles if "expression" in s or "javascript" in s]
    assert all(
        (i.attr("src") or "").startswith("data:image/png;base64,")
        for i in elements
        if i.tag == "img"
    )
    body = page.dom.find_all("body")[0].text
    assert "jinja-ran" not in body.replace("{% if true %}jinja-ran{% endif %}", "")
    assert "{{ 'tpl-' ~ 'ran' }}" in body and "tpl-ran" not in body


def _records(out: Path) -> dict[str, list[dict]]:
    """The run's conversations by id, as ingest stored them."""
    table = ds.dataset(str(out / "records"), format="parquet").to_table(
        columns=["id", "conversation"]
    )
    return dict(zip(table["id"].to_pylist(), table["conversation"].to_pylist(), strict=True))


def _cut(text: str) -> str:
    """The page's text of a turn without the report's `… [+N chars]` tail."""
    return re.sub(r"… \[\+[\d,]+ chars\]$", "", text)


@pytest.mark.parametrize("name", ["report", "variant"])
def test_payloads_come_back_as_text_in_every_field(run: Run, name: str) -> None:
    """Every example turn is its record's text, in place (cut, never altered), and each payload
    is shown in some instruction, some input, some response, some source name."""
    records = _records(run.out)
    examples = run.pages[name].dom.by_id("examples").find_all("div", "ex")
    seen: dict[str, str] = {"instruction": "", "input": "", "response": ""}
    for ex in examples[:-1]:  # the last one is the quarantined line
        header = ex.find_all("div", "hdr")[0]
        conversation = records[header.find_all("code")[0].text]
        turns = [
            (t.find_all("span", "role")[0].text, t.find_all("pre")[0].text)
            for t in ex.find_all("div", "turn")
        ]
        assert [role for role, _ in turns] == [turn["role"] for turn in conversation]
        for (role, text), turn in zip(turns, conversation, strict=True):
            assert shown(turn["content"]).startswith(_cut(text)) and len(_cut(text)) >= 500
            if role == "assistant":
                seen["response"] += text
            elif turn["content"].startswith("Row") and "\n\nRow" in turn["content"]:
                seen["instruction"] += text
            else:
                seen["input"] += text
    assert len(examples) - 1 == ROWS  # every row is shown
    for field, text in seen.items():
        for payload in PAYLOADS:
            assert shown(payload) in text, (field, payload)
    quarantined = examples[-1].find_all("pre")[0].text
    assert _cut(quarantined) and shown('{"instruction": "broken ' + HOSTILE).startswith(
        _cut(quarantined)
    )
    dom = run.pages[name].dom
    sources = [row.find_all("td")[0].text for row in dom.by_id("sources-table").find_all("tr")[1:]]
    assert sorted(sources) == sorted(shown(n) for n in run.names)


def test_variant_shows_reason_and_language_as_text(run: Run) -> None:
    dom = run.pages["variant"].dom
    reasons = [r.find_all("td")[0].text for r in dom.by_id("reasons-table").find_all("tr")[1:]]
    assert shown(f"custom:{HOSTILE}") in reasons
    dropped = [h.text for h in dom.by_id("examples").find_all("div", "hdr")]
    assert any(shown(f"custom:{HOSTILE}") in h for h in dropped)
    langs = {r.find_all("td")[0].text for r in dom.by_id("languages-table").find_all("tr")[1:]}
    assert {shown(lang_code(i)) for i in range(ROWS)} <= langs


@pytest.mark.parametrize("name", ["report", "variant"])
def test_bidi_controls_are_shown_neutralised(run: Run, name: str) -> None:
    """No raw override or isolate reaches the page, so none can reorder the text around it."""
    text = run.pages[name].dom.find_all("html")[0].text
    assert not [c for c in BIDI if c in text]
    assert "\\u202eexe.txt" in text and "\\u2067gpj.\\u2069" in text
    for c in BIDI:
        assert f"\\u{ord(c):04x}" in text, repr(c)


def test_chromium_budget(run: Run) -> None:
    """One process per check, all within the minute the brief allows."""
    assert sum(p.seconds for p in run.pages.values()) <= 60
