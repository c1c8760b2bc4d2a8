"""Cheap per-record quality indicators of instruction-tuning conversations.

These are the first, cheapest signals the engine computes for every record: lengths, lexical
diversity (MTLD), empty answers, refusal boilerplate, repeated lines, garbage characters, and the
repetition statistics of Gopher's repetition rules plus a zlib compression ratio (the hygiene
filters, `engine.selection.hygiene`, read them). They are pure functions over a `conversation` (a
sequence of `{"role", "content"}` mappings) so that a Spark pandas UDF and the single-process
baseline produce identical values.

The column names and dtypes in `INDICATOR_SCHEMA` are user-facing; do not rename them.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from engine.signals.gopher_kernel import DUP_SIZES, TOP_SIZES, ngram_statistics

__all__ = [
    "COMPRESSION_MIN_CHARS",
    "DUP_NGRAM_SIZES",
    "GOPHER_MIN_WORDS",
    "INDICATOR_COLUMNS",
    "INDICATOR_SCHEMA",
    "MTLD_THRESHOLD",
    "REFUSAL_PATTERNS",
    "REPETITION_MAX_CHARS",
    "TOP_NGRAM_SIZES",
    "compression_ratio",
    "compute_indicators",
    "gopher_duplicate_ngram_chars",
    "gopher_repetition",
    "gopher_top_ngram_chars",
    "gopher_words",
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
        pa.field("longest_response_chars", pa.int64()),
        *(
            pa.field(f"{side}_{name}", pa.float64())
            for side in ("assistant", "user")
            for name in (
                "dup_line_frac",
                "dup_para_frac",
                "dup_line_char_frac",
                "dup_para_char_frac",
                *(f"top_{n}gram_char_frac" for n in (2, 3, 4)),
                *(f"dup_{n}gram_char_frac" for n in (5, 6, 7, 8, 9, 10)),
                "compression_ratio",
            )
        ),
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
# Repetition: Gopher's repetition rules (Rae et al. 2021, MassiveText, table A1)
# --------------------------------------------------------------------------------------------

# The definitions follow datatrove's `GopherRepetitionFilter` (the public reference code): the
# same splits, the same joins, the same denominators (the whole text's length). Two choices are
# Winnow's and are named here: the word tokenizer (below) and the scope (`_side_repetition`).

TOP_NGRAM_SIZES: tuple[int, ...] = TOP_SIZES  # (2, 3, 4)
DUP_NGRAM_SIZES: tuple[int, ...] = DUP_SIZES  # (5, 6, 7, 8, 9, 10)

# Gopher computes these statistics only for documents of 50 words or more (its quality filter
# drops shorter ones first). On a short answer one n-gram is a large share of the text without any
# repetition ("Paris." has a top 2-gram fraction above 1), so a message shorter than this, in
# `\w+` words, is not measured.
GOPHER_MIN_WORDS = 50

# Work per record is bounded: the repetition statistics and the compression ratio look at the first
# REPETITION_MAX_CHARS characters of each side (assistant, user), message after message. A longer
# text is judged by its head; the length cap (`longest_response_chars`) judges the rest.
REPETITION_MAX_CHARS = 20_000

# zlib's header and Huffman tables dominate short texts (their ratio is high whatever they say);
# a message shorter than this is not measured.
COMPRESSION_MIN_CHARS = 200

_PARAGRAPH_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")
# datatrove splits words with NLTK's word_tokenize (English), which needs data files Winnow does
# not carry; this keeps its two properties that matter here: punctuation runs are tokens of their
# own and whitespace never is. Case is kept, as in datatrove.
_GOPHER_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def gopher_words(text: str) -> list[str]:
    """The word tokens the n-gram statistics count: `\\w+` runs and punctuation runs, case kept."""
    return _GOPHER_WORD_RE.findall(text)


def _duplicates(elements: Iterable[str]) -> tuple[int, int]:
    """(number, characters) of the elements that repeat an earlier one (datatrove's
    `find_duplicates`: the first occurrence is not counted)."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element)
        else:
            seen.add(element)
    return count, chars


