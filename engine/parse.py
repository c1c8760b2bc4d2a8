"""Parse a batch of framed raw records into canonical records plus indicators (pure pyarrow).

Spark runs this per partition through `mapInArrow`; the single-process benchmark baseline runs the
same function, so both do identical work. A record that cannot be parsed leaves with
`status = "quarantined"` and a reason, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from engine import reasons
from engine.readers.framing import EXCERPT_CHARS
from engine.records import RecordError, detect_schema, to_canonical
from engine.signals.indicators import INDICATOR_SCHEMA, indicators_frame

RAW_SCHEMA = pa.schema(
    [
        ("source_index", pa.int32()),
        ("row", pa.int64()),
        ("raw", pa.string()),
        ("error", pa.string()),
        ("excerpt", pa.string()),
    ]
)

# `input`: the Alpaca/Dolly input kept verbatim on the user turn (null elsewhere; engine.records).
TURN_TYPE = pa.struct([("role", pa.string()), ("content", pa.string()), ("input", pa.string())])

PARSED_SCHEMA = pa.schema(
    [
        ("source_index", pa.int32()),
        ("row", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("excerpt", pa.string()),
        ("id", pa.string()),
        ("schema", pa.string()),
        ("conversation", pa.list_(TURN_TYPE)),
        ("original", pa.string()),
        *[(f.name, f.type) for f in INDICATOR_SCHEMA],
    ]
)


# Nesting that Python's recursive `json` survives here (a Spark worker's stack) can still fail
# where export re-parses and re-dumps the record from a deeper stack: refuse it at ingest.
MAX_NESTING = 100
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether containers nest deeper than `limit` (iterative: no recursion limit of its own)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return False


def _unwritable(raw: str, record: Any) -> str | None:
    """Quarantine reason for a record that parses but would break a later write, else None.

    Export re-emits the whole record (`json.dumps(ensure_ascii=False)` into UTF-8), so a lone
    surrogate escape (`"\\ud800"`) in any field, even one no schema reads, would crash it; and
    so would nesting deeper than export's stack allows.
    """
    if raw.count("[") + raw.count("{") > MAX_NESTING and _too_deep(record):
        return reasons.INVALID_JSON
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return reasons.INVALID_UTF8
    return None


def parse_batch(batch: pa.RecordBatch, schemas: Mapping[int, str | None]) -> pa.RecordBatch:
    """Turn raw JSON texts into canonical rows; `schemas` maps source_index to its schema.

    A source whose schema is None is detected per record from its keys.
    """
    cols = batch.to_pydict()
    out: dict[str, list] = {name: [] for name in PARSED_SCHEMA.names}
    conversations = []
    first_of: dict[tuple[str, str], int] = {}  # (schema, raw) -> its row in `conversations`
    ok_rows: list[tuple[int, int]] = []  # (row in the batch, row in `conversations`)
    for i, raw in enumerate(cols["raw"]):
        source_index = cols["source_index"][i]
        out["source_index"].append(source_index)
        out["row"].append(cols["row"][i])
        reason, record_id, schema, conversation, excerpt = None, None, None, None, None
        if cols["error"][i] is not None:
            reason, excerpt = cols["error"][i], cols["excerpt"][i]
        else:
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):  # bad JSON, huge integers, deep nesting
                reason, excerpt = reasons.INVALID_JSON, raw[:EXCERPT_CHARS]
            else:
                schema = schemas.get(source_index) or (
                    detect_schema(record) if isinstance(record, Mapping) else None
                )
                try:
                    if (unwritable := _unwritable(raw, record)) is not None:
                        raise RecordError(unwritable)
                    if schema is None:
                        raise RecordError(
                            reasons.NOT_AN_OBJECT
                            if not isinstance(record, Mapping)
                            else reasons.UNKNOWN_SCHEMA
                        )
                    canonical = to_canonical(record, schema)
                    record_id, conversation = canonical.id, canonical.conversation
                except RecordError as exc:
                    reason, excerpt = exc.reason, raw[:EXCERPT_CHARS]
        out["status"].append("ok" if reason is None else "quarantined")
        out["reason"].append(reason)
        out["excerpt"].append(excerpt)
        out["id"].append(record_id)
        out["schema"].append(schema if reason is None else None)
        out["conversation"].append(conversation)
        out["original"].append(raw if reason is None else None)
        if conversation is not None:
            # Byte-identical records of one schema have identical indicators: computed once per
            # batch. (Not by id: the id hashes normalised text, and copies that differ in line
            # breaks differ in their indicators.)
            key = (schema, raw)
            if key not in first_of:
                first_of[key] = len(conversations)
                conversations.append(conversation)
            ok_rows.append((i, first_of[key]))

    indicators = indicators_frame(conversations)
    n = len(cols["raw"])
    for field in INDICATOR_SCHEMA:
        values = indicators[field.name].tolist()
        column = [None] * n
        for i, computed in ok_rows:
            column[i] = values[computed]
        out[field.name] = column
    return pa.RecordBatch.from_pydict(out, schema=PARSED_SCHEMA)
