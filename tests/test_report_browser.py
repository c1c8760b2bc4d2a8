"""The run report in a real browser: headless Chromium loads a `report.html` full of hostile text.

tests/test_report.py checks the HTML string; this checks what a browser builds from it. The page
is rendered from a manifest, scores frame and example rows whose corpus text (conversations,
source names, a rejection reason, config values, the run id) is hostile markup, template syntax,
control bytes and a right-to-left override. Chromium loads it from a file:// URL twice: once with
`--dump-dom` (the DOM after load, so anything a script had done would show) and once with
`--screenshot`. The DOM must hold no script, no event handler, no link and no comment, and every
hostile string must come back as the same text, in place.

Needs Debian's chromium (/usr/bin/chromium; `make install` puts it there).
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from engine.manifest import Manifest
from engine.report import render_report
from tests.test_report import EVIL_SOURCE, _manifest, _scores

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT_S = 60
# Run as root in a closed network: no sandbox, no GPU, and nothing that phones home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WINDOW = (1280, 4000)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is absent (Debian package chromium; `make install` installs it)",
    ),
]

PWNED_SCRIPT = "<script>document.title='pwned'</script>"
CONTROLS = "nul\x00 bel\x07 esc\x1b[31m del\x7f"
RLO = "\u202e"
# Each piece as written into the corpus and as the page must show it (control bytes made visible).
PIECES: tuple[tuple[str, str], ...] = (
    (PWNED_SCRIPT, PWNED_SCRIPT),
    ("<!--", "<!--"),  # early: unescaped, it would swallow everything after it
    ("<img src=x onerror=\"document.title='pwned'\">",) * 2,
    ("</textarea><script>alert(1)</script>",) * 2,
    ('<a href="javascript:alert(1)">javascript:alert(1)</a>',) * 2,
    ("{{ 7*7 }}", "{{ 7*7 }}"),
    ("{% raw %}", "{% raw %}"),
    (CONTROLS, "nul\\x00 bel\\x07 esc\\x1b[31m del\\x7f"),
    (f"{RLO}exe.txt", "\\u202eexe.txt"),  # a bidi override would reverse the page's own text
)
HOSTILE = " ".join(raw for raw, _ in PIECES)
HOSTILE_SHOWN = " ".join(shown for _, shown in PIECES)
HOSTILE_SOURCE = f"data/{HOSTILE}.jsonl"
HOSTILE_REASON = f"custom:{HOSTILE}"
RUN_ID = f"run-7 </title>{PWNED_SCRIPT}"
EXPECTED_TITLE = f"Winnow report — {RUN_ID}"
SECTIONS = {"warnings", "counts", "selection", "reasons", "sources", "distributions", "flags"}
SECTIONS |= {"examples", "run"}


def shown(text: str) -> str:
    """`text` as the page shows it: the control bytes used here as visible escapes."""
    visible = {c: f"\\x{c:02x}" for c in (0x00, 0x07, 0x1B, 0x7F)}
    return text.translate({**visible, 0x202E: "\\u202e"})


# --- the page -------------------------------------------------------------------------------


def _hostile_inputs() -> tuple[pd.DataFrame, Manifest, dict[str, list[dict[str, Any]]]]:
    """tests/test_report.py's frame and manifest, with hostile source, reason, config and id."""
    scores = _scores()
    scores["reason"] = scores["reason"].replace("refusal", HOSTILE_REASON)
    manifest = _manifest(scores)  # its counts reconcile, the hostile reason among them
    scores["source"] = scores["source"].replace(EVIL_SOURCE, HOSTILE_SOURCE)
    sources = [
        s.model_copy(update={"source": HOSTILE_SOURCE, "warnings": [f"odd line: {HOSTILE}"]})
        if s.source == EVIL_SOURCE
        else s
        for s in manifest.sources
    ]
    manifest = manifest.model_copy(
        update={
            "run_id": RUN_ID,
            "command": f"winnow select --input '{HOSTILE_SOURCE}'",
            "config": {"selection": {"preset": "longest", "note": HOSTILE}, "budget": 90},
            "signals": {"tokens": {"rows": len(scores), "note": HOSTILE}},
            "sources": sources,
        }
    )
    examples = {
        "kept": [
            {
                "id": "id-1",
                "source": HOSTILE_SOURCE,
                "row": 1,
                "conversation": [
                    {"role": "user", "content": HOSTILE},
                    {"role": "assistant", "content": f"Sure: {HOSTILE}"},
                ],
            }
        ],
        "dropped": [
            {
                "id": "id-2",
                "source": "data/alpaca.json",
                "row": 2,
                "reason": HOSTILE_REASON,
                "conversation": [{"role": "user", "content": "hi"}],
            }
        ],
        "quarantined": [
            {"source": HOSTILE_SOURCE, "row": 9, "reason": "bad_json", "excerpt": HOSTILE}
        ],
    }
    return scores, manifest, examples