class _Joined:
    """`separator.join(words)`, each word's start in it, and a polynomial hash (mod 2**64) of any
    slice of it, so that the hashes of every n-gram come from a few numpy operations.

    Hashes only narrow the work: equal strings always hash equal, and every decision is then
    checked on the strings themselves, so a collision can cost time, never change a result.
    """

    _BASE = 0x100000001B3  # odd: invertible mod 2**64
    _BASE_INV = pow(_BASE, -1, 2**64)

    def __init__(self, words: Sequence[str], separator: str) -> None:
        self.text = separator.join(words)
        step = len(separator)
        self.starts = np.zeros(len(words) + 1, dtype=np.int64)  # the last: one past, + step
        np.cumsum(
            np.fromiter(map(len, words), dtype=np.int64, count=len(words)) + step,
            out=self.starts[1:],
        )
        self.step = step
        codes = np.frombuffer(self.text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        size = len(codes)
        with np.errstate(over="ignore"):
            inverse = np.ones(size + 1, dtype=np.uint64)
            inverse[1:] = self._BASE_INV
            inverse = np.cumprod(inverse, dtype=np.uint64)  # BASE**-k
            forward = np.ones(size + 1, dtype=np.uint64)
            forward[1:] = self._BASE
            self._power = np.cumprod(forward, dtype=np.uint64)  # BASE**k
            self._prefix = np.zeros(size + 1, dtype=np.uint64)
            np.cumsum(
                codes.astype(np.uint64) * inverse[:size], dtype=np.uint64, out=self._prefix[1:]
            )

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, hash) of every n-gram's slice, in order."""
        begin = self.starts[: len(self.starts) - n]
        end = self.starts[n:] - self.step
        with np.errstate(over="ignore"):
            hashes = (self._prefix[end] - self._prefix[begin]) * self._power[begin]
        return begin, end, hashes


# Below this many words the plain string walk is faster than numpy's per-call overhead.
_HASHED_MIN_WORDS = 100


def _top_ngram_chars_strings(words: Sequence[str], n: int) -> int:
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def _top_ngram_chars_hashed(joined: _Joined, n: int) -> int:
    begin, end, hashes = joined.ngrams(n)
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    best = counts.max()
    pick = int(first[counts == best].min())  # the first n-gram to occur among the most frequent
    text = joined.text
    gram = text[begin[pick] : end[pick]]
    same = np.flatnonzero(hashes == hashes[pick]).tolist()
    if all(text[begin[i] : end[i]] == gram for i in same):
        return len(gram) * int(best)
    # A hash collision (never seen in practice): count the strings themselves.
    grams = Counter(text[i:j] for i, j in zip(begin.tolist(), end.tolist(), strict=True))
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def gopher_top_ngram_chars(words: Sequence[str], n: int, joined: _Joined | None = None) -> int:
    """Characters of the most frequent n-gram times its count, n-grams joined with spaces (ties:
    the first to occur), 0 without any n-gram (datatrove's `find_top_duplicate`)."""
    if len(words) < n:
        return 0
    if len(words) < _HASHED_MIN_WORDS:
        return _top_ngram_chars_strings(words, n)
    return _top_ngram_chars_hashed(joined or _Joined(words, " "), n)


def _dup_ngram_chars_strings(words: Sequence[str], n: int) -> int:
    seen: set[str] = set()
    repeated = idx = 0
    last = len(words) - n + 1
    while idx < last:
        gram = "".join(words[idx : idx + n])
        if gram in seen:
            repeated += len(gram)
            idx += n
        else:
            seen.add(gram)
            idx += 1
    return repeated


def _dup_ngram_chars_hashed(joined: _Joined, n: int) -> int:
    # datatrove walks every position; only a position whose n-gram occurs more than once can
    # repeat or be repeated, so the walk visits those alone (the others would be added to a set
    # that no one reads). Membership is decided on the strings.
    begin, end, hashes = joined.ngrams(n)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    text = joined.text
    seen: set[str] = set()
    repeated = 0
    free = 0  # the next position the walk visits (a repeat at i jumps to i + n)
    for i in np.flatnonzero(counts[inverse] > 1).tolist():
        if i < free:
            continue
        gram = text[begin[i] : end[i]]
        if gram in seen:
            repeated += len(gram)
            free = i + n
        else:
            seen.add(gram)
    return repeated


def gopher_duplicate_ngram_chars(
    words: Sequence[str], n: int, joined: _Joined | None = None
) -> int:
    """Characters of the n-grams (joined without spaces) that repeat an earlier one, skipping past
    a repeat so that overlapping repeats count once (datatrove's `find_all_duplicate`)."""
    if len(words) < n:
        return 0
    if len(words) < _HASHED_MIN_WORDS:
        return _dup_ngram_chars_strings(words, n)
    return _dup_ngram_chars_hashed(joined or _Joined(words, ""), n)


def gopher_repetition(text: str, words: Sequence[str] | None = None) -> tuple[float, ...]:
    """Gopher's thirteen repetition statistics of one text, in `_REPETITION_NAMES` order.

    Duplicate paragraph fraction and character fraction (paragraphs split on 2+ newlines of the
    stripped text), the same for lines (split on 1+ newlines), the top n-gram character fraction
    for n = 2..4 and the duplicate n-gram character fraction for n = 5..10; every character
    fraction is over `len(text)`. NaN for an empty text.
    """
    size = len(text)
    if size == 0:
        return (math.nan,) * len(_REPETITION_NAMES)
    if words is None:
        words = gopher_words(text)
    paragraphs = _PARAGRAPH_RE.split(text.strip())
    para_dups, para_chars = _duplicates(paragraphs)
    lines = _LINES_RE.split(text)
    line_dups, line_chars = _duplicates(lines)
    return (
        line_dups / len(lines),
        para_dups / len(paragraphs),
        line_chars / size,
        para_chars / size,
        *(chars / size for chars in _ngram_chars(words)),
    )


