"""Example rows for the report: provenance plus conversation turns, cut to a skimmable size.

Example text is corpus text, i.e. untrusted: it only ever reaches the page as a template
variable (autoescaped, control characters made visible), never as template source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.report.format import truncate

MAX_TURNS = 8
GROUP_ORDER = ("kept", "dropped", "quarantined")
HEADER_KEYS = ("id", "source", "row", "reason")


@dataclass
class Turn:
    role: str
    text: str


@dataclass
class Example:
    """One row: `header` is (key, value) provenance; then either `turns` or a raw `text`."""

    header: list[tuple[str, Any]]
    turns: list[Turn] | None = None
    text: str | None = None
    more_turns: int = 0


@dataclass
class Group:
    name: str
    items: list[Example] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        """A tame `id` for the group's heading, whatever its name."""
        return "examples-" + (re.sub(r"[^a-z0-9_]+", "-", self.name.lower()).strip("-") or "other")


def _turns(conversation: list | tuple) -> tuple[list[Turn], int]:
    """Turns with role labels, each truncated; and how many turns were left out."""
    turns = []
    for turn in conversation[:MAX_TURNS]:
        if isinstance(turn, Mapping):
            role, content = turn.get("role", "?"), turn.get("content", "")
        else:
            role, content = "?", turn
        turns.append(Turn("?" if role is None else str(role), truncate(content)))
    return turns, max(0, len(conversation) - MAX_TURNS)


def example(item: Mapping[str, Any]) -> Example:
    """One example row: its conversation if it has one, else its raw excerpt (quarantine)."""
    header = [(key, item[key]) for key in HEADER_KEYS if item.get(key) is not None]
    if "conversation" not in item:
        return Example(header, text=truncate(item.get("excerpt")))
    conversation = item.get("conversation")
    if not isinstance(conversation, list | tuple):
        return Example(header, text=truncate(conversation))
    turns, more = _turns(conversation)
    return Example(header, turns=turns, more_turns=more)


def groups(examples: Mapping[str, Any] | None) -> list[Group]:
    """Non-empty example groups: kept, dropped, quarantined first, then any others."""
    examples = examples or {}
    order = [*GROUP_ORDER, *(g for g in examples if g not in GROUP_ORDER)]
    out = []
    for name in order:
        items = examples.get(name)
        if isinstance(items, list) and items:
            rows = [example(i) for i in items if isinstance(i, Mapping)]
            if rows:
                out.append(Group(str(name), rows))
    return out
