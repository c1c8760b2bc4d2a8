"""The canonical record: a multi-turn conversation with a stable content id.

Every input schema (Alpaca, Dolly, ShareGPT, OpenAI `messages`) is turned into the same
`conversation` (a list of `{role, content}` with roles system/user/assistant). The id is a hash of
the *normalised* conversation, so the same content gets the same id in every source and every run:
that is what makes exact-duplicate removal and the score cache work.

Alpaca and Dolly rows carry their `input` (Dolly: `context`) twice: merged into the user turn's
`content` (`instruction\n\ninput`, what every signal reads) and, when not empty, verbatim under the
user turn's own `input` key, so that IFD's reference definitions (engine.signals.lm: Cherry LLM's
with-input Alpaca template, Superfiltering's `{instruction}\n{input}\n`) can rebuild the
instruction/input split. The id hashes role and content only: the `input` key never changes it.

Everything here is pure Python: Spark's pandas UDFs and the single-process baseline call it alike.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine import reasons

SCHEMAS = ("alpaca", "dolly", "sharegpt", "messages")

ROLES = ("system", "user", "assistant")

# ShareGPT and OpenAI exports name speakers in many ways; anything else is quarantined.
ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}

_WHITESPACE_RUN = re.compile(r"\s+")
# JSON can spell unpaired surrogates (\\ud800): text that cannot be written as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

Conversation = list[dict[str, str]]


class RecordError(ValueError):
    """A record that cannot become a conversation; `reason` is the quarantine reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Canonical:
    id: str
    conversation: Conversation


def normalise_text(text: str) -> str:
    """Normalisation used for the content hash only: NFC, whitespace runs collapsed, ends stripped.

    Case is kept. Stored conversations keep their line breaks (code and lists need them).
    """
    return _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text)).strip()


def content_id(conversation: Conversation) -> str:
    """Stable 128-bit hex id of a conversation's normalised content (roles included)."""
    canonical = json.dumps(
        [[m["role"], normalise_text(m["content"])] for m in conversation],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def detect_schema(record: Mapping[str, Any]) -> str | None:
    """Guess a record's schema from its keys; None when nothing fits."""
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record and ("context" in record or "response" in record):
        return "dolly"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _text_field(record: Mapping[str, Any], name: str, required: bool = True) -> str:
    if name not in record or record[name] is None:
        if required:
            raise RecordError(reasons.missing_field(f"{name}"))
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(
            reasons.wrong_type(f"{name}"), f"expected string, got {type(value).__name__}"
        )
    return value


def _prompt_turns(instruction: str, extra: str) -> Conversation:
    """Alpaca/Dolly: the input (or context) follows the instruction, as in the Alpaca template;
    a non-empty input is also kept verbatim under `input` (see the module docstring)."""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    user = {"role": "user", "content": prompt}
    if extra:
        user["input"] = extra
    return [user]


def split_input(message: Mapping[str, Any]) -> tuple[str, str]:
    """A user turn as (instruction, input): the Alpaca/Dolly split kept by ingest, or
    (content, "") for a turn without an `input` (ShareGPT, messages, records from before it)."""
    content, extra = message["content"], message.get("input") or ""
    suffix = f"\n\n{extra}"
    if extra and extra.strip() and content.endswith(suffix):
        return content[: -len(suffix)], extra
    # A blank input was left out of the content, but the references still see it (input != "").
    return content, extra


def _from_alpaca(record: Mapping[str, Any]) -> Conversation:
    instruction = _text_field(record, "instruction")
    extra = _text_field(record, "input", required=False)
    output = _text_field(record, "output")
    return [*_prompt_turns(instruction, extra), {"role": "assistant", "content": output}]


def _from_dolly(record: Mapping[str, Any]) -> Conversation:
    instruction = _text_field(record, "instruction")
    extra = _text_field(record, "context", required=False) or _text_field(
        record, "input", required=False
    )
    # `output` only stands in when present: a row with neither is missing its Dolly `response`.
    response_key = "output" if "response" not in record and "output" in record else "response"
    output = _text_field(record, response_key)
    return [*_prompt_turns(instruction, extra), {"role": "assistant", "content": output}]


def _turns(items: Any, field: str, role_key: str, content_key: str) -> Conversation:
    if not isinstance(items, list):
        raise RecordError(
            reasons.wrong_type(f"{field}"), f"expected list, got {type(items).__name__}"
        )
    conversation: Conversation = []
    for i, turn in enumerate(items):
        if not isinstance(turn, Mapping):
            raise RecordError(reasons.wrong_type(f"{field}"), f"turn {i} is {type(turn).__name__}")
        # ShareGPT exports on the hub often use role/content inside `conversations`.
        if role_key not in turn and "role" in turn:
            role_key, content_key = "role", "content"
        raw_role = turn.get(role_key)
        content = turn.get(content_key)
        if raw_role is None:
            raise RecordError(reasons.missing_field(f"{field}.{role_key}"), f"turn {i}")
        if not isinstance(raw_role, str):
            raise RecordError(reasons.wrong_type(f"{field}.{role_key}"), f"turn {i}")
        role = ROLE_ALIASES.get(raw_role.strip().lower())
        if role is None:
            raise RecordError(reasons.UNKNOWN_ROLE, repr(raw_role)[:40])
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RecordError(reasons.wrong_type(f"{field}.{content_key}"), f"turn {i}")
        conversation.append({"role": role, "content": content})
    return conversation


def _from_sharegpt(record: Mapping[str, Any]) -> Conversation:
    if "conversations" not in record:
        raise RecordError(reasons.missing_field("conversations"))
    return _turns(record["conversations"], "conversations", "from", "value")


def _from_messages(record: Mapping[str, Any]) -> Conversation:
    if "messages" not in record:
        raise RecordError(reasons.missing_field("messages"))
    return _turns(record["messages"], "messages", "role", "content")


_CONVERTERS = {
    "alpaca": _from_alpaca,
    "dolly": _from_dolly,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
}


def to_canonical(record: Any, schema: str) -> Canonical:
    """Turn one parsed record into its canonical conversation and id, or raise RecordError."""
    if not isinstance(record, Mapping):
        raise RecordError(reasons.NOT_AN_OBJECT, type(record).__name__)
    conversation = _CONVERTERS[schema](record)
    conversation = [
        {key: unicodedata.normalize("NFC", value) for key, value in m.items()} for m in conversation
    ]
    if not conversation or all(not normalise_text(m["content"]) for m in conversation):
        raise RecordError(reasons.EMPTY_CONVERSATION)
    if any(_LONE_SURROGATE.search(m["content"]) for m in conversation):
        raise RecordError(reasons.INVALID_UTF8, "unpaired surrogate escape")
    return Canonical(id=content_id(conversation), conversation=conversation)
