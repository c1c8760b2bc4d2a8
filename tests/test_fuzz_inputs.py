"""Fuzzed inputs through the real ingest path up to Spark: never a crash, every record counted once.

The fast tests drive `engine.stages.ingest.frame_inputs` (resolve the source, frame it, sniff the
schema, write the raw Parquet shards) and then `engine.parse.parse_batch` on those shards, which
is exactly what Spark's `mapInArrow` runs per partition; the parsed batch then goes through a
Parquet round trip (what Spark writes next) and every ok row through `export_record` (what export
writes at the end), so a value that only breaks a later write is caught here too.

The accounting rule asserted for every file (`_check_accounting`):
  * framed == ok + quarantined: one parsed row per framed record, `row` unique, each quarantined
    row carries a reason of `engine.reasons` (a quarantine reason, or `missing_field:<f>` /
    `wrong_type:<f>`), each ok row an id and a non-empty conversation;
  * JSONL: a record is a line ended by `\\n` (`\\r\\n` too; a lone `\\r` is no line end, as in the
    JSON Lines spec). A line whose text (UTF-8 BOM removed on line 0) is empty after
    `str.strip()` is blank: counted in `blank_lines`, not a record. `framed` equals that count
    for ANY bytes, mutated or random;
  * JSON array: one record per top-level element; an empty slot (`[a,,b]`, `[a,]`) is no record;
  * Parquet: one record per row.
The slow test at the end runs fuzzed files of each format through the real `winnow select`.
"""

from __future__ import annotations

import codecs
import json
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import reasons
from engine.config import parse_job
from engine.parse import PARSED_SCHEMA, parse_batch
from engine.readers.sources import SourceError
from engine.records import content_id, to_canonical
from engine.runtime.rundir import RunDir
from engine.stages.export import export_record
from engine.stages.ingest import SourceReport, frame_inputs

MAX_RECORD_BYTES = 64 * 1024
BOM = codecs.BOM_UTF8
# Deterministic in CI: a fixed derivation of examples, no example database between runs.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],  # each example writes and reads real files
)


def fuzz(examples: int) -> settings:
    """The suite's settings with a per-test example count (sized to the 40 s budget)."""
    return settings(FUZZ, max_examples=examples)


# -- the real path ----------------------------------------------------------------------------


@dataclass
class Ingested:
    report: SourceReport
    rows: list[dict[str, Any]]  # parse_batch's output rows, in (row) order


def ingest(path: Path, container: str | None = None) -> Ingested:
    """Frame and parse one input as `winnow select` does, minus Spark."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"path": str(path), "format": container}
        job = parse_job(
            {"inputs": [spec], "ingest": {"shard_rows": 100, "max_record_bytes": MAX_RECORD_BYTES}}
        )
        run = RunDir(Path(tmp) / "run")
        _, reports = frame_inputs(job, run, lambda _description, _total: lambda _n: None)
        schemas = {0: reports[0].schema}
        batches = [
            parse_batch(batch, schemas)
            for shard in sorted(run.work("raw").glob("*.parquet"))
            for batch in pq.ParquetFile(shard).iter_batches()
        ]
        table = pa.Table.from_batches(batches, schema=PARSED_SCHEMA)
        # Spark writes the parsed rows as Parquet next: they must survive the round trip.
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        back = pq.read_table(pa.BufferReader(sink.getvalue()))
        assert back.num_rows == table.num_rows
        assert back.column("conversation").to_pylist() == table.column("conversation").to_pylist()
    rows = sorted(table.to_pylist(), key=lambda r: r["row"])
    return Ingested(reports[0], rows)


def _valid_reason(reason: str) -> bool:
    prefix, _, field = reason.partition(":")
    return reason in reasons.QUARANTINE_REASONS or (
        prefix in reasons.QUARANTINE_PREFIXES and bool(field)
    )


def _utf8(value: Any) -> bytes:
    """What every output file needs: strict UTF-8 (a lone surrogate raises here)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _check_accounting(result: Ingested, expected_records: int | None = None) -> None:
    rows = result.rows
    assert len(rows) == result.report.rows, "one parsed row per framed record"
    assert len({r["row"] for r in rows}) == len(rows), "each record exactly once"
    if expected_records is not None:
        assert len(rows) == expected_records
    ok = [r for r in rows if r["status"] == "ok"]
    quarantined = [r for r in rows if r["status"] == "quarantined"]
    assert len(ok) + len(quarantined) == len(rows)
    for r in quarantined:
        assert _valid_reason(r["reason"]), r["reason"]
        assert r["id"] is None and r["conversation"] is None
        _utf8({"row": r["row"], "reason": r["reason"], "excerpt": r["excerpt"]})
    for r in ok:
        assert r["reason"] is None and re.fullmatch(r"[0-9a-f]{32}", r["id"])
        assert r["conversation"] and any(turn["content"].strip() for turn in r["conversation"])
        _utf8(r["conversation"])
        export_record(r["original"], r["id"]).encode("utf-8")


