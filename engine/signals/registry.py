"""Which signal columns exist, by signal name: the public contract of `scores.parquet`.

Config validation uses this to reject a filter or score over a column no enabled signal produces,
before any work starts.
"""

from __future__ import annotations

from engine.signals.indicators import INDICATOR_SCHEMA

# Always computed on Spark during ingest.
INDICATOR_COLUMNS: tuple[str, ...] = tuple(INDICATOR_SCHEMA.names)

# Model-backed signals computed by Ray actor pools, by the name `--signals` uses.
MODEL_SIGNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "tokens": ("tokens_user", "tokens_assistant", "tokens_chat"),
}

SIGNAL_NAMES: tuple[str, ...] = ("indicators", *MODEL_SIGNAL_COLUMNS)


def columns_for(signals: list[str]) -> tuple[str, ...]:
    """All signal columns available when `signals` are enabled (indicators always are)."""
    columns = list(INDICATOR_COLUMNS)
    for name in signals:
        columns.extend(MODEL_SIGNAL_COLUMNS.get(name, ()))
    return tuple(columns)
