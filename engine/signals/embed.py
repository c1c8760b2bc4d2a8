"""Sentence embeddings: which text of a record is embedded, and the sidecar schema.

The embedder itself is a backend (`engine.backends.embedder()`, the `Embedder` protocol in
engine.backends.base): L2-normalised float32 vectors, so a dot product is the cosine similarity,
which the FAISS semantic-duplicate search and the k-center / facility-location selectors rely on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

EMBED_SCHEMA = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])

TEXT_CHOICES = ("instruction", "response", "conversation", "mods", "superfiltering", "deita")

# DEITA's embedder prompt (`deita/selection/embedder/conversation.py`, template "vicuna_v1.1",
# separator style ADD_COLON_TWO): byte-identical system prompt, roles and separators.
VICUNA_V11_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V11_ROLES = {"user": "USER", "assistant": "ASSISTANT"}
VICUNA_V11_SEPS = (" ", "</s>")


def _first_turn(conversation: Iterable[Mapping[str, Any]], role: str) -> str:
    for turn in conversation:
        if turn.get("role") == role:
            return turn.get("content") or ""
    return ""


def _first_user_split(turns: list[Mapping[str, Any]]) -> tuple[str, str]:
    """(instruction, input) of the first user turn: Alpaca/Dolly's split kept by ingest."""
    from engine.records import split_input

    for turn in turns:
        if turn.get("role") == "user":
            return split_input({"content": turn.get("content") or "", "input": turn.get("input")})
    return "", ""


def deita_prompt(turns: list[Mapping[str, Any]]) -> str:
    """DEITA's embedder text (`embedder/utils.py: preprocess`, only_answer=False, vicuna_v1.1):
    system + " ", then per message `ROLE: message` + (" " after even, "</s>" after odd positions),
    an empty message as `ROLE:` alone. As the reference, a first message not from the user is
    dropped. Winnow's extension: system turns are left out (DEITA's ShareGPT data has none and
    the template carries its own system prompt); the roles are not forced to alternate (the
    reference asserts they do) but the separators follow the position, as its code does."""
    messages = [t for t in turns if t.get("role") in VICUNA_V11_ROLES]
    if messages and messages[0].get("role") != "user":
        messages = messages[1:]
    text = VICUNA_V11_SYSTEM + VICUNA_V11_SEPS[0]
    for i, turn in enumerate(messages):
        role, message = VICUNA_V11_ROLES[turn["role"]], turn.get("content") or ""
        text += f"{role}: {message}{VICUNA_V11_SEPS[i % 2]}" if message else f"{role}:"
    return text


def record_text(conversation: Iterable[Mapping[str, Any]] | None, which: str) -> str:
    """The text of a record that is embedded (or shingled for MinHash).

    Winnow's: "instruction": the first user turn (with an Alpaca/Dolly input appended, as
    ingest merges it); "response": the first assistant turn; "conversation": every turn as a
    `role: content` line.
    The references': "mods": MoDS' `d["instruction"]` (`run.py`): the instruction without the
    Alpaca input (other schemas: the first user turn); "superfiltering": Superfiltering.D's
    `emb_type="whole"` (`do_fla.py: combine_sentences`): `instruction\ninput\noutput` of the first
    exchange (the reference's Alpaca rows always have an `input` key, so an empty input still
    gives its line: `instruction\n\noutput`; Winnow writes other schemas the same way);
    "deita": DEITA's vicuna_v1.1 prompt of the whole conversation (`deita_prompt`).
    A record without that turn gives the empty string (or the empty template), never an error.
    """
    turns = [] if conversation is None else list(conversation)
    if which == "instruction":
        return _first_turn(turns, "user")
    if which == "response":
        return _first_turn(turns, "assistant")
    if which == "conversation":
        return "\n".join(f"{t.get('role', '')}: {t.get('content') or ''}" for t in turns)
    if which == "mods":
        return _first_user_split(turns)[0]
    if which == "superfiltering":
        instruction, extra = _first_user_split(turns)
        return f"{instruction}\n{extra}\n{_first_turn(turns, 'assistant')}"
    if which == "deita":
        return deita_prompt(turns)
    raise ValueError(f"unknown text choice {which!r}; known: {', '.join(TEXT_CHOICES)}")


def embedding_array(vectors: np.ndarray) -> pa.ListArray:
    """An (n, dim) float32 matrix as Arrow list<float32> without a Python loop."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows, dim = vectors.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * dim)
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))