def _jsonl_records(data: bytes) -> int:
    """Independent count of JSONL records: `\\n`-separated lines that are not blank."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    count = 0
    for i, line in enumerate(lines):
        text = line.decode("utf-8", "surrogateescape")
        if i == 0:
            text = text.removeprefix("\ufeff")
        count += bool(text.strip())
    return count


def _write(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


# -- strategies -------------------------------------------------------------------------------

# Never blank: a record that must be a row cannot be an empty conversation.
words = st.text(max_size=24).map(lambda s: f"w{s}")
any_text = st.text(max_size=24)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)
    ),
    max_leaves=8,
)
wrong_values = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(json_scalars, min_size=1, max_size=2),  # [] would be an empty conversation
    st.dictionaries(any_text, json_scalars, max_size=2),
)
SHAREGPT_ROLES = ("human", "gpt", "system", "user", "assistant", "chatgpt", "bard")
MESSAGE_ROLES = ("user", "assistant", "system")


def _turns(role_key: str, content_key: str, roles: tuple[str, ...]) -> st.SearchStrategy:
    turn = st.fixed_dictionaries({role_key: st.sampled_from(roles), content_key: words})
    return st.lists(turn, min_size=1, max_size=4)


RECORDS = {
    "alpaca": st.fixed_dictionaries(
        {"instruction": words, "input": any_text, "output": words},
        optional={"meta": json_values},
    ),
    "dolly": st.fixed_dictionaries(
        {"instruction": words, "context": any_text, "response": words, "category": any_text}
    ),
    "sharegpt": st.fixed_dictionaries(
        {"conversations": _turns("from", "value", SHAREGPT_ROLES)},
        optional={"id": any_text, "meta": json_values},
    ),
    "messages": st.fixed_dictionaries({"messages": _turns("role", "content", MESSAGE_ROLES)}),
}
schemas = st.sampled_from(sorted(RECORDS))


@st.composite
def files_of(draw: st.DrawFn, min_size: int = 1) -> tuple[str, list[dict]]:
    schema = draw(schemas)
    return schema, draw(st.lists(RECORDS[schema], min_size=min_size, max_size=6))


def _jsonl(records: list[Any], line_end: bytes = b"\n") -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + line_end for r in records)


def _array(records: list[Any]) -> bytes:
    return json.dumps(records, ensure_ascii=False, indent=1).encode()


# -- valid records: every one is a row, whatever the container and line ends ------------------


@fuzz(40)
@given(
    files_of(),
    st.sampled_from(["jsonl", "json", "parquet"]),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
)
def test_valid_records_all_become_rows_with_their_ids(
    file: tuple[str, list[dict]], container: str, line_end: bytes, bom: bool
) -> None:
    schema, records = file
    with tempfile.TemporaryDirectory() as tmp:
        if container == "parquet":
            path = Path(tmp) / "data.parquet"
            pq.write_table(pa.Table.from_pylist([_no_meta(r) for r in records]), path)
        else:
            data = _jsonl(records, line_end) if container == "jsonl" else _array(records)
            path = _write(tmp, f"data.{container}", (BOM if bom else b"") + data)
        result = ingest(path)
    _check_accounting(result, len(records))
    assert [r["status"] for r in result.rows] == ["ok"] * len(records)
    assert result.report.schema == schema
    # Framing changed nothing: the id read from the file is the id of the record in memory.
    expected = [content_id(to_canonical(r, schema).conversation) for r in records]
    assert [r["id"] for r in result.rows] == expected


def _no_meta(record: dict) -> dict:
    """Parquet needs one type per column: drop the free-form metadata field."""
    return {k: v for k, v in record.items() if k != "meta"}


# -- random bytes and mutated JSON: no crash, exact JSONL accounting --------------------------


@fuzz(60)
@given(st.binary(max_size=600), st.sampled_from(["jsonl", "json"]))
@example(b"\xff\xfe{\x00}\x00\n\x00", "jsonl")
@example(b"[1,]", "json")
@example(b"[,,]", "json")
@example(b"[\x0c1]", "json")
def test_random_bytes_never_crash(data: bytes, container: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(_write(tmp, f"data.{container}", data), container)
    _check_accounting(result, _jsonl_records(data) if container == "jsonl" else None)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, int, str]:
    """A valid file's bytes, then one mutation: (bytes, offset of the first change, schema)."""
    schema, records = draw(files_of(min_size=2))
    data = draw(st.sampled_from([_jsonl, _array]))(records)
    at = draw(st.integers(0, len(data) - 1))
    kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "duplicate_key"]))
    if kind == "flip":
        data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    elif kind == "cut":
        data = data[:at]
    elif kind == "insert":
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif kind == "delete":
        data = data[:at] + data[at + draw(st.integers(1, 8)) :]
    else:
        brace = data.find(b"{", at)
        if brace < 0:
            return data, len(data), schema
        at = brace
        key = draw(st.sampled_from([b"instruction", b"output", b"conversations", b"messages"]))
        value = draw(st.sampled_from([b"5", b"null", b'"x"', b"[]", b'{"a": 1}']))
        data = data[: brace + 1] + b'"' + key + b'": ' + value + b", " + data[brace + 1 :]
    return data, at, schema


