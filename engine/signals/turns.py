"""Which assistant turns of a conversation are scored: one walker shared by every signal that
scores answers (LM perplexity/IFD, LLM judges, the reward model), so they agree on what a turn
number and `max_turns` mean.

A turn is *scorable* when its content is not blank and a user turn precedes it (somewhere
earlier in the conversation: that user turn is its instruction). A ShareGPT fragment often opens
with an assistant message cut from a longer chat; it has no instruction and is not scored.

Turn numbers: every assistant message gets a number (0, 1, ...) in conversation order, scorable
or not, so a number names the same message whatever `max_turns` is and whichever signal scored
it. `max_turns = N` keeps the first N *scorable* turns (before issue 11 it kept the first N
assistant messages, so `max_turns: 1` on a fragment that opens with an assistant message scored
nothing). Per-turn outputs (`turn_ifd`, `judge_<name>_turns`, `rm_turns`) list the scored turns
in conversation order.

The counting rule enters a stage's settings fingerprint only when `max_turns` is set
(`turn_rule_settings`): with `max_turns: null` every scorable turn is scored, as before, and
cached scores stay valid; with a number, the old and new rules pick different turns for some
records, so their cached scores must not be mixed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

# What `max_turns` counts; recorded in stage fingerprints when `max_turns` is set.
MAX_TURNS_COUNTS = "scorable"


@dataclass(frozen=True)
class AssistantTurn:
    turn: int  # the assistant message's number within its conversation (see the module docstring)
    index: int  # its position in the conversation
    user_index: int  # position of the user turn just before it


def scorable_turns(
    conversation: Sequence[Mapping[str, str]], max_turns: int | None = None
) -> Iterator[AssistantTurn]:
    """The first `max_turns` scorable assistant turns (all when None), in conversation order."""
    if max_turns is not None and max_turns < 1:
        raise ValueError("max_turns must be at least 1 (or None for every turn)")
    turn = 0
    kept = 0
    last_user: int | None = None
    for i, message in enumerate(conversation):
        role = message["role"]
        if role == "user":
            last_user = i
        if role != "assistant":
            continue
        if message["content"].strip() and last_user is not None:
            yield AssistantTurn(turn=turn, index=i, user_index=last_user)
            kept += 1
            if max_turns is not None and kept >= max_turns:
                return
        turn += 1


def turn_rule_settings(max_turns: int | None) -> dict[str, str]:
    """Extra settings-fingerprint entries for a stage with this `max_turns`: the counting rule,
    only when a limit is set (null scores every scorable turn under either rule)."""
    return {} if max_turns is None else {"max_turns_counts": MAX_TURNS_COUNTS}
