"""`winnow select` end to end on a real local Spark and Ray, on real data with planted bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.config import parse_job
from engine.models import resolve_tokenizer
from engine.pipeline import JobRunner
from engine.records import content_id, to_canonical
from engine.signals.tokens import TokenCounter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("spark", "ray_local")]

OUTPUTS = ("selected.jsonl", "scores.parquet", "quarantine.jsonl", "manifest.json", "report.html")
runner = CliRunner()
NO_DEDUP = {"near": {"enabled": False}, "semantic": {"enabled": False}}

# Planted bad lines: line number -> (bytes, expected quarantine reason or None for blank).
REFUSAL = "As an AI language model, I cannot help with that request."


def _planted_lines(rows: list[dict]) -> tuple[list[bytes], dict[int, str]]:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    quarantine = {
        10: (b'{"instruction": "broken', "invalid_json"),
        20: (b'{"instruction": 5, "output": "x"}', "wrong_type:instruction"),
        30: (b'{"instruction": "no output here"}', "missing_field:output"),
        40: (b'{"instruction": "bad \xff bytes", "output": "x"}', "invalid_utf8"),
        50: (b'{"instruction": "", "input": "", "output": ""}', "empty_conversation"),
        60: (json.dumps({"instruction": "big", "output": "y" * 100_000}).encode(), "too_large"),
        80: (b"[1, 2, 3]", "not_an_object"),
        90: (b'{"conversations": [{"from": "human", "value": "hi"}]}', "missing_field:instruction"),
    }
    for line, (payload, _) in quarantine.items():
        lines[line] = payload
    lines[70] = b"   "  # blank: not a row
    dup = dict(rows[5])
    lines[100] = json.dumps(dup).encode()
    spaced = {k: f"  {v}  " if isinstance(v, str) and v else v for k, v in dup.items()}
    lines[101] = json.dumps(spaced).encode()
    lines[110] = json.dumps({"instruction": "Say nothing.", "input": "", "output": "  "}).encode()
    lines[120] = json.dumps(
        {"instruction": "Write malware.", "input": "", "output": REFUSAL}
    ).encode()
    return lines, {line: reason for line, (_, reason) in quarantine.items()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict]) -> tuple[Path, dict]:
    lines, expected = _planted_lines(alpaca_rows[:1500])
    path = tmp_path_factory.mktemp("planted") / "alpaca_planted.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory, planted: tuple[Path, dict]) -> Path:
    path, _ = planted
    out = tmp_path_factory.mktemp("run") / "out"
    config = out.parent / "job.yaml"
    config.write_text("ingest: {max_record_bytes: 65536}\n", encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "select",
            str(path),
            "--out",
            str(out),
            "--budget",
            "200",
            "--signals",
            "tokens",
            "--dedup",
            "none",
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_all_outputs_written_and_counts_reconcile(planted_run: Path, planted: tuple) -> None:
    _, expected = planted
    for name in OUTPUTS:
        assert (planted_run / name).is_file(), name
    manifest = json.loads((planted_run / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == 1499  # 1500 lines, one blank
    assert counts["quarantined"] == len(expected)
    assert counts["selected"] == 200
    assert counts["rejected"]["exact_duplicate"] == 2
    assert counts["rejected"]["empty_response"] >= 1
    assert counts["rejected"]["refusal"] >= 1
    assert counts["input"] == (
        counts["quarantined"] + sum(counts["rejected"].values()) + counts["selected"]
    )
    assert manifest["sources"][0]["blank_lines"] == 1
    assert set(manifest["timings_s"]) >= {"ingest", "tokens", "select", "export", "report"}
    assert manifest["versions"]["pyspark"] and manifest["versions"]["ray"]
    assert manifest["config"]["select"]["budget"] == 200


def test_quarantine_lists_every_bad_line_with_reason(planted_run: Path, planted: tuple) -> None:
    path, expected = planted
    lines = [json.loads(x) for x in (planted_run / "quarantine.jsonl").read_text().splitlines()]
    assert {line["row"]: line["reason"] for line in lines} == expected
    assert all(line["source"] == str(path) for line in lines)
    assert all(len(line["excerpt"]) <= 300 for line in lines)


def test_scores_have_one_row_per_ingested_record(planted_run: Path, alpaca_rows: list) -> None:
    scores = pd.read_parquet(planted_run / "scores.parquet")
    assert len(scores) == 1499 - 8
    assert scores[["source", "row"]].duplicated().sum() == 0
    for column in ("assistant_chars", "mtld", "refusal", "tokens_chat", "tokens_assistant"):
        assert column in scores.columns
    assert scores["reason"].isna().sum() == scores["selected"].sum() == 200
    by_row = scores.set_index("row")["reason"]
    assert by_row[110] == "empty_response" and by_row[120] == "refusal"
    assert (scores["selected"] == scores["reason"].isna()).all()
    # The exact-duplicate rule: first occurrence by row is kept, later copies point at its id.
    original_id = content_id(to_canonical(alpaca_rows[5], "alpaca").conversation)
    copies = scores[scores["id"] == original_id].sort_values("row")
    assert copies["row"].tolist() == [5, 100, 101]
    assert copies["reason"].tolist()[1:] == ["exact_duplicate", "exact_duplicate"]
    assert copies["dup_of"].tolist()[1:] == [original_id, original_id]
    assert pd.isna(copies["dup_of"].iloc[0]) and copies["reason"].iloc[0] != "exact_duplicate"
    # Budget by the `longest` preset: every kept row is at least as long as every eligible loser.
    kept = scores[scores["selected"]]
    losers = scores[scores["reason"] == "below_budget"]
    assert kept["assistant_chars"].min() >= losers["assistant_chars"].max()
    assert scores["random_baseline"].sum() == 200
    assert not (scores["random_baseline"] & scores["reason"].isin(["exact_duplicate"])).any()


def test_ray_token_counts_match_the_tokenizer(planted_run: Path, alpaca_rows: list) -> None:
    """The Spark → Parquet → Ray → Parquet hand-off: every unique eligible id is scored correctly."""
    scores = pd.read_parquet(planted_run / "scores.parquet")
    assert scores["tokens_chat"].notna().all()
    counter = TokenCounter(resolve_tokenizer("builtin:smollm2-135m"))
    sample = [0, 1, 2, 3, 200, 1499]
    conversations = [to_canonical(alpaca_rows[i], "alpaca").conversation for i in sample]
    ids = [content_id(c) for c in conversations]
    expected = counter.count(ids, conversations).to_pandas().set_index("id")
    got = scores.set_index("id").loc[ids, ["tokens_user", "tokens_assistant", "tokens_chat"]]
    got = got[~got.index.duplicated()]
    pd.testing.assert_frame_equal(got.astype("int64"), expected.astype("int64"))
    sidecar = pq.read_table(planted_run / "signals" / "tokens").to_pandas()
    assert sidecar["id"].is_unique and len(sidecar) == scores["dup_of"].isna().sum()


def test_selected_records_keep_input_format(planted_run: Path) -> None:
    scores = pd.read_parquet(planted_run / "scores.parquet")
    lines = [json.loads(x) for x in (planted_run / "selected.jsonl").read_text().splitlines()]
    assert len(lines) == 200
    assert all(set(line) == {"id", "instruction", "input", "output"} for line in lines)
    assert {line["id"] for line in lines} == set(scores.loc[scores["selected"], "id"])
    baseline = (planted_run / "random_baseline.jsonl").read_text().splitlines()
    assert len(baseline) == 200


def test_report_shows_counts_and_escapes_text(planted_run: Path) -> None:
    page = (planted_run / "report.html").read_text(encoding="utf-8")
    assert "exact_duplicate" in page and "invalid_utf8" in page
    assert "data:image/png;base64," in page


def test_rerun_resumes_and_changed_budget_redoes_selection(
    planted_run: Path, planted: tuple
) -> None:
    path, _ = planted
    before = pd.read_parquet(planted_run / "scores.parquet")
    args = [
        "select",
        str(path),
        "--out",
        str(planted_run),
        "--signals",
        "tokens",
        "--dedup",
        "none",
        "--config",
        str(planted_run.parent / "job.yaml"),
    ]
    result = runner.invoke(app, [*args, "--budget", "200"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((planted_run / "manifest.json").read_text())
    assert manifest["skipped_stages"] == ["ingest", "tokens", "select", "export"]
    pd.testing.assert_frame_equal(before, pd.read_parquet(planted_run / "scores.parquet"))

    result = runner.invoke(app, [*args, "--budget", "0.1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((planted_run / "manifest.json").read_text())
    assert manifest["skipped_stages"] == ["ingest", "tokens"]
    assert manifest["counts"]["selected"] == manifest["selection"]["eligible"] // 10

    result = runner.invoke(app, [*args, "--budget", "200", "--force"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((planted_run / "manifest.json").read_text())
    assert manifest["skipped_stages"] == []
    after = pd.read_parquet(planted_run / "scores.parquet")
    pd.testing.assert_frame_equal(before, after)


def test_multi_source_formats_and_cross_source_duplicates(
    tmp_path: Path, alpaca_rows: list, dolly_rows: list, shared_data: Path
) -> None:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(alpaca_rows[:400]), encoding="utf-8")
    dolly = [dict(r) for r in dolly_rows[:300]]
    dolly[7] = dict(alpaca_rows[3])  # same content as an alpaca row: the alpaca one is first
    dolly_path = tmp_path / "dolly.jsonl"
    dolly_path.write_text("\n".join(json.dumps(r) for r in dolly), encoding="utf-8")
    messages = tmp_path / "chat.jsonl"
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer number {i}. " * (i % 5 + 1)},
            ]
        }
        for i in range(50)
    ]
    messages.write_text("\n".join(json.dumps(c) for c in chats), encoding="utf-8")
    sharegpt = tmp_path / "sharegpt.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "id": f"s{i}",
                    "conversations": [
                        {"from": "human", "value": f"hi {i}"},
                        {"from": "gpt", "value": f"hello {i}"},
                        {"from": "human", "value": "more"},
                        {"from": "gpt", "value": f"sure {i}"},
                    ],
                }
                for i in range(30)
            ]
        ),
        sharegpt,
    )
    job = parse_job(
        {
            "inputs": [{"path": str(p)} for p in (alpaca, dolly_path, messages, sharegpt)],
            "select": {"preset": "random", "budget": 0.5, "dedup": NO_DEDUP},
        }
    )
    manifest = JobRunner(job, tmp_path / "out").execute().model_dump(mode="json", by_alias=True)
    schemas = [s["schema"] for s in manifest["sources"]]
    assert schemas == ["alpaca", "alpaca", "messages", "sharegpt"]
    assert manifest["counts"]["input"] == 400 + 300 + 50 + 30
    assert manifest["counts"]["rejected"]["exact_duplicate"] == 1
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    dup = scores[(scores["source"] == str(dolly_path)) & (scores["row"] == 7)].iloc[0]
    assert dup["reason"] == "exact_duplicate"
    assert scores.loc[scores["source"] == str(sharegpt), "turns"].eq(2).all()
    assert "tokens_chat" not in scores.columns  # not requested
    eligible = manifest["selection"]["eligible"]
    assert manifest["counts"]["selected"] == eligible // 2
    # `random` preset and the random baseline are different seeded draws of the same size.
    assert scores["random_baseline"].sum() == scores["selected"].sum()
    assert (scores["random_baseline"] != scores["selected"]).any()
    selected = (tmp_path / "out" / "selected.jsonl").read_text().splitlines()
    sharegpt_lines = [json.loads(x) for x in selected if '"conversations"' in x]
    assert all(line["source_id"].startswith("s") for line in sharegpt_lines)


def test_builtin_sharegpt_sampled_and_truncation_reported(tmp_path: Path) -> None:
    job = parse_job(
        {
            "inputs": [{"path": "builtin:sharegpt"}],
            "ingest": {"sample": {"fraction": 0.05, "max_rows": 300}},
            "select": {"budget": 50},
        }
    )
    manifest = JobRunner(job, tmp_path / "out").execute().model_dump(mode="json", by_alias=True)
    assert manifest["sampling"]["kept_rows"] == manifest["counts"]["input"] == 300
    assert manifest["sampling"]["framed_rows"] > 17_000
    warnings = manifest["sources"][0]["warnings"]
    assert any("truncated JSON array" in w and "byte 125506645" in w for w in warnings)
    assert manifest["sources"][0]["schema"] == "sharegpt"
    assert manifest["counts"]["selected"] == 50


def test_truncated_json_input_quarantines_the_cut_record(tmp_path: Path, alpaca_rows: list) -> None:
    text = json.dumps(alpaca_rows[:120])
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) - 40], encoding="utf-8")
    result = runner.invoke(
        app, ["select", str(path), "--out", str(tmp_path / "out"), "--dedup", "none"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 120
    assert manifest["counts"]["quarantine_reasons"] == {"truncated_record": 1}
    assert "truncated JSON array" in manifest["sources"][0]["warnings"][0]


def test_empty_input_and_unplaceable_pool_fail_cleanly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    result = runner.invoke(app, ["select", str(empty), "--out", str(tmp_path / "a")])
    assert result.exit_code == 3 and "hold no records" in result.output

    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    config = tmp_path / "job.yaml"
    config.write_text(
        "stages: {tokens: {resources: {num_cpus: 1, concurrency: 4}}}\n", encoding="utf-8"
    )
    out = tmp_path / "b"
    result = runner.invoke(
        app,
        ["select", str(good), "--out", str(out), "--signals", "tokens", "--config", str(config)],
    )
    assert result.exit_code == 2 and "stages.tokens" in result.output
    assert not (out / "records").exists()  # refused before any work


def test_all_rows_quarantined_still_reconciles(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": 1}\nnot json\n[]\n', encoding="utf-8")
    result = runner.invoke(
        app, ["select", str(bad), "--out", str(tmp_path / "o"), "--signals", "tokens"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["counts"] == {
        "input": 3,
        "quarantined": 3,
        "rejected": {},
        "selected": 0,
        "quarantine_reasons": {"invalid_json": 1, "not_an_object": 1, "unknown_schema": 1},
    }
    assert (tmp_path / "o" / "selected.jsonl").read_text() == ""
    assert len(pd.read_parquet(tmp_path / "o" / "scores.parquet")) == 0


def test_edited_input_or_missing_output_reruns_stages(tmp_path: Path, alpaca_rows: list) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in alpaca_rows[:100]), encoding="utf-8")
    args = ["select", str(path), "--out", str(tmp_path / "o"), "--budget", "10", "--dedup", "none"]
    assert runner.invoke(app, args).exit_code == 0
    selected = (tmp_path / "o" / "selected.jsonl").read_text()
    (tmp_path / "o" / "scores.parquet").unlink()
    assert runner.invoke(app, args).exit_code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    # select re-runs to restore its output, and export, which reads select's, re-runs with it: a
    # redone stage is never assumed to reproduce its old output (another machine's dtype can move
    # scores), so nothing downstream of it is trusted either.
    assert manifest["skipped_stages"] == ["ingest"]
    assert (tmp_path / "o" / "scores.parquet").is_file()
    assert (tmp_path / "o" / "selected.jsonl").read_text() == selected
    (tmp_path / "o" / "selected.jsonl").unlink()
    assert runner.invoke(app, args).exit_code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["skipped_stages"] == ["ingest", "select"]
    assert (tmp_path / "o" / "selected.jsonl").read_text() == selected
    path.write_text("\n".join(json.dumps(r) for r in alpaca_rows[:120]), encoding="utf-8")
    assert runner.invoke(app, args).exit_code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["skipped_stages"] == [] and manifest["counts"]["input"] == 120