@fuzz(80)
@given(mutations())
@example((b'{"instruction": "a", "output": "b", "output": "c"}\n', 0, "alpaca"))
@example((b'[{"instruction": "a", "output": "b"},]', 0, "alpaca"))
def test_mutated_json_never_crashes_and_counts_every_record(case: tuple[bytes, int, str]) -> None:
    data, at, schema = case
    container = "json" if data.lstrip(BOM + b" \t\r\n")[:1] == b"[" else "jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(_write(tmp, f"data.{container}", data), container)
    if container == "jsonl":
        _check_accounting(result, _jsonl_records(data))
        # Lines wholly before the change are untouched: still rows, same line numbers.
        intact = data[:at].count(b"\n")
        if result.report.schema == schema:  # a damaged record can win the source's schema vote
            assert all(r["status"] == "ok" for r in result.rows if r["row"] < intact)
        assert len([r for r in result.rows if r["row"] < intact]) == _jsonl_records(
            data[: data.rfind(b"\n", 0, at) + 1]
        )
    else:
        _check_accounting(result)


# -- wrong types in every field of every schema: the exact reason -----------------------------

# (schema, field to damage, required?) -- turn fields damage the first turn.
FIELDS = [
    ("alpaca", "instruction", True),
    ("alpaca", "input", False),
    ("alpaca", "output", True),
    ("dolly", "instruction", True),
    ("dolly", "context", False),
    ("dolly", "response", True),
    ("sharegpt", "conversations", True),
    ("sharegpt", "conversations.from", True),
    ("sharegpt", "conversations.value", False),
    ("sharegpt", "conversations.turn", True),
    ("messages", "messages", True),
    ("messages", "messages.role", True),
    ("messages", "messages.content", False),
    ("messages", "messages.turn", True),
]


def _damage(record: dict, field: str, value: Any, how: str) -> str | None:
    """Damage one field in place; returns the expected quarantine reason (None: still a row)."""
    top, _, sub = field.partition(".")
    target = record[top][0] if sub and sub != "turn" else record
    key = sub if sub and sub != "turn" else top
    if sub == "turn":  # the first turn is not an object at all
        record[top][0] = value if not isinstance(value, dict) else 1
        return reasons.wrong_type(top)
    if how == "delete":
        del target[key]
    else:
        target[key] = value if how == "wrong" else None
    required = dict((f, r) for _, f, r in FIELDS)[field]
    if how == "wrong":
        return reasons.wrong_type(field)
    if key == top and sub == "" and top in ("conversations", "messages"):
        # a null or missing turn list: null is the wrong type, a missing key a missing field
        return reasons.wrong_type(top) if how == "null" else reasons.missing_field(top)
    if not required:
        return None  # an optional text that is null or absent reads as ""
    return reasons.missing_field(field)