def _ngram_chars(words: Sequence[str]) -> list[int]:
    """The top n-gram characters (TOP_NGRAM_SIZES) then the duplicate n-gram characters
    (DUP_NGRAM_SIZES): the compiled kernel where numba is importable, the string and hashed
    walks for a statistic it leaves to them (a hash collision) or without numba."""
    compiled = ngram_statistics(words)
    if compiled is not None and (compiled >= 0).all():
        return compiled.tolist()
    spaced = plain = None
    if len(words) >= _HASHED_MIN_WORDS:
        spaced, plain = _Joined(words, " "), _Joined(words, "")
    sizes = [(gopher_top_ngram_chars, n, spaced) for n in TOP_NGRAM_SIZES]
    sizes += [(gopher_duplicate_ngram_chars, n, plain) for n in DUP_NGRAM_SIZES]
    values = compiled.tolist() if compiled is not None else [-1] * len(sizes)
    return [
        value if value >= 0 else walk(words, n, joined)
        for value, (walk, n, joined) in zip(values, sizes, strict=True)
    ]


_REPETITION_NAMES: tuple[str, ...] = (
    "dup_line_frac",
    "dup_para_frac",
    "dup_line_char_frac",
    "dup_para_char_frac",
    *(f"top_{n}gram_char_frac" for n in TOP_NGRAM_SIZES),
    *(f"dup_{n}gram_char_frac" for n in DUP_NGRAM_SIZES),
)


def compression_ratio(text: str) -> float:
    """zlib-compressed size over UTF-8 size (level 6): low for text that repeats itself at any
    scale, including within one line and in scripts without spaces; NaN for an empty text."""
    data = text.encode("utf-8", "surrogatepass")
    if not data:
        return math.nan
    return len(zlib.compress(data, 6)) / len(data)


_NAN_SIDE: tuple[float, ...] = (math.nan,) * (len(_REPETITION_NAMES) + 1)


def _side_repetition(texts: Sequence[str]) -> tuple[float, ...]:
    """Repetition statistics of one side (all assistant or all user messages), per message.

    Each statistic is measured within a message, and the side takes the worst message: the
    highest fraction, the lowest compression ratio. Within a message, not across them: a user who
    writes "continue" three times has not written a repetitive instruction. Messages under
    GOPHER_MIN_WORDS words are not measured for the Gopher statistics, nor under
    COMPRESSION_MIN_CHARS characters for the compression ratio; the side reads NaN (never
    rejected) when no message is measured. Only the first REPETITION_MAX_CHARS characters of the
    side are read.
    """
    worst = list(_NAN_SIDE)
    budget = REPETITION_MAX_CHARS
    for text in texts:
        if budget <= 0:
            break
        text = text[:budget]
        budget -= len(text)
        if len(text) >= COMPRESSION_MIN_CHARS:
            ratio = compression_ratio(text)
            if not ratio >= worst[-1]:  # NaN-aware: the first value replaces NaN
                worst[-1] = ratio
        if len(_WORD_RE.findall(text)) < GOPHER_MIN_WORDS:
            continue
        for i, value in enumerate(gopher_repetition(text)):
            if not value <= worst[i]:
                worst[i] = value
    return tuple(worst)


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
    longest_response = 0
    assistant_texts: list[str] = []
    user_texts: list[str] = []

    for message in conversation if conversation is not None else ():
        text = _content(message)
        role = message.get("role")
        size = len(text)
        total_chars += size
        non_printable += non_printable_count(text)
        if role == "assistant":
            turns += 1
            assistant_chars += size
            longest_response = max(longest_response, size)
            if not text.strip():
                empty = True
                continue
            assistant_texts.append(text)
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
            user_texts.append(text)
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
        longest_response,
        *_side_repetition(assistant_texts),
        *_side_repetition(user_texts),
    )


def compute_indicators(conversation: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Indicators of one conversation as a `{column: value}` dict (plain Python scalars).

    `mtld`, `refusal` and `repeated_line_ratio` look at all assistant messages together; an
    empty or whitespace-only assistant message adds to `turns` and sets `empty_response`.
    `longest_response_chars` is the longest assistant message; the `assistant_*`/`user_*`
    repetition columns (Gopher's statistics and `*_compression_ratio`) take each side's worst
    message (`_side_repetition`).
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
