"""Supervised fine-tuning examples: which tokens a model is trained on, and how they are batched.

Pure over a tokenizer and plain conversations (no model, no Ray). The template is the one the
LM signal scores with and the generate stage prompts with (engine.signals.lm.render_prompt), so
a trained model sees at training time exactly the prompt text it is later asked with.

Rules (loss on assistant tokens only; every other label is -100):
  alpaca / plain: one example per scorable assistant turn (engine.signals.turns): its prompt is
    `render_prompt(history before the turn)` (the earlier turns are context, as the LM signal
    scores that turn and as generation prompts it), then the turn's answer tokens, then EOS;
    only the answer and EOS are labelled. Prompt and answer are tokenised apart without special
    tokens, as engine.signals.lm.plan_turns does, so both agree on the token boundary. A
    single-turn row (Alpaca, Dolly) is one example.
  chat: one example per conversation, rendered with the tokenizer's chat template; each scorable
    assistant message is a labelled span (its content and the template's end-of-turn text),
    every other message is context. Spans come from rendering growing prefixes of the
    conversation; a template whose renderings are not prefixes of each other falls back to one
    example per turn (prompt = the template with the generation prompt, as for alpaca).
  Truncation to `max_length` keeps the start of a sequence (the prompt and the beginning of the
  answer). An example left with no labelled token is dropped; a row that keeps no example is
  counted in `EncodedRows.dropped`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.signals.lm import Template, render_prompt
from engine.signals.turns import scorable_turns

IGNORE = -100  # the label torch's cross-entropy skips

Conversation = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and their labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def labelled(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class EncodedRows:
    examples: list[Example] = field(default_factory=list)
    rows: int = 0  # rows given
    dropped: int = 0  # rows that kept no labelled token (no scorable turn, or truncated away)
    truncated: int = 0  # examples cut to max_length


def eos_id(tokenizer: Any) -> int:
    token = tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has no EOS token: training could never learn to stop")
    return int(token)


def pad_id(tokenizer: Any) -> int:
    """The padding id (the EOS when the tokenizer has no pad token; padded labels are ignored)."""
    token = tokenizer.pad_token_id
    return eos_id(tokenizer) if token is None else int(token)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate(example: Example, max_length: int) -> tuple[Example | None, bool]:
    """Keep the first `max_length` tokens; None when no labelled token survives."""
    cut = len(example.input_ids) > max_length
    if cut:
        example = Example(example.input_ids[:max_length], example.labels[:max_length])
    return (example if example.labelled else None), cut


def _turn_examples(tokenizer: Any, conversation: Conversation, template: Template) -> list[Example]:
    """alpaca/plain (and the chat fallback): one example per scorable assistant turn."""
    eos = eos_id(tokenizer)
    examples = []
    for turn in scorable_turns(conversation):
        history = [dict(m) for m in conversation[: turn.index]]
        prompt = _ids(tokenizer, render_prompt(tokenizer, history, template))
        answer = _ids(tokenizer, conversation[turn.index]["content"])
        if template == "chat":
            # The template's own end of turn closes the answer (what generation stops on).
            closed = tokenizer.apply_chat_template(
                [*history, dict(conversation[turn.index])], tokenize=False
            )
            opened = render_prompt(tokenizer, history, template)
            tail = closed[len(opened) :] if closed.startswith(opened) else None
            answer = _ids(tokenizer, tail) if tail else [*answer, eos]
        else:
            answer = [*answer, eos]
        examples.append(Example([*prompt, *answer], [IGNORE] * len(prompt) + answer))
    return examples


def _chat_example(tokenizer: Any, conversation: Conversation) -> Example | None:
    """The whole conversation under the chat template with its scorable assistant spans
    labelled; None when the template's renderings of growing prefixes are not prefixes of
    each other (the caller then falls back to one example per turn)."""
    messages = [dict(m) for m in conversation]
    labelled = {t.index for t in scorable_turns(conversation)}
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i in range(len(messages)):
        if i in labelled:  # the generation prompt is context, the answer after it is labelled
            opened = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            if not opened.startswith(done):
                return None
            context = _ids(tokenizer, opened[len(done) :])
            input_ids += context
            labels += [IGNORE] * len(context)
            done = opened
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(done):
            return None
        piece = _ids(tokenizer, text[len(done) :])
        input_ids += piece
        labels += piece if i in labelled else [IGNORE] * len(piece)
        done = text
    return Example(input_ids, labels)


def encode_conversation(
    tokenizer: Any, conversation: Conversation, template: Template
) -> list[Example]:
    """A conversation's training examples (untruncated), by the rules in the module docstring."""
    if template == "chat":
        if not any(True for _ in scorable_turns(conversation)):
            return []
        whole = _chat_example(tokenizer, conversation)
        if whole is not None:
            return [whole]
    return _turn_examples(tokenizer, conversation, template)


def encode_rows(
    tokenizer: Any, conversations: Sequence[Conversation], template: Template, max_length: int
) -> EncodedRows:
    """Every row's examples cut to `max_length`; rows left without a labelled token dropped."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2 tokens")
    out = EncodedRows(rows=len(conversations))
    for conversation in conversations:
        kept = 0
        for example in encode_conversation(tokenizer, conversation, template):
            cut_example, cut = _truncate(example, max_length)
            out.truncated += int(cut)
            if cut_example is not None:
                out.examples.append(cut_example)
                kept += 1
        out.dropped += int(kept == 0)
    return out


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad: int) -> dict[str, Any]:
    """A padded batch (right padding): input_ids with `pad`, labels with IGNORE, and the
    attention mask; torch tensors."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        ids.append([*e["input_ids"], *[pad] * (width - n)])
        labels.append([*e["labels"], *[IGNORE] * (width - n)])
        mask.append([1] * n + [0] * (width - n))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


def split_rows(
    ids: Sequence[str], eval_fraction: float, eval_max_rows: int, seed: int
) -> tuple[list[int], list[int]]:
    """(train positions, eval positions) of an arm's rows: the eval rows are the ones whose
    seeded hash of the id is smallest, so the split depends on the ids and the seed only (not
    on row order), and rows shared by two arms fall on the same side in both. Eval size:
    round(n * eval_fraction) capped at eval_max_rows, at least one when eval_fraction > 0 and
    two rows or more exist, and never every row. Both lists are in the given order."""
    n = len(ids)
    size = min(eval_max_rows, round(n * eval_fraction))
    if eval_fraction > 0 and eval_max_rows > 0 and n >= 2:
        size = max(size, 1)
    size = min(size, max(n - 1, 0))
    rank = sorted(
        range(n), key=lambda i: (hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest(), i)
    )
    held = set(rank[:size])
    return [i for i in range(n) if i not in held], sorted(held)


def rows_sha(rows: Sequence[tuple[str, Conversation]]) -> str:
    """A hash of an arm's rows (ids and conversations, in order): with the recipe's
    fingerprint it says whether a trained model is still the model of this arm."""
    text = json.dumps(
        [[i, [dict(m) for m in c]] for i, c in rows], sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
