"""Which signal columns exist, by signal name: the public contract of `scores.parquet`.

Config validation uses this to reject a filter or score over a column no enabled signal produces,
before any work starts.
"""

from __future__ import annotations

import pyarrow as pa

from engine.signals.indicators import INDICATOR_COLUMNS, INDICATOR_SCHEMA
from engine.signals.lm import LM_SCHEMA
from engine.signals.tokens import TOKEN_SCHEMA

# Model-backed signals computed by Ray actor pools, by the name `--signals` uses.
MODEL_SIGNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "tokens": tuple(TOKEN_SCHEMA.names[1:]),
    "lm": tuple(LM_SCHEMA.names[1:]),
}

_TYPES: dict[str, pa.DataType] = {
    f.name: f.type for f in (*INDICATOR_SCHEMA, *TOKEN_SCHEMA, *LM_SCHEMA)
}

# Reasons Winnow itself gives; a filter may not reuse them, or the counts would mix.
RESERVED_REASONS = ("exact_duplicate", "below_budget", "near_duplicate", "semantic_duplicate")


def column_kind(column: str) -> str:
    """'bool' or 'number': what a filter may compare the column with."""
    return "bool" if pa.types.is_boolean(_TYPES[column]) else "number"


SIGNAL_NAMES: tuple[str, ...] = ("indicators", *MODEL_SIGNAL_COLUMNS)


def columns_for(signals: list[str]) -> tuple[str, ...]:
    """All signal columns available when `signals` are enabled (indicators always are)."""
    columns = list(INDICATOR_COLUMNS)
    for name in signals:
        columns.extend(MODEL_SIGNAL_COLUMNS.get(name, ()))
    return tuple(columns)
