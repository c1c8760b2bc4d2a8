"""Nightly refresh, pure parts: row keys, row diffs, selection moves, score drift, latest pointer."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.cli_refresh import run_name
from engine.refresh import (
    diff_rows,
    read_latest,
    row_keys,
    score_drift,
    selection_changes,
    set_latest,
)


def test_row_keys_prefer_unique_own_ids_else_positions() -> None:
    assert row_keys(["a", "b"], [0, 1]) == ("id", [("id", "a"), ("id", "b")])
    assert row_keys([7, 8], [0, 1]) == ("id", [("id", "7"), ("id", "8")])
    assert row_keys(["a", "a"], [0, 1])[0] == "row"  # not unique
    assert row_keys(["a", None], [3, 4]) == ("row", [("row", 3), ("row", 4)])  # one missing
    assert row_keys([True, False], [0, 1])[0] == "row"  # a flag, not an id


contents = st.dictionaries(st.integers(0, 30), st.sampled_from("abcd"), max_size=20)


@given(contents, contents)
def test_diff_rows_accounts_for_every_row(before: dict, after: dict) -> None:
    prev = {("row", k): v for k, v in before.items()}
    cur = {("row", k): v for k, v in after.items()}
    d = diff_rows(prev, cur)
    assert d["added"] + d["changed"] + d["unchanged"] == len(cur)
    assert d["removed"] + d["changed"] + d["unchanged"] == len(prev)
    assert d["changed"] == sum(1 for k in prev.keys() & cur.keys() if prev[k] != cur[k])


def test_an_edit_is_a_change_not_an_add_and_a_remove() -> None:
    prev = {("row", 0): "x", ("row", 1): "y"}
    cur = {("row", 0): "x", ("row", 1): "y2", ("row", 2): "z"}
    assert diff_rows(prev, cur) == {"added": 1, "removed": 0, "changed": 1, "unchanged": 1}


def _scores(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id", "source", "row", "ifd", "selected", "reason"])


def test_selection_moves_name_why() -> None:
    prev = _scores(
        [
            ("a", "s", 0, 0.5, True, None),
            ("b", "s", 1, 0.4, True, None),
            ("c", "s", 2, 0.3, False, "below_budget"),
            ("d", "s", 3, 0.9, True, None),
        ]
    )
    cur = _scores(
        [
            ("a", "s", 0, 0.5, True, None),
            ("b", "s", 1, 0.4, False, "below_budget"),  # outranked by the new row
            ("c", "s", 2, 0.3, True, None),  # d left: its slot went to c
            ("e", "s", 4, 0.8, True, None),  # new
        ]
    )
    moves = selection_changes(prev, cur)
    assert (moves["selected_before"], moves["selected_now"], moves["stayed"]) == (3, 3, 1)
    assert moves["entered"]["why"] == {"was rejected: below_budget": 1, "new row": 1}
    assert moves["left"]["why"] == {"now rejected: below_budget": 1, "removed from the corpus": 1}
    assert [e["id"] for e in moves["entered"]["examples"]] == ["c", "e"]


def test_score_drift_is_zero_for_equal_scores_and_names_the_column_otherwise() -> None:
    prev = _scores([("a", "s", 0, 0.5, True, None), ("b", "s", 1, math.nan, False, "x")])
    same = _scores([("b", "t", 9, math.nan, False, "y"), ("a", "t", 8, 0.5, True, None)])
    drift = score_drift(prev, same)  # order, source, row and decisions do not count
    assert drift["max_abs_diff"] == 0 and drift["rows_compared"] == 2
    assert set(drift["columns"]) == {"ifd"}
    moved = _scores([("a", "s", 0, 0.75, True, None), ("b", "s", 1, 1.0, False, "x")])
    col = score_drift(prev, moved)["columns"]["ifd"]
    assert col == {"max_abs_diff": 0.25, "rows_differing": 1, "nan_changed": 1}


def test_latest_pointer_symlink_and_file(tmp_path: Path) -> None:
    assert read_latest(tmp_path) is None
    for name in ("2026-11-01", "2026-11-02"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        set_latest(tmp_path, name)
        assert os.readlink(tmp_path / "latest") == name
        assert (tmp_path / "LATEST").read_text().strip() == name
        assert read_latest(tmp_path) == tmp_path / name
    (tmp_path / "latest").unlink()  # a filesystem without symlinks: LATEST still works
    assert read_latest(tmp_path) == tmp_path / "2026-11-02"
    assert not list(tmp_path.glob(".*"))


def test_run_name() -> None:
    assert run_name("2026-11-02", None) == "2026-11-02"
    assert run_name(None, "nightly-7") == "nightly-7"
    assert len(run_name(None, None)) == 10
    for bad in [("2026-13-01", None), (None, "../x"), (None, "latest"), ("2026-11-02", "x")]:
        with pytest.raises(ValueError):
            run_name(*bad)


def test_a_concurrent_refresh_is_kept_out_with_the_holder_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    from typer.testing import CliRunner

    from engine.cli import app

    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"inputs: [{{path: {tmp_path / 'x.jsonl'}}}]\nout: {out}\n")
    holder = subprocess.Popen(  # a refresh in progress elsewhere holds OUT's lock
        [
            sys.executable,
            "-c",
            "import sys, time; from engine.runtime.lock import run_lock\n"
            "with run_lock(sys.argv[1], 'winnow refresh job.yaml'):\n"
            " print('held', flush=True); time.sleep(30)",
            str(out),
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["refresh", str(job), "--date", "2026-11-03"])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 4, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert f"pid {holder.pid}" in said and "winnow refresh job.yaml" in said
    assert not (out / "2026-11-03").exists()  # nothing was written


def test_report_section_renders_changes_and_survives_a_damaged_file(tmp_path: Path) -> None:
    import json

    from engine.refresh import CHANGES, report_section
    from engine.report.render import environment

    assert report_section(tmp_path) is None  # not a refresh: no section
    moves = {"rows": 1, "why": {"new row": 1}, "examples": []}
    data = {
        "previous": "2026-11-01",
        "model_stages": {"lm": {"rows": 105, "cache_hits": 99, "cache_misses": 6}},
        "rows": {"added": 5, "removed": 0, "changed": 1, "unchanged": 99},
        "sources": {
            "a.jsonl": {"key": "row", "added": 5, "removed": 0, "changed": 1, "unchanged": 99}
        },
        "selection": {
            "selected_before": 30,
            "selected_now": 30,
            "stayed": 29,
            "entered": moves,
            "left": {**moves, "why": {"now rejected: x": 1}},
        },
        "score_drift": {
            "rows_compared": 99,
            "max_abs_diff": 0.5,
            "columns": {"ifd": {"max_abs_diff": 0.5, "rows_differing": 2, "nan_changed": 0}},
        },
    }
    (tmp_path / CHANGES).write_text(json.dumps(data))
    page = environment().get_template("changes.html").render(changes=report_section(tmp_path))
    text = " ".join(page.split())
    assert "Changes since 2026-11-01" in text and "now rejected: x" in text
    assert 'id="changes-drift"' in page and 'id="changes-no-drift"' not in page
    (tmp_path / CHANGES).write_text('{"previous": "x", "sources": 3}')
    page = environment().get_template("changes.html").render(changes=report_section(tmp_path))
    assert "changes.json could not be read" in page
