"""Cheap per-record quality indicators of instruction-tuning conversations.

These are the first, cheapest signals the engine computes for every record: lengths, lexical
diversity (MTLD), empty answers, refusal boilerplate, repeated lines and garbage characters. They
are pure functions over a `conversation` (a sequence of `{"role", "content"}` mappings) so that a
Spark pandas UDF and the single-process baseline produce identical values.

The column names and dtypes in `INDICATOR_SCHEMA` are user-facing; do not rename them.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "INDICATOR_COLUMNS",
    "INDICATOR_SCHEMA",
    "MTLD_THRESHOLD",
    "REFUSAL_PATTERNS",
    "compute_indicators",
    "indicators_frame",
    "is_refusal",
    "mtld",
    "non_printable_count",
    "word_tokens",
]

INDICATOR_SCHEMA = pa.schema(
    [
        pa.field("turns", pa.int32()),
        pa.field("system_chars", pa.int64()),
        pa.field("user_chars", pa.int64()),
        pa.field("assistant_chars", pa.int64()),
        pa.field("user_words", pa.int64()),
        pa.field("assistant_words", pa.int64()),
        pa.field("mtld", pa.float64()),
        pa.field("empty_response", pa.bool_()),
        pa.field("refusal", pa.bool_()),
        pa.field("repeated_line_ratio", pa.float64()),
        pa.field("non_printable_ratio", pa.float64()),
    ]
)

INDICATOR_COLUMNS: tuple[str, ...] = tuple(INDICATOR_SCHEMA.names)

# numpy dtype of each column, derived from the Arrow schema so the two cannot drift apart.
_NUMPY_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(field.type.to_pandas_dtype()) for field in INDICATOR_SCHEMA
)

MTLD_THRESHOLD = 0.72

# --------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------

# Unicode-aware: CJK/Thai text without spaces comes out as one long token per run (accepted).
_WORD_RE = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased `\\w+` tokens; the unit of the word counts and of MTLD."""
    return _WORD_RE.findall(text.lower())


# --------------------------------------------------------------------------------------------
# MTLD
# --------------------------------------------------------------------------------------------


def _mtld_pass(tokens: Iterable[str], n: int, threshold: float) -> float:
    """One directional MTLD pass: tokens per factor.

    A pass with no complete factor and an all-unique remainder has zero factors; its value is
    defined as `n` (the text never lost diversity), which avoids a division by zero.
    """
    factors = 0.0
    types: set[str] = set()
    add = types.add
    count = distinct = 0
    for token in tokens:
        count += 1
        if token in types:
            # Only a repeated token can lower the TTR below the threshold: a new type keeps it
            # above (the mediant of two ratios above the threshold stays above it).
            if distinct / count <= threshold:
                factors += 1.0
                types.clear()
                count = distinct = 0
        else:
            add(token)
            distinct += 1
    if count:
        factors += (1.0 - distinct / count) / (1.0 - threshold)
    return n / factors if factors > 0.0 else float(n)


