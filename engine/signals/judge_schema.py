"""Column names and types of LLM-judge signals: one set per enabled judge.

Per judge `<name>`: `judge_<name>` (the record's aggregate score), `judge_<name>_turns` (one score
per assistant turn) and `judge_<name>_reason` (null, or why the score is NaN, e.g. judge_unparsed).
With both DEITA judges on, `judge_deita_score` is DEITA's evol score: the sum over turns of
complexity x quality.
"""

from __future__ import annotations

import pyarrow as pa

BUILTIN_JUDGES = ("alpagasus", "deita_quality", "deita_complexity")
DEITA_PAIR = ("deita_quality", "deita_complexity")


def judge_fields(name: str) -> list[pa.Field]:
    return [
        pa.field(f"judge_{name}", pa.float64()),
        pa.field(f"judge_{name}_turns", pa.list_(pa.float64())),
        pa.field(f"judge_{name}_reason", pa.string()),
    ]


def judge_schema(names: list[str]) -> pa.Schema:
    """The judge sidecar's schema for the enabled judges, `id` first."""
    fields = [pa.field("id", pa.string())]
    for name in names:
        fields.extend(judge_fields(name))
    if all(n in names for n in DEITA_PAIR):
        fields.append(pa.field("judge_deita_score", pa.float64()))
    return pa.schema(fields)
