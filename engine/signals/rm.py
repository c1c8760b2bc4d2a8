"""Reward-model scoring arithmetic: which (instruction, response) pairs are scored, and how their
scores become a record's columns.

Pure Python (no torch). The scorer (engine.backends.reward) receives the pairs built here and
returns one float per pair: the reward model's single logit for `(instruction, response)`.

Pairs. The scored turns are those of engine.signals.turns, the walker LM scoring and the judges
share, so every signal agrees on what a turn number and `max_turns` mean: the first `max_turns`
assistant turns with non-blank content and a user turn before them (an unscorable turn, such as
a greeting that opens a chat, is skipped, does not count towards `max_turns`, and keeps its
number). A pair's
instruction is the last user turn before its answer; system turns and earlier context are not
part of it (the reward models this signal targets, such as OpenAssistant's DeBERTa family, score
a bare question/answer pair).

Columns (`RM_SCHEMA`): `rm_score` is the mean over the record's scored pairs, `rm_turns` the
per-pair scores in conversation order, `rm_reason` null, or `rm_no_turn` when the record has no
pair (its `rm_score` is then NaN and `rm_turns` empty).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine import reasons
from engine.signals.turns import scorable_turns

RM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("rm_score", pa.float64()),
        ("rm_turns", pa.list_(pa.float64())),
        ("rm_reason", pa.string()),
    ]
)
RM_COLUMNS: tuple[str, ...] = tuple(RM_SCHEMA.names[1:])
REASON_NO_TURN = reasons.RM_NO_TURN


@dataclass(frozen=True)
class RMPair:
    """One scored pair: assistant turn number `turn` of record `record` in its batch."""

    record: int
    turn: int
    instruction: str
    response: str


def plan_pairs(
    conversations: Sequence[Sequence[Mapping[str, str]] | None], max_turns: int | None = None
) -> list[RMPair]:
    """Every (record, instruction, response) pair to score, records in order, each record's
    pairs in conversation order (see the module docstring)."""
    if max_turns is not None and max_turns < 1:
        raise ValueError("max_turns must be at least 1 (or None for every turn)")
    pairs: list[RMPair] = []
    for r, conversation in enumerate(conversations):
        turns = list(conversation or ())
        for t in scorable_turns(turns, max_turns):
            pairs.append(
                RMPair(r, t.turn, turns[t.user_index]["content"], turns[t.index]["content"])
            )
    return pairs


def record_columns(
    ids: Sequence[str], pairs: Sequence[RMPair], scores: Sequence[float] | np.ndarray
) -> pa.Table:
    """The sidecar rows of a batch: one per id, from the pairs' scores (same order as `pairs`)."""
    if len(pairs) != len(scores):
        raise ValueError(f"{len(pairs)} pairs but {len(scores)} scores")
    per_record: list[list[float]] = [[] for _ in ids]
    for pair, score in zip(pairs, scores, strict=True):
        per_record[pair.record].append(float(score))
    values: list[float] = []
    why: list[str | None] = []
    for turn_scores in per_record:
        values.append(math.fsum(turn_scores) / len(turn_scores) if turn_scores else math.nan)
        why.append(None if turn_scores else REASON_NO_TURN)
    return pa.table(
        {"id": list(ids), "rm_score": values, "rm_turns": per_record, "rm_reason": why},
        schema=RM_SCHEMA,
    )