def mtld(tokens: Sequence[str], threshold: float = MTLD_THRESHOLD) -> float:
    """MTLD (McCarthy & Jarvis 2010): mean of the forward and backward pass; NaN for no tokens.

    Unlike a raw type-token ratio it does not fall with text length, so long and short answers
    can be compared.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    n = len(tokens)
    if n == 0:
        return math.nan
    forward = _mtld_pass(tokens, n, threshold)
    backward = _mtld_pass(reversed(tokens), n, threshold)
    return (forward + backward) / 2.0


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

_APOS = "['’]"

# Refusal / AI-disclaimer boilerplate, lower case: they are matched against lower-cased text
# (3x faster than re.IGNORECASE). A bare "I'm sorry" is not a refusal; sorry-but-cannot is.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"as an ai language model",
    r"as a language model",
    r"as an ai assistant",
    rf"i(?:{_APOS}m| am) sorry,? but i (?:cannot|can not|can{_APOS}t)",
    r"i cannot fulfill",
    rf"i can{_APOS}t assist with",
    r"i am unable to",
    rf"i{_APOS}m not able to provide",
    rf"openai{_APOS}s (?:use-case|content) polic",
    r"it is not appropriate for me to",
    rf"i don{_APOS}t have personal (?:opinions|beliefs|feelings)",
)

_REFUSAL_RE = re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in REFUSAL_PATTERNS) + ")")

# An atom of a (simple) regex: non-nested group, character class, escape or one character, plus
# an optional quantifier.
_REGEX_ATOM = re.compile(r"(\(\?:[^()]*\)|\[[^\]]*\]|\\.|.)((?:[?*+]|\{[^}]*\})?)", re.DOTALL)


def _required_literal(pattern: str) -> str | None:
    """Longest literal run that every match of `pattern` contains; None when unsure.

    Conservative: groups, classes, escapes and quantified atoms break a run; a top-level `|` or a
    nested group gives up (None), so the prefilter is then skipped.
    """
    runs: list[str] = []
    current: list[str] = []
    for atom, quantifier in _REGEX_ATOM.findall(pattern):
        if atom in ("|", "(", ")"):
            return None
        if len(atom) == 1 and atom not in ".^$?*+{}" and not quantifier:
            current.append(atom)
        else:
            runs.append("".join(current))
            current = []
    runs.append("".join(current))
    best = max(runs, key=len)
    return best if len(best) >= 3 else None


# The alternation costs ~50 us per KB of text (sre tries it at every 'a'/'i'/'o'); plain substring
# tests rule out almost every text first.
_REFUSAL_TRIGGERS = tuple(_required_literal(p) for p in REFUSAL_PATTERNS)
_REFUSAL_PREFILTER: tuple[str, ...] | None = (
    None if None in _REFUSAL_TRIGGERS else tuple(t for t in _REFUSAL_TRIGGERS if t is not None)
)


def _lowered_is_refusal(lowered: str) -> bool:
    prefilter = _REFUSAL_PREFILTER
    if prefilter is not None and not any(t in lowered for t in prefilter):
        return False
    return _REFUSAL_RE.search(lowered) is not None


def is_refusal(text: str) -> bool:
    """True when the text contains refusal or AI-disclaimer boilerplate."""
    return _lowered_is_refusal(text.lower())


# --------------------------------------------------------------------------------------------
# Non-printable characters
# --------------------------------------------------------------------------------------------

_NON_PRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn", "Cs"})

# Legitimate inside text: line breaks/tabs, and the pieces of ordinary emoji sequences (ZWJ,
# variation selector-16 (Mn anyway), and the tag characters of subdivision flags (Scotland).
_PRINTABLE_EXCEPTIONS = frozenset({0x09, 0x0A, 0x0D, 0x200D, 0xFE0F, *range(0xE0020, 0xE0080)})


def _is_non_printable(code: int) -> bool:
    return (
        code not in _PRINTABLE_EXCEPTIONS
        and unicodedata.category(chr(code)) in _NON_PRINTABLE_CATEGORIES
    )


def _bmp_non_printable_ranges() -> list[tuple[int, int]]:
    """Inclusive ranges of non-printable BMP code points (one scan of 64k code points)."""
    ranges: list[tuple[int, int]] = []
    start = -1
    for code in range(0x10000):
        if _is_non_printable(code):
            if start < 0:
                start = code
        elif start >= 0:
            ranges.append((start, code - 1))
            start = -1
    if start >= 0:
        ranges.append((start, 0xFFFF))
    return ranges


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    def esc(code: int) -> str:
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"

    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


# One scan finds every non-printable BMP character plus every astral character; astral matches
# (mostly emoji) are then classified through a small cache instead of precomputing all 1.1M code
# points at import.
_CANDIDATE_RE = re.compile(
    "[" + _char_class([*_bmp_non_printable_ranges(), (0x10000, sys.maxunicode)]) + "]"
)
_ASTRAL_CACHE: dict[str, bool] = {}


def non_printable_count(text: str) -> int:
    """Number of control/format/private-use/unassigned/surrogate characters, bar the exceptions."""
    found = _CANDIDATE_RE.findall(text)
    if not found:
        return 0
    count = 0
    for ch in found:
        if ch < "\U00010000":
            count += 1
        else:
            flag = _ASTRAL_CACHE.get(ch)
            if flag is None:
                flag = _ASTRAL_CACHE[ch] = _is_non_printable(ord(ch))
            count += flag
    return count


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    return content if isinstance(content, str) else str(content)


def _row(conversation: Iterable[Mapping[str, Any]] | None) -> tuple[Any, ...]:
    """All indicators of one record, in `INDICATOR_COLUMNS` order."""
    turns = 0
    system_chars = user_chars = assistant_chars = 0
    user_words = 0
    total_chars = 0
    non_printable = 0
    empty = False
    refusal = False
    assistant_tokens: list[str] = []
    line_count = 0
    repeated_lines = 0
    seen_lines: set[str] = set()

    for message in conversation if conversation is not None else ():
        text = _content(message)
        role = message.get("role")
        size = len(text)
        total_chars += size
        non_printable += non_printable_count(text)
        if role == "assistant":
            turns += 1
            assistant_chars += size
            if not text.strip():
                empty = True
                continue
            lowered = text.lower()
            assistant_tokens.extend(_WORD_RE.findall(lowered))
            if not refusal and _lowered_is_refusal(lowered):
                refusal = True
            # str.splitlines also breaks on \v, \f, \x1c-\x1e, \x85, U+2028/9; repeats are exact
            # (case-sensitive) after stripping.
            for line in text.splitlines():
                line = line.strip()
                if line:
                    line_count += 1
                    if line in seen_lines:
                        repeated_lines += 1
                    else:
                        seen_lines.add(line)
        elif role == "user":
            user_chars += size
            user_words += len(_WORD_RE.findall(text.lower()))
        elif role == "system":
            system_chars += size

    return (
        turns,
        system_chars,
        user_chars,
        assistant_chars,
        user_words,
        len(assistant_tokens),
        mtld(assistant_tokens),
        empty or turns == 0,
        refusal,
        repeated_lines / line_count if line_count else 0.0,
        non_printable / total_chars if total_chars else 0.0,
    )


def compute_indicators(conversation: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Indicators of one conversation as a `{column: value}` dict (plain Python scalars).

    `mtld`, `refusal` and `repeated_line_ratio` look at all assistant messages together; an
    empty or whitespace-only assistant message adds to `turns` and sets `empty_response`.
    Messages whose role is not system/user/assistant count only towards `non_printable_ratio`.
    """
    return dict(zip(INDICATOR_COLUMNS, _row(conversation), strict=True))


def indicators_frame(
    conversations: Sequence[Iterable[Mapping[str, Any]] | None],
) -> pd.DataFrame:
    """Indicators of many conversations: one row each, same order, dtypes of INDICATOR_SCHEMA."""
    rows = [_row(conversation) for conversation in conversations]
    columns = zip(*rows, strict=True) if rows else ([] for _ in INDICATOR_COLUMNS)
    return pd.DataFrame(
        {
            name: np.fromiter(values, dtype=dtype, count=len(rows))
            for name, dtype, values in zip(INDICATOR_COLUMNS, _NUMPY_DTYPES, columns, strict=True)
        }
    )
