"""Readers: container detection, framing (truncation, bad bytes, sizes) and parsing, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.parse import RAW_SCHEMA, parse_batch
from engine.readers.framing import FrameStats, frame_json_array, frame_jsonl
from engine.readers.sources import SourceError, builtin_dataset_path, frame_source, resolve_source

MB = 1 << 20


def _frame(path: Path, max_bytes: int = 4 * MB):
    stats = FrameStats()
    source = resolve_source(str(path))
    return list(frame_source(source, max_bytes, stats)), stats, source


def test_alpaca_json_array_is_read_completely(shared_data: Path, alpaca_rows: list[dict]) -> None:
    records, stats, source = _frame(shared_data / "alpaca_random_9k.json")
    assert source.container == "json"
    assert len(records) == len(alpaca_rows) == 9229
    assert all(r.error is None for r in records)
    assert [r.row for r in records[:3]] == [0, 1, 2]
    assert json.loads(records[5000].raw) == alpaca_rows[5000]
    assert stats.warnings == []


def test_dolly_file_is_read(shared_data: Path, dolly_rows: list[dict]) -> None:
    records, _, _ = _frame(shared_data / "dolly_3k.json")
    assert len(records) == len(dolly_rows) == 2996


def test_sharegpt_truncation_is_recovered_and_reported() -> None:
    path = builtin_dataset_path("builtin:sharegpt")
    records, stats, _ = _frame(path)
    data = path.read_bytes()
    # Independent check: the last element starts at the last "{" that opens a top-level record.
    cut = data.rindex(b'\n  {\n    "id"') + 3
    complete = [r for r in records if r.error is None]
    assert len(complete) >= 17_000
    assert records[-1].error == "truncated_record"
    assert records[-1].row == len(complete)
    assert len(stats.warnings) == 1 and f"byte {cut}" in stats.warnings[0]
    assert json.loads(complete[-1].raw)["conversations"]


def test_truncated_array_offset_is_exact_in_bytes(tmp_path: Path) -> None:
    items = [
        {"instruction": "naïve café", "output": "ok"},
        {"instruction": "日本", "output": "はい"},
    ]
    text = json.dumps(items, ensure_ascii=False)
    cut_text = text[: text.rindex("}")]  # drop the last closing brace and bracket
    path = tmp_path / "cut.json"
    path.write_bytes(cut_text.encode("utf-8"))
    stats = FrameStats()
    records = list(frame_json_array(path, 4 * MB, stats))
    assert [r.error for r in records] == [None, "truncated_record"]
    start_of_second = len(cut_text[: cut_text.index('{"instruction": "日本"')].encode("utf-8"))
    assert f"byte {start_of_second}" in stats.warnings[0]


def test_array_without_closing_bracket_keeps_all_records(tmp_path: Path) -> None:
    path = tmp_path / "open.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n', encoding="utf-8")
    stats = FrameStats()
    records = list(frame_json_array(path, 4 * MB, stats))
    assert [r.error for r in records] == [None]
    assert "without a closing" in stats.warnings[0]


def test_bad_elements_inside_array_are_quarantined_alone(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    deep = "[" * 100_000 + "]" * 100_000
    huge_int = "1" * 5000
    path.write_text(
        f'[{{"a": 1}}, {{"a": 2,, "b": 3}}, {{"deep": {deep}}}, {{"n": {huge_int}}}, {{"a": 4}}]',
        encoding="utf-8",
    )
    records = list(frame_json_array(path, 1 << 20, FrameStats()))
    assert [(r.row, r.error) for r in records] == [
        (0, None),
        (1, "invalid_json"),
        (2, "invalid_json"),
        (3, "invalid_json"),
        (4, None),
    ]
    assert json.loads(records[4].raw) == {"a": 4}


def test_oversize_element_does_not_swallow_the_rest(tmp_path: Path) -> None:
    good = [{"instruction": f"q{i}", "output": "a"} for i in range(60)]
    items = [json.dumps(x) for x in good[:10]]
    items.append(json.dumps({"instruction": "big", "output": "x" * (3 << 20)}))  # spans reads
    items += [json.dumps(x) for x in good[10:]]
    path = tmp_path / "big.json"
    path.write_text("[" + ",\n".join(items) + "]", encoding="utf-8")
    records = list(frame_json_array(path, 1 << 20, FrameStats()))
    assert len(records) == 61
    assert [r.row for r in records if r.error] == [10]
    assert records[10].error == "too_large"
    assert json.loads(records[60].raw) == good[59]


def test_cut_inside_a_literal_is_truncation(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('[{"a": "x"}, {"a": nul', encoding="utf-8")
    stats = FrameStats()
    records = list(frame_json_array(path, 1 << 20, stats))
    assert [r.error for r in records] == [None, "truncated_record"]
    assert "byte 13" in stats.warnings[0]


def test_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    array = tmp_path / "bom.json"
    array.write_bytes(b'\xef\xbb\xbf[\n  {"instruction": "a", "output": "b"}\n]')
    records, _, source = _frame(array)
    assert source.container == "json" and [r.error for r in records] == [None]
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n')
    records, _, _ = _frame(lines)
    assert json.loads(records[0].raw) == {"instruction": "a", "output": "b"}


def test_invalid_utf8_and_oversize_records_in_array(tmp_path: Path) -> None:
    good = b'{"instruction": "a", "output": "b"}'
    bad = b'{"instruction": "\xff\xfe", "output": "b"}'
    big = b'{"instruction": "' + b"x" * 5000 + b'", "output": "b"}'
    path = tmp_path / "mixed.json"
    path.write_bytes(b"[" + b",".join([good, bad, big, good]) + b"]")
    records = list(frame_json_array(path, 2048, FrameStats()))
    assert [r.error for r in records] == [None, "invalid_utf8", "too_large", None]
    assert "\ufffd" in records[1].excerpt
    assert len(records[2].excerpt) <= 300


def test_jsonl_rows_are_line_numbers_and_blank_lines_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"a": 2}\r\n\xc3\x28\n{"a": 3}')
    stats = FrameStats()
    records = list(frame_jsonl(path, 4 * MB, stats))
    assert [(r.row, r.error) for r in records] == [
        (0, None),
        (3, None),
        (4, "invalid_utf8"),
        (5, None),
    ]
    assert records[1].raw == '{"a": 2}'
    assert stats.blank_lines == 2


def test_json_file_holding_jsonl_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert resolve_source(str(path)).container == "jsonl"


def test_parquet_file_and_folder(tmp_path: Path, alpaca_rows: list[dict]) -> None:
    table = pa.Table.from_pylist(alpaca_rows[:300])
    pq.write_table(table, tmp_path / "one.parquet")
    records, _, source = _frame(tmp_path / "one.parquet")
    assert source.container == "parquet"
    assert len(records) == 300 and json.loads(records[7].raw) == alpaca_rows[7]
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(0, 100), folder / "a.parquet")
    pq.write_table(table.slice(100, 200), folder / "b.parquet")
    records, _, source = _frame(folder)
    assert source.container == "parquet" and len(records) == 300
    assert [r.row for r in records] == list(range(300))


def test_hf_saved_dataset_and_local_dataset_folder(tmp_path: Path, dolly_rows: list[dict]) -> None:
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(dolly_rows[:200]).save_to_disk(str(saved))
    records, _, source = _frame(saved)
    assert source.container == "hf"
    assert len(records) == 200 and json.loads(records[3].raw) == dolly_rows[3]

    folder = tmp_path / "files"
    folder.mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for row in dolly_rows[:50]:
            handle.write(json.dumps(row) + "\n")
    source = resolve_source(f"hf:{folder}#train")
    assert (source.container, source.split) == ("hf", "train")
    records = list(frame_source(source, 4 * MB, FrameStats()))
    assert len(records) == 50 and json.loads(records[49].raw) == dolly_rows[49]


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.json"))


def test_parse_batch_maps_schemas_and_quarantines(alpaca_rows: list[dict]) -> None:
    raws = [
        json.dumps(alpaca_rows[0]),
        "{not json",
        json.dumps({"instruction": 5, "output": "x"}),
        json.dumps([1, 2]),
        None,
        json.dumps(
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}
        ),
    ]
    batch = pa.RecordBatch.from_pydict(
        {
            "source_index": [0, 0, 0, 0, 0, 1],
            "row": [0, 1, 2, 3, 4, 0],
            "raw": raws,
            "error": [None, None, None, None, "too_large", None],
            "excerpt": [None, None, None, None, "xxx", None],
        },
        schema=RAW_SCHEMA,
    )
    out = parse_batch(batch, {0: "alpaca", 1: None}).to_pydict()
    assert out["status"] == ["ok", "quarantined", "quarantined", "quarantined", "quarantined", "ok"]
    assert out["reason"][1:5] == [
        "invalid_json",
        "wrong_type:instruction",
        "not_an_object",
        "too_large",
    ]
    assert out["schema"][5] == "sharegpt"
    assert out["empty_response"][5] is True and out["empty_response"][0] is False
    assert out["assistant_chars"][0] == len(alpaca_rows[0]["output"])
    assert out["assistant_chars"][1] is None


def test_parse_batch_computes_copies_once_and_keeps_their_own_indicators() -> None:
    # Byte-identical copies share one computation; a copy that differs only in line breaks has
    # the same id (normalised text) but its own indicators.
    record = {"instruction": "List two fruits.", "input": "", "output": "Apple.\nApple.\nPear."}
    variant = dict(record, output="Apple. Apple. Pear.")
    raws = [json.dumps(record), json.dumps(variant), json.dumps(record), json.dumps(variant)]
    batch = pa.RecordBatch.from_pydict(
        {
            "source_index": [0] * 4,
            "row": list(range(4)),
            "raw": raws,
            "error": [None] * 4,
            "excerpt": [None] * 4,
        },
        schema=RAW_SCHEMA,
    )
    out = parse_batch(batch, {0: "alpaca"}).to_pydict()
    assert len(set(out["id"])) == 1
    alone = [parse_batch(batch.slice(i, 1), {0: "alpaca"}).to_pylist()[0] for i in range(4)]
    assert [row["repeated_line_ratio"] for row in alone] == [1 / 3, 0.0, 1 / 3, 0.0]
    for i, row in enumerate(alone):  # repr: NaN (an unmeasured statistic) equals itself
        assert {name: repr(out[name][i]) for name in row} == {k: repr(v) for k, v in row.items()}