@fuzz(80)
@given(
    st.sampled_from(FIELDS),
    wrong_values,
    st.sampled_from(["wrong", "null", "delete"]),
    st.data(),
    st.sampled_from(["jsonl", "json"]),
)
def test_wrong_types_in_every_field_are_quarantined_with_the_field(
    field: tuple[str, str, bool], value: Any, how: str, data: st.DataObject, container: str
) -> None:
    schema, name, _ = field
    good = data.draw(st.lists(RECORDS[schema], min_size=2, max_size=3))  # the schema's majority
    bad = json.loads(json.dumps(data.draw(RECORDS[schema])))
    expected = _damage(bad, name, value, how)
    records = [good[0], bad, *good[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        payload = _jsonl(records) if container == "jsonl" else _array(records)
        result = ingest(_write(tmp, f"data.{container}", payload), container)
    _check_accounting(result, len(records))
    assert [r["status"] for i, r in enumerate(result.rows) if i != 1] == ["ok"] * len(good)
    if expected is None:
        # Still a row unless that emptied every turn (a damaged sole content).
        assert result.rows[1]["reason"] in (None, reasons.EMPTY_CONVERSATION)
    else:
        assert result.rows[1]["reason"] == expected


FIXED_RECORDS = {
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    "dolly": {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": ""},
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    },
    "messages": {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    },
}


@pytest.mark.parametrize("schema", sorted(FIXED_RECORDS))
def test_every_field_damaged_every_way_in_one_file(schema: str) -> None:
    """Each (field, damage) of the schema once, deterministically, between good records."""
    cases = [
        (field, how, value)
        for (owner, field, _) in FIELDS
        if owner == schema
        for how in ("wrong", "null", "delete")
        for value in (7, 1.5, True, ["x"], {"k": "v"})
    ]
    good = FIXED_RECORDS[schema]
    records, expected = [], []
    for i, (field, how, value) in enumerate(cases):
        bad = json.loads(json.dumps(good))
        want = _damage(bad, field, value, how)
        records += [json.loads(json.dumps(good).replace("Blue", f"Blue {i}")), bad]
        expected += [None, want]
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(_write(tmp, "data.jsonl", _jsonl(records)), "jsonl")
    _check_accounting(result, len(records))
    got = [r["reason"] for r in result.rows]
    assert got == expected


def test_empty_array_slots_are_not_records() -> None:
    """Found by this suite: a trailing comma (`[a,]`) or `[a,,b]` made a phantom invalid row."""
    good = json.dumps(FIXED_RECORDS["alpaca"]).encode()
    cases = [(b"[" + good + b",]", 1), (b"[" + good + b",\n ,\n" + good + b"]", 2), (b"[,]", 0)]
    for data, records in cases:
        with tempfile.TemporaryDirectory() as tmp:
            result = ingest(_write(tmp, "data.json", data), "json")
        _check_accounting(result, records)
        assert all(r["status"] == "ok" for r in result.rows)
        assert any("empty array slot" in w for w in result.report.warnings)


@fuzz(25)
@given(st.sampled_from(["sharegpt", "messages"]), st.text(max_size=12), st.data())
def test_unknown_roles_are_quarantined(schema: str, role: str, data: st.DataObject) -> None:
    from engine.records import ROLE_ALIASES

    record = data.draw(RECORDS[schema])
    key = "from" if schema == "sharegpt" else "role"
    record[schema if schema == "messages" else "conversations"][0][key] = role
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(_write(tmp, "data.jsonl", _jsonl([record])), "jsonl")
    _check_accounting(result, 1)
    known = role.strip().lower() in ROLE_ALIASES
    assert result.rows[0]["reason"] == (None if known else reasons.UNKNOWN_ROLE)


# -- hostile literals and bytes inside an otherwise valid record ------------------------------


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# literal -> (reason in a text field, reason in an extra field); None: a row.
HOSTILE: dict[bytes, tuple[str | None, str | None]] = {
    b"NaN": (reasons.wrong_type("{f}"), None),
    b"Infinity": (reasons.wrong_type("{f}"), None),
    b"-Infinity": (reasons.wrong_type("{f}"), None),
    b"1e400": (reasons.wrong_type("{f}"), None),  # float('inf') in Python
    b"9" * 4300: (reasons.wrong_type("{f}"), None),  # the longest int str() allows
    b"9" * 4301: (reasons.INVALID_JSON, reasons.INVALID_JSON),  # ValueError in int()
    b"-" + b"1" * 10_000: (reasons.INVALID_JSON, reasons.INVALID_JSON),
    _deep(50): (reasons.wrong_type("{f}"), None),
    _deep(500): (reasons.INVALID_JSON, reasons.INVALID_JSON),  # parses, export could not
    _deep(20_000): (reasons.INVALID_JSON, reasons.INVALID_JSON),  # RecursionError
    b'{"a":' * 3000 + b"1" + b"}" * 3000: (reasons.INVALID_JSON, reasons.INVALID_JSON),
    b'"nul \\u0000 escaped"': (None, None),  # valid JSON, valid UTF-8: a row
    b'"raw nul \x00 byte"': (reasons.INVALID_JSON, reasons.INVALID_JSON),  # control character
    b'"lone \\ud800 high"': (reasons.INVALID_UTF8, reasons.INVALID_UTF8),
    b'"lone \\udfff low"': (reasons.INVALID_UTF8, reasons.INVALID_UTF8),
    b'"pair \\ud83d\\ude00 ok"': (None, None),
    b'"latin-1 caf\xe9"': (reasons.INVALID_UTF8, reasons.INVALID_UTF8),
    b'"encoded surrogate \xed\xa0\x80"': (reasons.INVALID_UTF8, reasons.INVALID_UTF8),
    b'"overlong \xc0\x80"': (reasons.INVALID_UTF8, reasons.INVALID_UTF8),
    b'"bidi \xe2\x80\xae and bom \xef\xbb\xbf inside"': (None, None),
}
TEXT_FIELDS = {"alpaca": "output", "dolly": "response"}
SENTINEL = "\x01hostile\x01"  # serialised as "\u0001hostile\u0001": no generated text matches


@fuzz(60)
@given(
    st.sampled_from(sorted(HOSTILE)),
    st.sampled_from(["alpaca", "dolly"]),
    st.booleans(),
    st.sampled_from(["jsonl", "json"]),
    st.data(),
)
def test_hostile_values_are_rows_or_quarantined_with_the_right_reason(
    literal: bytes, schema: str, in_text: bool, container: str, data: st.DataObject
) -> None:
    good = data.draw(st.lists(RECORDS[schema], min_size=2, max_size=3))
    field = TEXT_FIELDS[schema] if in_text else "extra"
    bad = dict(data.draw(RECORDS[schema]), **{field: SENTINEL})
    bad_bytes = json.dumps(bad, ensure_ascii=False).encode()
    bad_bytes = bad_bytes.replace(json.dumps(SENTINEL).encode(), literal)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines.insert(1, bad_bytes)
    payload = (
        b"".join(x + b"\n" for x in lines)
        if container == "jsonl"
        else (b"[" + b",\n".join(lines) + b"]")
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(_write(tmp, f"data.{container}", payload), container)
    _check_accounting(result, len(lines))
    expected = HOSTILE[literal][0 if in_text else 1]
    got = result.rows[1]
    assert got["reason"] == (expected.format(f=field) if expected else None), got["excerpt"]
    assert [r["status"] for i, r in enumerate(result.rows) if i != 1] == ["ok"] * len(good)
    if expected is None and in_text and b"\\u0000" in literal:
        assert "\x00" in got["conversation"][-1]["content"]  # NUL is valid UTF-8: kept


# -- encodings and line ends ------------------------------------------------------------------


WIDE = {
    "utf-16-le": codecs.BOM_UTF16_LE,
    "utf-16-be": codecs.BOM_UTF16_BE,
    "utf-32-le": codecs.BOM_UTF32_LE,
    "utf-32-be": codecs.BOM_UTF32_BE,
}


@pytest.mark.parametrize("codec", sorted(WIDE))
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_utf16_and_utf32_files_are_quarantined_and_named(codec: str, container: str) -> None:
    """Windows tools write these; JSON is UTF-8 only: every line quarantined, a warning says so."""
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    text = (_jsonl(records) if container == "jsonl" else _array(records)).decode()
    data = WIDE[codec] + text.encode(codec)
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(_write(tmp, f"data.{container}", data), container)
    _check_accounting(result, _jsonl_records(data) if container == "jsonl" else None)
    assert result.rows and all(r["status"] == "quarantined" for r in result.rows)
    name = "UTF-32" if "32" in codec else "UTF-16"
    assert any(f"{name}-encoded" in w for w in result.report.warnings)


def test_lone_cr_is_not_a_line_end() -> None:
    """JSON Lines ends lines with \\n only: CR-separated records are one (invalid) record."""
    data = _jsonl([{"instruction": "a", "output": "b"}] * 3, b"\r")
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(_write(tmp, "data.jsonl", data), "jsonl")
    _check_accounting(result, 1)
    assert result.rows[0]["reason"] == reasons.INVALID_JSON


def test_number_across_the_read_boundary_stays_one_record() -> None:
    """Found by this suite: `12|345` split by the 1 MiB read became two records and the rest of
    the file one invalid row."""
    for shift in range(4):
        head = b'["' + b"x" * ((1 << 20) - 6 - shift) + b'", '  # "12345" straddles the read
        with tempfile.TemporaryDirectory() as tmp:
            result = ingest(_write(tmp, "data.json", head + b'12345, {"a": 1}, 6]'), "json")
        _check_accounting(result, 4)
        assert [r["excerpt"] for r in result.rows[1:3]] == ["12345", '{"a": 1}']
        assert result.report.warnings == []


def test_random_bytes_as_parquet_are_a_clear_source_error() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "data.parquet", b"PAR1 not really")
        with pytest.raises(SourceError, match="not a readable Parquet file"):
            ingest(path)


# -- Parquet columns of odd types where text is expected --------------------------------------


def _invalid_utf8_strings() -> pa.Array:
    """A string column holding bytes that are not UTF-8 (other writers produce these)."""
    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00")
    return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\xff\xfe")])


# name -> (Arrow array of one value, expected reason with {f} for the column; None: a row)
ODD_COLUMNS: dict[str, tuple[Callable[[], pa.Array], str | None]] = {
    "string": (lambda: pa.array(["text"]), None),
    "large_string": (lambda: pa.array(["text"], pa.large_string()), None),
    "dictionary": (lambda: pa.array(["text"]).dictionary_encode(), None),
    "binary_utf8": (lambda: pa.array([b"text"], pa.binary()), None),
    "binary_invalid": (lambda: pa.array([b"\xff\xfe"], pa.binary()), reasons.INVALID_UTF8),
    "string_invalid_utf8": (_invalid_utf8_strings, reasons.INVALID_UTF8),
    "null_type": (lambda: pa.array([None], pa.null()), reasons.missing_field("{f}")),
    "null_value": (lambda: pa.array([None], pa.string()), reasons.missing_field("{f}")),
    "int": (lambda: pa.array([7]), reasons.wrong_type("{f}")),
    "float_nan": (lambda: pa.array([float("nan")]), reasons.missing_field("{f}")),
    "float": (lambda: pa.array([1.5]), reasons.wrong_type("{f}")),
    "bool": (lambda: pa.array([True]), reasons.wrong_type("{f}")),
    "list": (lambda: pa.array([["a"]]), reasons.wrong_type("{f}")),
    "struct": (lambda: pa.array([{"x": "a"}]), reasons.wrong_type("{f}")),
    "map": (
        lambda: pa.array([[("k", "v")]], pa.map_(pa.string(), pa.string())),
        reasons.wrong_type("{f}"),
    ),
    "date_out_of_range": (
        lambda: pa.array([2**31 - 1], pa.int32()).cast(pa.date32()),
        reasons.wrong_type("{f}"),
    ),
    "timestamp": (lambda: pa.array([0], pa.timestamp("ms")), None),  # str(): a text
}


@fuzz(50)
@given(
    st.sampled_from(sorted(ODD_COLUMNS)),
    st.sampled_from(["instruction", "output"]),
    st.integers(0, 3),
    st.data(),
)
def test_parquet_columns_of_odd_types(
    kind: str, column: str, position: int, data: st.DataObject
) -> None:
    """One row holds the odd value; the other rows hold nulls of that type (missing fields)."""
    make, expected = ODD_COLUMNS[kind]
    odd = make()
    odd_column = pa.concat_arrays(
        [pa.nulls(position, odd.type), odd, pa.nulls(3 - position, odd.type)]
    )
    other = "output" if column == "instruction" else "instruction"
    text = data.draw(st.lists(words, min_size=4, max_size=4))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "odd.parquet"
        pq.write_table(pa.table({column: odd_column, other: pa.array(text)}), path)
        result = ingest(path)
    _check_accounting(result, 4)
    row = result.rows[position]
    assert row["reason"] == (expected.format(f=column) if expected else None), row["excerpt"]
    others = [r for i, r in enumerate(result.rows) if i != position]
    assert all(r["reason"] == reasons.missing_field(column) for r in others)


# -- end to end: fuzzed files of each format through the real `winnow select` -----------------


def _bad_lines(rng: random.Random, good: dict) -> list[tuple[bytes, str]]:
    """Damaged Alpaca JSONL lines, each with the reason it must be quarantined for."""
    text = json.dumps(good, ensure_ascii=False).encode()
    return [
        (text[: rng.randrange(1, len(text) - 1)], reasons.INVALID_JSON),
        (json.dumps({**good, "output": 5}).encode(), reasons.wrong_type("output")),
        (json.dumps({"instruction": good["instruction"]}).encode(), "missing_field:output"),
        (text.replace(b'"instruction": "', b'"instruction": "caf\xe9 ', 1), "invalid_utf8"),
        (text[:-1] + b', "meta": "\\udfff"}', reasons.INVALID_UTF8),
        (text[:-1] + b', "meta": ' + _deep(3000) + b"}", reasons.INVALID_JSON),
        (text[:-1] + b', "n": ' + b"7" * 5000 + b"}", reasons.INVALID_JSON),
        (text.replace(b'"output": "', b'"output": NaN, "x": "', 1), "wrong_type:output"),
        (b"[1, 2]", reasons.NOT_AN_OBJECT),
        (b'"just a string"', reasons.NOT_AN_OBJECT),
    ]


def _fuzzed_files(folder: Path, alpaca: list[dict], seed: int) -> dict[str, dict[int, str]]:
    """One JSONL, one JSON array and one Parquet file mixing good and bad records.

    Returns {path: {row: expected quarantine reason}}; every other record must be a row.
    """
    rng = random.Random(seed)
    expected: dict[str, dict[int, str]] = {}

    # JSONL (Alpaca): CRLF line ends, a BOM, blank lines, an escaped NUL, and the bad lines.
    good = rng.sample(alpaca, 40)
    lines: list[tuple[bytes, str | None]] = [
        (json.dumps(r, ensure_ascii=False).encode(), None) for r in good
    ]
    lines.append((json.dumps({**good[0], "output": "nul \u0000 inside"}).encode(), None))
    for bad in _bad_lines(rng, good[1]):
        lines.insert(rng.randrange(len(lines) + 1), bad)
    for _ in range(3):
        lines.insert(rng.randrange(1, len(lines)), (rng.choice([b"", b"  ", b"\t"]), "blank"))
    jsonl = folder / "fuzz.jsonl"
    jsonl.write_bytes(BOM + b"".join(line + b"\r\n" for line, _ in lines))
    expected[str(jsonl)] = {i: r for i, (_, r) in enumerate(lines) if r not in (None, "blank")}

    # JSON array (ShareGPT): bad turns, an empty slot, and a last element cut off.
    def chat(i: int) -> dict:
        turns = [{"from": "human", "value": f"question {i} {rng.random()}"}]
        return {"id": f"c{i}", "conversations": [*turns, {"from": "gpt", "value": f"answer {i}"}]}

    elements: list[tuple[bytes, str | None]] = [
        (json.dumps(chat(i)).encode(), None) for i in range(30)
    ]
    for bad in [
        (json.dumps({"conversations": "a string"}).encode(), reasons.wrong_type("conversations")),
        (
            json.dumps({"conversations": [{"value": "no from"}]}).encode(),
            "missing_field:conversations.from",
        ),
        (json.dumps({"conversations": [{"from": "alien", "value": "x"}]}).encode(), "unknown_role"),
        (
            json.dumps({"conversations": [{"from": "human", "value": 3}]}).encode(),
            "wrong_type:conversations.value",
        ),
        (
            json.dumps({"conversations": [{"from": "gpt", "value": " "}]}).encode(),
            "empty_conversation",
        ),
        (b'{"conversations": [' * 2000 + b"]}" * 2000, reasons.INVALID_JSON),
        (b'{"conversations": [{"from": "human", "value": "\\ud800"}]}', reasons.INVALID_UTF8),
    ]:
        elements.insert(rng.randrange(len(elements) + 1), bad)
    texts = [text for text, _ in elements]
    texts.insert(rng.randrange(1, len(texts)), b"")  # `,,`: an empty slot, no record
    cut = json.dumps(chat(99)).encode()
    array = folder / "fuzz.json"
    array.write_bytes(b"[\n" + b",\n".join(texts) + b",\n" + cut[: len(cut) // 2])
    reasons_by_row = {i: r for i, (_, r) in enumerate(elements) if r is not None}
    reasons_by_row[len(elements)] = reasons.TRUNCATED_RECORD
    expected[str(array)] = reasons_by_row

    # Parquet (Alpaca): instruction as binary (some not UTF-8, some null), a date column that
    # overflows Python's datetime in one row.
    rows = rng.sample(alpaca, 30)
    instruction: list[bytes | None] = [r["instruction"].encode() for r in rows]
    days: list[int | None] = [None] * len(rows)
    planted = rng.sample(range(len(rows)), 3)
    instruction[planted[0]] = b"\xff\xfe not utf-8"
    instruction[planted[1]] = None
    days[planted[2]] = 2**31 - 1
    table = pa.table(
        {
            "instruction": pa.array(instruction, pa.binary()),
            "input": pa.array([r["input"] for r in rows], pa.large_string()),
            "output": pa.array([r["output"] for r in rows]).dictionary_encode(),
            "created": pa.array(days, pa.int32()).cast(pa.date32()),
        }
    )
    parquet = folder / "fuzz.parquet"
    pq.write_table(table, parquet)
    expected[str(parquet)] = {
        planted[0]: reasons.INVALID_UTF8,
        planted[1]: reasons.missing_field("instruction"),
        planted[2]: reasons.wrong_type("created"),
    }
    return expected


@pytest.mark.slow
@pytest.mark.usefixtures("spark")  # no Ray signal: the test is about ingest's accounting
def test_fuzzed_files_through_winnow_select(tmp_path: Path, alpaca_rows: list[dict]) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    expected = _fuzzed_files(tmp_path, alpaca_rows, seed=14)
    out = tmp_path / "out"
    args = ["--out", str(out), "--budget", "20", "--signals", "", "--dedup", "none"]
    result = CliRunner().invoke(app, ["select", *expected, *args])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    counts = manifest["counts"]
    quarantine = [
        json.loads(line) for line in (out / "quarantine.jsonl").read_text("utf-8").splitlines()
    ]
    got = {(q["source"], q["row"]): q["reason"] for q in quarantine}
    want = {
        (source, row): reason for source, rows in expected.items() for row, reason in rows.items()
    }
    assert got == want
    assert len(quarantine) == len(got)  # no record twice
    framed = {s["source"]: s["rows"] for s in manifest["sources"]}
    # JSONL: 40 good + 1 with an escaped NUL + 10 bad (blank lines are no records); JSON: 30
    # good + 7 bad + the cut last element (the empty slot is no record); Parquet: 30 rows.
    assert list(framed.values()) == [51, 38, 30]
    assert set(manifest["timings_s"]) >= {"ingest", "select", "export"}
    assert counts["input"] == sum(framed.values())
    assert counts["quarantined"] == len(want)
    assert counts["input"] == (
        counts["quarantined"] + sum(counts["rejected"].values()) + counts["selected"]
    )
    assert manifest["sources"][0]["blank_lines"] == 3
    scores = pq.read_table(out / "scores.parquet", columns=["source", "row"]).to_pylist()
    assert len(scores) == counts["input"] - counts["quarantined"]
    assert not {(s["source"], s["row"]) for s in scores} & set(want)
    for line in (out / "selected.jsonl").read_bytes().splitlines():
        json.loads(line.decode("utf-8"))  # strict UTF-8, valid JSON
