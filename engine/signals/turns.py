"""Which assistant turns of a conversation are scored: one walker shared by every signal that
scores answers (LM perplexity/IFD, LLM judges, the reward model), so they agree on what a turn
number and `max_turns` mean.

Every assistant message gets a turn number (0, 1, ...) in conversation order. `max_turns = N`
keeps the first N of them. A turn is scorable when its content is not blank and a user turn
precedes it; an unscorable turn keeps its number (it is simply not scored).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AssistantTurn:
    turn: int  # the assistant turn's number within its conversation
    index: int  # its position in the conversation
    user_index: int  # position of the user turn just before it


def scorable_turns(
    conversation: Sequence[Mapping[str, str]], max_turns: int | None = None
) -> Iterator[AssistantTurn]:
    """The scorable assistant turns among the first `max_turns` (all when None)."""
    turn = 0
    last_user: int | None = None
    for i, message in enumerate(conversation):
        role = message["role"]
        if role == "user":
            last_user = i
        if role != "assistant":
            continue
        if max_turns is not None and turn >= max_turns:
            return
        if message["content"].strip() and last_user is not None:
            yield AssistantTurn(turn=turn, index=i, user_index=last_user)
        turn += 1