# --- the browser ----------------------------------------------------------------------------


def _chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run headless Chromium once on `url` with a fresh profile; fail with its stderr."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    done = subprocess.run(command, capture_output=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
    tail = done.stderr.decode("utf-8", "replace")[-3000:]
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{tail}"
    return done


VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


@dataclass
class Node:
    """An element of the DOM Chromium serialised: tag, attributes (in order) and children."""

    tag: str
    attrs: list[tuple[str, str | None]]
    children: list[Node | str] = field(default_factory=list)

    def attr(self, name: str) -> str | None:
        return dict(self.attrs).get(name)

    @property
    def classes(self) -> list[str]:
        return (self.attr("class") or "").split()

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and (cls is None or cls in n.classes)]

    def by_id(self, element_id: str) -> Node:
        found = [n for n in self.iter() if n.attr("id") == element_id]
        assert len(found) == 1, f"{len(found)} elements with id {element_id!r}"
        return found[0]

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)


class _TreeBuilder(HTMLParser):
    """Chromium's `--dump-dom` output (serialised DOM: every non-void element closed) as Nodes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", [])
        self.stack = [self.root]
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)


def _parse(dom: str) -> tuple[Node, list[str]]:
    builder = _TreeBuilder()
    builder.feed(dom)
    builder.close()
    return builder.root, builder.comments


@dataclass
class Loaded:
    manifest: Manifest
    dom: Node
    comments: list[str]
    screenshot: Path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    tmp = tmp_path_factory.mktemp("report-browser")
    scores, manifest, examples = _hostile_inputs()
    report = tmp / "report.html"
    report.write_text(render_report(scores, manifest, examples), encoding="utf-8")
    url = report.as_uri()
    dom = _chromium(tmp, url, "--dump-dom").stdout.decode("utf-8")
    screenshot = tmp / "page.png"
    _chromium(tmp, url, f"--screenshot={screenshot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    root, comments = _parse(dom)
    return Loaded(manifest, root, comments, screenshot)


# --- the checks -----------------------------------------------------------------------------


def test_harness_sees_scripts_that_run(tmp_path: Path) -> None:
    """Control: on a page that does run a script, the dumped DOM shows its effect."""
    page = tmp_path / "control.html"
    page.write_text(f"<!DOCTYPE html><title>safe</title>{PWNED_SCRIPT}", encoding="utf-8")
    root, _ = _parse(_chromium(tmp_path, page.as_uri(), "--dump-dom").stdout.decode("utf-8"))
    assert [t.text for t in root.find_all("title")] == ["pwned"]
    assert len(root.find_all("script")) == 1


def test_title_is_the_reports_own(loaded: Loaded) -> None:
    titles = loaded.dom.find_all("title")
    assert [t.text for t in titles] == [EXPECTED_TITLE]  # the run id as text, nothing ran
    assert [h.text for h in loaded.dom.find_all("h1")] == [f"Winnow run report: {RUN_ID}"]


def test_dom_has_no_active_content(loaded: Loaded) -> None:
    elements = list(loaded.dom.iter())
    assert len(elements) > 300  # the whole page was parsed, not a stub
    assert not loaded.dom.find_all("script")
    assert not loaded.comments  # `<!--` in corpus text did not open a comment
    handlers = [(n.tag, name) for n in elements for name, _ in n.attrs if name.startswith("on")]
    assert not handlers
    for tag in ("a", "textarea", "iframe", "object", "embed", "form", "base", "link"):
        assert not loaded.dom.find_all(tag), tag
    images = loaded.dom.find_all("img")
    assert images and all(
        (i.attr("src") or "").startswith("data:image/png;base64,") for i in images
    )
    assert all(n.attr("href") is None for n in elements)
    # structure survived: every section is there, once, and the page ends with the run details
    sections = [s.attr("id") for s in loaded.dom.find_all("section")]
    assert sorted(sections, key=str) == sorted(SECTIONS)
    assert sections[-1] == "run" and loaded.dom.by_id("config").tag == "details"


def test_hostile_text_comes_back_as_text(loaded: Loaded) -> None:
    dom = loaded.dom
    kept = dom.by_id("examples").find_all("div", "ex")[0]
    header = kept.find_all("div", "hdr")[0]
    assert HOSTILE_SHOWN + ".jsonl" in header.text  # the source name
    turns = [
        (turn.find_all("span", "role")[0].text, turn.find_all("pre")[0].text)
        for turn in kept.find_all("div", "turn")
    ]
    # exactly the corpus text: nothing evaluated ({{ 7*7 }} is not 49), dropped or added
    assert turns == [("user", HOSTILE_SHOWN), ("assistant", f"Sure: {HOSTILE_SHOWN}")]
    quarantined = dom.by_id("examples").find_all("div", "ex")[-1]
    assert [p.text for p in quarantined.find_all("pre")] == [HOSTILE_SHOWN]

    sources = [row.find_all("td")[0].text for row in dom.by_id("sources-table").find_all("tr")[1:]]
    assert f"data/{HOSTILE_SHOWN}.jsonl" in sources
    warnings = dom.by_id("warnings").text
    assert f"data/{HOSTILE_SHOWN}.jsonl" in warnings and f"odd line: {HOSTILE_SHOWN}" in warnings
    # config is shown as JSON (quotes and control bytes JSON-escaped): check the other pieces
    config = dom.by_id("config").text
    for raw, text in PIECES:
        if '"' not in raw and raw != CONTROLS:
            assert text in config, raw
    assert f"winnow select --input '{shown(HOSTILE_SOURCE)}'" in dom.text
    everywhere = dom.find_all("body")[0].text
    for _, text in PIECES:
        assert everywhere.count(text) >= 5, text
    for raw in (RLO, "\x00", "\x1b"):
        assert raw not in everywhere, repr(raw)


def test_headline_counts_are_the_manifests(loaded: Loaded) -> None:
    counts = loaded.manifest.counts
    cards = {
        card.find_all("div", "k")[0].text: card.find_all("div", "v")[0].text
        for card in loaded.dom.find_all("div", "card")
    }
    assert cards == {
        "input rows": f"{counts.input:,}",
        "quarantined": f"{counts.quarantined:,}",
        "rejected": f"{counts.total_rejected:,}",
        "selected": f"{counts.selected:,}",
    }
    reconcile = loaded.dom.by_id("reconcile")
    assert "ok" in reconcile.classes and reconcile.text.startswith("✓ OK")
    assert f"input {counts.input:,}" in reconcile.text

    rows = loaded.dom.by_id("reasons-table").find_all("tr")
    assert [th.text for th in rows[0].find_all("th")][:2] == ["reason", "rows"]
    by_reason = {}
    for row in rows[1:]:
        cells = [td.text for td in row.find_all("td")]
        by_reason[cells[0]] = cells[1]
    expected = {shown(reason): f"{n:,}" for reason, n in counts.rejected.items()}
    expected |= {f"quarantined:{r}": f"{n:,}" for r, n in counts.quarantine_reasons.items()}
    assert by_reason == expected
    assert shown(HOSTILE_REASON) in by_reason


def test_screenshot_is_a_full_page_png(loaded: Loaded) -> None:
    data = loaded.screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == WINDOW
    assert len(data) > 100_000  # cards, tables and plots, not a blank page


def test_evaluation_and_compare_pages_load_cleanly(tmp_path: Path) -> None:
    """A report with an Evaluation section, and compare.html: one load each, no console message
    (the control page shows the browser log does report them), no script, plots as data URIs."""
    from engine.evaluation.compare_table import build_compare, render_compare_html
    from tests.test_report_evaluation import _methods, eval_manifest, write_eval

    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><title>c</title><script>nope()</script>", encoding="utf-8")
    logging = ("--dump-dom", "--enable-logging=stderr", "--v=0")
    assert ":CONSOLE" in _chromium(tmp_path, control.as_uri(), *logging).stderr.decode()
    run = write_eval(tmp_path / "run")
    pages = {
        "evaluation": render_report(None, eval_manifest(run)),
        "methods": render_compare_html(build_compare(_methods(tmp_path / "cmp"), "random")),
    }
    for section, text in pages.items():
        page = tmp_path / f"{section}.html"
        page.write_text(text, encoding="utf-8")
        done = _chromium(tmp_path, page.as_uri(), *logging)
        assert ":CONSOLE" not in done.stderr.decode("utf-8", "replace"), section
        root, comments = _parse(done.stdout.decode("utf-8"))
        assert not root.find_all("script") and not comments
        assert root.by_id(section).tag == "section"
        images = root.find_all("img")
        assert len(images) == 2
        assert all((i.attr("src") or "").startswith("data:image/png;base64,") for i in images)
