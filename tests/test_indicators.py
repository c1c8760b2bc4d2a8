"""Tests for the cheap per-record quality indicators (engine.signals.indicators)."""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.signals import gopher_kernel, indicators
from engine.signals.indicators import (
    COMPRESSION_MIN_CHARS,
    DUP_NGRAM_SIZES,
    GOPHER_MIN_WORDS,
    INDICATOR_COLUMNS,
    INDICATOR_SCHEMA,
    REFUSAL_PATTERNS,
    REPETITION_MAX_CHARS,
    TOP_NGRAM_SIZES,
    _dup_ngram_chars_hashed,
    _dup_ngram_chars_strings,
    _Joined,
    _required_literal,
    _top_ngram_chars_hashed,
    _top_ngram_chars_strings,
    compression_ratio,
    compute_indicators,
    gopher_duplicate_ngram_chars,
    gopher_repetition,
    gopher_top_ngram_chars,
    gopher_words,
    indicators_frame,
    is_refusal,
    mtld,
    non_printable_count,
    word_tokens,
)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------------------------
# Single-turn basics
# ---------------------------------------------------------------------------------------------


def test_single_turn_hand_checked() -> None:
    conv = [
        msg("system", "Be brief."),  # 9 chars
        msg("user", "What is 2+2?"),  # 12 chars; what, is, 2, 2
        msg("assistant", "It is 4."),  # 8 chars; it, is, 4 -> all unique: MTLD = 3
    ]
    row = compute_indicators(conv)
    assert {k: row[k] for k in list(row)[:12]} == {
        "turns": 1,
        "system_chars": 9,
        "user_chars": 12,
        "assistant_chars": 8,
        "user_words": 4,
        "assistant_words": 3,
        "mtld": 3.0,
        "empty_response": False,
        "refusal": False,
        "repeated_line_ratio": 0.0,
        "non_printable_ratio": 0.0,
        "longest_response_chars": 8,
    }
    # Both sides are under GOPHER_MIN_WORDS and COMPRESSION_MIN_CHARS: nothing is measured.
    repetition = [
        k for k in row if k.startswith(("assistant_", "user_")) and k.endswith(("_frac", "_ratio"))
    ]
    assert len(repetition) == 28
    assert all(math.isnan(row[k]) for k in repetition)


def test_word_tokens_lowercase_unicode() -> None:
    assert word_tokens("Hello, WORLD! it's 2_000") == ["hello", "world", "it", "s", "2_000"]
    assert word_tokens("Ünïcode café") == ["ünïcode", "café"]
    assert word_tokens("") == []


def test_empty_response_cases() -> None:
    assert compute_indicators([msg("user", "hi")])["empty_response"] is True  # no assistant
    assert compute_indicators([])["empty_response"] is True
    assert compute_indicators([msg("user", "hi"), msg("assistant", "")])["empty_response"] is True
    ws = compute_indicators([msg("user", "hi"), msg("assistant", " \n\t\u3000")])
    assert ws["empty_response"] is True
    assert ws["assistant_chars"] == 4
    assert ws["assistant_words"] == 0
    assert math.isnan(ws["mtld"])
    # One good turn does not hide an empty later turn.
    two = [msg("user", "a"), msg("assistant", "fine"), msg("user", "b"), msg("assistant", "  ")]
    assert compute_indicators(two)["empty_response"] is True
    ok = [msg("user", "a"), msg("assistant", "fine"), msg("user", "b"), msg("assistant", "ok")]
    assert compute_indicators(ok)["empty_response"] is False


def test_empty_conversation() -> None:
    row = compute_indicators([])
    assert row["turns"] == 0
    assert row["system_chars"] == row["user_chars"] == row["assistant_chars"] == 0
    assert math.isnan(row["mtld"])
    assert row["repeated_line_ratio"] == 0.0
    assert row["non_printable_ratio"] == 0.0
    assert row["refusal"] is False


def test_missing_content_and_unknown_role_are_tolerated() -> None:
    conv = [{"role": "user", "content": None}, {"role": "tool", "content": "x\x00"}]
    row = compute_indicators(conv)
    assert row["user_chars"] == 0
    assert row["turns"] == 0
    # The unknown role counts towards non-printable ratio only: 1 of 2 characters.
    assert row["non_printable_ratio"] == 0.5


# ---------------------------------------------------------------------------------------------
# MTLD
# ---------------------------------------------------------------------------------------------


def test_mtld_hand_computed_partial_factor() -> None:
    # tokens a a b c, threshold 0.72
    # forward : a (1/1) a (1/2 <= .72 -> factor 1, reset) b (1/1) c (2/2) -> remainder TTR 1,
    #           partial 0 -> factors 1 -> 4 / 1 = 4
    # backward: c (1/1) b (2/2) a (3/3) a (3/4 = .75 > .72) -> no full factor; partial
    #           (1 - .75) / (1 - .72) = 25/28 -> 4 / (25/28) = 112/25 = 4.48
    # MTLD = (4 + 4.48) / 2 = 4.24
    assert mtld(["a", "a", "b", "c"]) == pytest.approx(4.24)


def test_mtld_hand_computed_full_factors() -> None:
    # forward : a b a (2/3 -> factor) b c c (2/3 -> factor), nothing left -> 6 / 2 = 3
    # backward: c c (1/2 -> factor) b a b (2/3 -> factor) a (TTR 1, partial 0) -> 6 / 2 = 3
    assert mtld(["a", "b", "a", "b", "c", "c"]) == pytest.approx(3.0)


def test_mtld_factor_ends_at_exactly_the_threshold() -> None:
    # t0..t17, then t0 seven more times, then x (26 tokens).
    # forward : after token 25 the TTR is 18/25 = 0.72 exactly -> factor (<=, not <);
    #           remainder [x] has TTR 1 -> partial 0 -> 26 / 1 = 26.
    #           (With a strict < the pass would be 26 / ((1 - 19/26) / .28) = 27.04.)
    # backward: x t0 t0 (2/3 -> factor) t0 t0 (factor) t0 t0 (factor) t0 t17..t1 (18 unique,
    #           count 18) t0 (18/19) -> remainder partial (1 - 18/19) / .28
    #           -> 26 / (3 + (1/19) / .28)
    tokens = [f"t{i}" for i in range(18)] + ["t0"] * 7 + ["x"]
    backward = 26 / (3 + (1 / 19) / 0.28)
    assert mtld(tokens) == pytest.approx((26 + backward) / 2)


def test_mtld_edge_cases() -> None:
    assert math.isnan(mtld([]))
    # All unique: no factor and TTR 1 in the remainder -> defined as len(tokens).
    assert mtld(["a"]) == 1.0
    assert mtld(["a", "b", "c", "d"]) == 4.0
    # a a | a a | a : two factors, remainder TTR 1 (partial 0) -> 5 / 2 both ways.
    assert mtld(["a"] * 5) == pytest.approx(2.5)
    # Threshold is a parameter.
    assert mtld(["a", "b", "a"], threshold=0.5) != mtld(["a", "b", "a"])
    with pytest.raises(ValueError):
        mtld(["a"], threshold=1.0)


def test_mtld_is_over_all_assistant_turns_concatenated() -> None:
    conv = [
        msg("user", "Hello there"),
        msg("assistant", "Hi! How can I help?"),
        msg("user", "Tell me a joke."),
        msg("assistant", "Why did the chicken cross the road?\nHi! How can I help?"),
    ]
    tokens = word_tokens(
        "Hi! How can I help? Why did the chicken cross the road? Hi! How can I help?"
    )
    # 17 tokens; both passes complete one factor at token 16 (11/16 = .6875) and leave one
    # token (TTR 1, partial 0) -> 17 / 1 = 17 each way.
    assert mtld(tokens) == pytest.approx(17.0)
    assert compute_indicators(conv)["mtld"] == pytest.approx(17.0)


# ---------------------------------------------------------------------------------------------
# Multi-turn aggregation
# ---------------------------------------------------------------------------------------------


def test_multi_turn_aggregation() -> None:
    conv = [
        msg("system", "S"),
        msg("user", "Hello there"),  # 11 chars, 2 words
        msg("assistant", "Hi! How can I help?"),  # 19 chars, 5 words
        msg("user", "Tell me a joke."),  # 15 chars, 4 words
        # 35 + 1 + 19 = 55 chars, 7 + 5 = 12 words
        msg("assistant", "Why did the chicken cross the road?\nHi! How can I help?"),
    ]
    row = compute_indicators(conv)
    assert row["turns"] == 2
    assert row["system_chars"] == 1
    assert row["user_chars"] == 26
    assert row["assistant_chars"] == 74
    assert row["user_words"] == 6
    assert row["assistant_words"] == 17
    # Assistant lines: "Hi! How can I help?", "Why did ...", "Hi! How can I help?" (repeat
    # across turns) -> 1 / 3.
    assert row["repeated_line_ratio"] == pytest.approx(1 / 3)
    assert row["empty_response"] is False
    assert row["refusal"] is False


def test_repeated_line_ratio() -> None:
    text = "step one\n\n  step one  \nstep two\nstep one\n   \n"
    # Non-blank stripped lines: step one, step one, step two, step one -> 2 repeats of 4.
    row = compute_indicators([msg("user", "step one\nstep one"), msg("assistant", text)])
    assert row["repeated_line_ratio"] == pytest.approx(0.5)
    # Repeats in the user turn do not count.
    user_only = compute_indicators([msg("user", "a\na"), msg("assistant", "b")])
    assert user_only["repeated_line_ratio"] == 0.0
    # Only blank lines -> 0.0.
    assert compute_indicators([msg("assistant", "\n \n")])["repeated_line_ratio"] == 0.0


# ---------------------------------------------------------------------------------------------
# Non-Latin scripts
# ---------------------------------------------------------------------------------------------


def test_korean_and_chinese_row() -> None:
    conv = [
        msg("user", "안녕하세요, 반갑습니다"),  # 5 + 1 + 1 + 5 = 12 chars, 2 tokens
        msg("assistant", "你好，世界。你好，世界。"),  # 12 chars; 你好 世界 你好 世界
    ]
    row = compute_indicators(conv)
    assert row["user_chars"] == 12
    assert row["user_words"] == 2
    assert row["assistant_chars"] == 12
    assert row["assistant_words"] == 4
    # forward: 你好 世界 你好 (2/3 -> factor) 世界 (TTR 1) -> 4; backward likewise -> 4.
    assert row["mtld"] == pytest.approx(4.0)
    assert row["non_printable_ratio"] == 0.0
    assert row["empty_response"] is False
    # CJK without spaces or punctuation is a single \w+ token (documented limitation).
    assert word_tokens("我喜欢学习中文") == ["我喜欢学习中文"]


# ---------------------------------------------------------------------------------------------
# Non-printable characters
# ---------------------------------------------------------------------------------------------


def test_control_characters_counted() -> None:
    conv = [
        msg("user", "a\x00b"),  # 3 chars, 1 non-printable
        msg("assistant", "ok\x07\n\tfine\r\n"),  # 11 chars, 1 non-printable (\n \t \r are fine)
    ]
    row = compute_indicators(conv)
    assert row["user_chars"] + row["assistant_chars"] == 14
    assert row["non_printable_ratio"] == pytest.approx(2 / 14)


def test_emoji_with_zwj_not_counted() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man ZWJ woman ZWJ girl
    heart = "\u2764\ufe0f"  # heart + variation selector-16
    scotland = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    conv = [msg("user", "hi 👋"), msg("assistant", f"Family {family} {heart} {scotland}")]
    assert compute_indicators(conv)["non_printable_ratio"] == 0.0
    assert non_printable_count(family + heart + scotland) == 0


def test_non_printable_count_categories() -> None:
    assert non_printable_count("plain text\n\twith\r\nbreaks") == 0
    assert non_printable_count("\x00\x07\x1b\x7f\x85") == 5  # Cc
    assert non_printable_count("\u200b\ufeff\u00ad\u202e") == 4  # Cf (ZWSP, BOM, SHY, RLO)
    assert non_printable_count("\ue000\U000f0000") == 2  # Co, BMP and astral
    assert non_printable_count("\u0378\U000effff") == 2  # Cn, BMP and astral
    assert non_printable_count("\ud800") == 1  # Cs (lone surrogate)
    assert non_printable_count("\U0001f600\U00020000") == 0  # emoji, CJK ext. B
    # Astral results are cached: asking twice gives the same answer.
    assert non_printable_count("\U000f0000\U000f0000") == 2


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------

REFUSALS = [
    "As an AI language model, I cannot browse the internet.",
    "Well, as a language model I do not know.",
    "AS AN AI ASSISTANT I must decline.",
    "I'm sorry, but I cannot help with that.",
    "I’m sorry, but I can’t help with that.",
    "I am sorry, but I can't do that.",
    "I am sorry but I cannot comply.",
    "Unfortunately I cannot fulfill this request.",
    "I can't assist with that request.",
    "I am unable to provide medical advice.",
    "I'm not able to provide that information.",
    "This violates OpenAI's content policy.",
    "That is against OpenAI’s use-case policies.",
    "It is not appropriate for me to comment.",
    "I don't have personal opinions on politics.",
    "I don’t have personal feelings.",
]

NON_REFUSALS = [
    "I'm sorry to hear that! Here is how to fix it: restart the router.",
    "I'm sorry, but here is the answer anyway: 42.",
    "GPT-2 is a language model trained by OpenAI.",
    "I am able to help. Let's start.",
    "The function cannot fail.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusal_positive(text: str) -> None:
    assert is_refusal(text)
    assert compute_indicators([msg("user", "q"), msg("assistant", text)])["refusal"] is True


@pytest.mark.parametrize("text", NON_REFUSALS)
def test_refusal_negative(text: str) -> None:
    assert not is_refusal(text)
    assert compute_indicators([msg("user", "q"), msg("assistant", text)])["refusal"] is False


def test_refusal_only_looks_at_assistant_text() -> None:
    conv = [
        msg("system", "Never say 'as an AI language model'."),
        msg("user", "Pretend: I am unable to sleep."),
        msg("assistant", "Try a warm drink before bed."),
    ]
    assert compute_indicators(conv)["refusal"] is False
    conv.append(msg("assistant", "As an AI language model, I can't sleep."))
    assert compute_indicators(conv)["refusal"] is True


def test_refusal_patterns_constant() -> None:
    assert isinstance(REFUSAL_PATTERNS, tuple)
    assert all(isinstance(p, str) for p in REFUSAL_PATTERNS)
    # Every pattern is exercised by at least one positive example.
    for pattern in REFUSAL_PATTERNS:
        assert any(re.search(pattern, t.lower()) for t in REFUSALS), pattern


_FULL_REFUSAL_RE = re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in REFUSAL_PATTERNS) + ")")
_PHRASES = [*REFUSALS, *NON_REFUSALS, "I’M SORRY, BUT I CAN’T", "openai's ", " but i ", "polic"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PHRASES), st.text(max_size=20)), max_size=6))
def test_property_refusal_prefilter_is_exact(parts: list[str]) -> None:
    # The substring prefilter must never change the answer of the full alternation.
    text = " ".join(parts)
    assert is_refusal(text) == (_FULL_REFUSAL_RE.search(text.lower()) is not None)


def test_required_literal() -> None:
    assert _required_literal("as an ai assistant") == "as an ai assistant"
    assert _required_literal("i(?:'m| am) sorry,? but i (?:cannot|can't)") == " but i "
    assert _required_literal("ab[cd]+efgh") == "efgh"
    assert _required_literal("abc?def") == "def"
    assert _required_literal("x\\sabcd") == "abcd"
    assert _required_literal("abcd|efgh") is None  # top-level alternation
    assert _required_literal("(?:a(?:b))cde") is None  # nested group
    assert _required_literal("ab?cd") is None  # nothing long enough


# ---------------------------------------------------------------------------------------------
# Batch frame
# ---------------------------------------------------------------------------------------------

SAMPLE = [
    [msg("system", "Be brief."), msg("user", "What is 2+2?"), msg("assistant", "It is 4.")],
    [msg("user", "hi")],
    [],
    [msg("user", "안녕"), msg("assistant", "你好，世界。\n你好，世界。")],
    [msg("user", "x\x00"), msg("assistant", "As an AI language model, no.")],
]


def _expected_dtype(name: str) -> np.dtype:
    return np.dtype(INDICATOR_SCHEMA.field(name).type.to_pandas_dtype())


def test_frame_columns_and_dtypes_match_schema() -> None:
    frame = indicators_frame(SAMPLE)
    assert list(frame.columns) == list(INDICATOR_SCHEMA.names) == list(INDICATOR_COLUMNS)
    assert len(frame) == len(SAMPLE)
    for name in INDICATOR_SCHEMA.names:
        assert frame[name].dtype == _expected_dtype(name), name
    assert frame["turns"].dtype == np.int32
    assert frame["system_chars"].dtype == np.int64
    assert frame["mtld"].dtype == np.float64
    assert frame["refusal"].dtype == np.bool_


def test_frame_equals_rowwise() -> None:
    frame = indicators_frame(SAMPLE)
    expected = pd.DataFrame([compute_indicators(c) for c in SAMPLE]).astype(
        {name: _expected_dtype(name) for name in INDICATOR_COLUMNS}
    )
    pd.testing.assert_frame_equal(frame, expected)
    assert list(frame["refusal"]) == [False, False, False, False, True]
    assert list(frame["turns"]) == [1, 0, 0, 1, 1]


def test_frame_empty_input() -> None:
    frame = indicators_frame([])
    assert len(frame) == 0
    assert list(frame.columns) == list(INDICATOR_COLUMNS)
    for name in INDICATOR_COLUMNS:
        assert frame[name].dtype == _expected_dtype(name), name


def test_frame_accepts_arrow_style_numpy_arrays() -> None:
    # Spark/Arrow hand a list<struct> column to pandas as object arrays of dicts.
    column = pd.Series([np.array(c, dtype=object) for c in SAMPLE], dtype=object)
    pd.testing.assert_frame_equal(indicators_frame(column.tolist()), indicators_frame(SAMPLE))
    pd.testing.assert_frame_equal(indicators_frame(column), indicators_frame(SAMPLE))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=80)}
)
conversations = st.lists(messages, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(conversations, max_size=5))
def test_property_random_conversations(batch: list[list[dict[str, str]]]) -> None:
    frame = indicators_frame(batch)
    assert len(frame) == len(batch)
    for i, conv in enumerate(batch):
        row = compute_indicators(conv)
        for role in ("system", "user", "assistant"):
            assert row[f"{role}_chars"] == sum(len(m["content"]) for m in conv if m["role"] == role)
        assert row["turns"] == sum(m["role"] == "assistant" for m in conv)
        assert row["assistant_words"] == sum(
            len(word_tokens(m["content"])) for m in conv if m["role"] == "assistant"
        )
        assert 0.0 <= row["repeated_line_ratio"] <= 1.0
        assert 0.0 <= row["non_printable_ratio"] <= 1.0
        if row["assistant_words"] == 0:
            assert math.isnan(row["mtld"])
        else:
            assert row["mtld"] > 0.0
        assert row["empty_response"] == (
            row["turns"] == 0
            or any(not m["content"].strip() for m in conv if m["role"] == "assistant")
        )
        got = frame.iloc[i].to_dict()
        for name, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[name])
            else:
                assert got[name] == value, name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abcde", min_size=1, max_size=3), max_size=60))
def test_property_mtld(tokens: list[str]) -> None:
    value = mtld(tokens)
    if not tokens:
        assert math.isnan(value)
        return
    assert value > 0.0
    if len(set(tokens)) == len(tokens):
        assert value == len(tokens)


# ---------------------------------------------------------------------------------------------
# Repetition (Gopher's rules) and compression
# ---------------------------------------------------------------------------------------------


def test_gopher_words_split_punctuation_keep_case() -> None:
    assert gopher_words("Hello, World!! it's 2_000...") == [
        "Hello",
        ",",
        "World",
        "!!",
        "it",
        "'",
        "s",
        "2_000",
        "...",
    ]
    assert gopher_words(" \n\t") == []


def test_gopher_repetition_hand_worked_lines() -> None:
    # lines a | b | a: one duplicate of three, 1 of 5 characters; one paragraph, no duplicate.
    # words a b a: 2-grams "a b", "b a" (once each; the first wins the tie): 3 / 5;
    # the 3-gram "a b a": 5 / 5; no 4-gram, no 5-gram.
    stats = dict(zip(NAMES, gopher_repetition("a\nb\na"), strict=True))
    assert stats["dup_line_frac"] == pytest.approx(1 / 3)
    assert stats["dup_line_char_frac"] == pytest.approx(1 / 5)
    assert stats["dup_para_frac"] == 0.0
    assert stats["dup_para_char_frac"] == 0.0
    assert stats["top_2gram_char_frac"] == pytest.approx(3 / 5)
    assert stats["top_3gram_char_frac"] == pytest.approx(1.0)
    assert stats["top_4gram_char_frac"] == 0.0
    assert all(stats[f"dup_{n}gram_char_frac"] == 0.0 for n in DUP_NGRAM_SIZES)


def test_gopher_repetition_hand_worked_paragraphs() -> None:
    text = "p one\n\np two\n\n\np one\n"  # 21 characters; stripped: 3 paragraphs
    stats = dict(zip(NAMES, gopher_repetition(text), strict=True))
    assert stats["dup_para_frac"] == pytest.approx(1 / 3)
    assert stats["dup_para_char_frac"] == pytest.approx(5 / 21)
    # lines (split on \n+, not stripped): "p one", "p two", "p one", "" -> 1 of 4, 5 of 21.
    assert stats["dup_line_frac"] == pytest.approx(1 / 4)
    assert stats["dup_line_char_frac"] == pytest.approx(5 / 21)


def test_gopher_ngrams_hand_worked() -> None:
    words = list("abcde" * 3)  # joined with spaces: a text of 29 characters
    # 5-grams: abcde bcdea cdeab deabc eabcd are new; at 5 "abcde" repeats (+5, jump to 10),
    # at 10 it repeats again (+5, jump to 15, past the last start 10): 10 characters.
    assert gopher_duplicate_ngram_chars(words, 5) == 10
    # 10-grams start at 0..5; the one at 5 equals the one at 0: 10 characters.
    assert gopher_duplicate_ngram_chars(words, 10) == 10
    # 11-grams start at 0..4, all different: nothing repeats.
    assert gopher_duplicate_ngram_chars(words, 11) == 0
    # "a b" .. "d e" occur 3 times, "e a" twice; the first of the most frequent: "a b".
    assert gopher_top_ngram_chars(words, 2) == 3 * 3
    assert gopher_top_ngram_chars(words, 16) == 0
    stats = dict(zip(NAMES, gopher_repetition(" ".join(words), words), strict=True))
    assert stats["dup_5gram_char_frac"] == pytest.approx(10 / 29)
    assert stats["top_2gram_char_frac"] == pytest.approx(9 / 29)
    # Joins differ as in datatrove: top n-grams keep their spaces, duplicate n-grams drop them.
    assert gopher_duplicate_ngram_chars(["ab", "c", "a", "bc"], 2) == 3  # "abc" == "abc"
    assert gopher_top_ngram_chars(["ab", "c", "a", "bc"], 2) == 4  # "ab c" != "a bc"


def test_gopher_repetition_empty_text_is_nan() -> None:
    assert all(math.isnan(v) for v in gopher_repetition(""))


NAMES = (
    "dup_line_frac",
    "dup_para_frac",
    "dup_line_char_frac",
    "dup_para_char_frac",
    *(f"top_{n}gram_char_frac" for n in TOP_NGRAM_SIZES),
    *(f"dup_{n}gram_char_frac" for n in DUP_NGRAM_SIZES),
)


def _datatrove_reference(text: str, words: list[str]) -> dict[str, float]:
    """datatrove's GopherRepetitionFilter.filter, written out from its source (v0.x), with each
    statistic recorded instead of compared with its threshold."""

    def find_duplicates(x: list[str]) -> tuple[int, int]:
        unique_x: set[str] = set()
        duplicate_chars = duplicate_elements = 0
        for element in x:
            if element in unique_x:
                duplicate_chars += len(element)
                duplicate_elements += 1
            else:
                unique_x.add(element)
        return duplicate_elements, duplicate_chars

    def find_all_duplicate(words: list[str], n: int) -> int:
        n_words, unique, repeated_chars, idx = len(words), set(), 0, 0
        while idx < n_words - n + 1:
            n_gram = "".join(words[idx : idx + n])
            if n_gram in unique:
                repeated_chars += len(n_gram)
                idx += n
            else:
                unique.add(n_gram)
                idx += 1
        return repeated_chars

    out: dict[str, float] = {}
    paragraphs = re.split(r"\n{2,}", text.strip())
    dups, chars = find_duplicates(paragraphs)
    out["dup_para_frac"], out["dup_para_char_frac"] = dups / len(paragraphs), chars / len(text)
    lines = re.split("\n+", text)
    dups, chars = find_duplicates(lines)
    out["dup_line_frac"], out["dup_line_char_frac"] = dups / len(lines), chars / len(text)
    for n in (2, 3, 4):
        n_grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        top = 0
        if n_grams:
            gram, count = Counter(n_grams).most_common(1)[0]
            top = len(gram) * count
        out[f"top_{n}gram_char_frac"] = top / len(text)
    for n in range(5, 11):
        out[f"dup_{n}gram_char_frac"] = find_all_duplicate(words, n) / len(text)
    return out


repetitive_text = st.lists(
    st.sampled_from(["the", "cat", "sat", "on", "a", "mat", ".", ",", "\n", "\n\n", "  "]),
    min_size=1,
    max_size=120,
).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(repetitive_text)
def test_property_gopher_matches_datatrove_reference(text: str) -> None:
    words = gopher_words(text)
    expected = _datatrove_reference(text, words)
    got = dict(zip(NAMES, gopher_repetition(text), strict=True))
    assert got == pytest.approx(expected)
    for name in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
        assert 0.0 <= got[name] <= 1.0
    for n in DUP_NGRAM_SIZES:  # datatrove asserts repeated characters <= the words' characters
        assert 0.0 <= got[f"dup_{n}gram_char_frac"] <= len("".join(words)) / len(text)


long_words = st.lists(
    st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "ma", "t", "ca", ".", ","]),
    min_size=10,
    max_size=700,
)


@settings(max_examples=150, deadline=None)
@given(long_words)
def test_property_hashed_ngram_walk_equals_the_string_walk(words: list[str]) -> None:
    # Long messages take the hashed path, short ones the string walk; both are datatrove's.
    # "ma"+"t" == "mat" and "ca"+"t" == "cat": joins that only the strings tell apart.
    spaced, plain = _Joined(words, " "), _Joined(words, "")
    for n in TOP_NGRAM_SIZES:
        assert _top_ngram_chars_hashed(spaced, n) == _top_ngram_chars_strings(words, n)
    for n in DUP_NGRAM_SIZES:
        assert _dup_ngram_chars_hashed(plain, n) == _dup_ngram_chars_strings(words, n)


def _string_walks(words: list[str]) -> list[int]:
    tops = [_top_ngram_chars_strings(words, n) if len(words) >= n else 0 for n in TOP_NGRAM_SIZES]
    dups = [_dup_ngram_chars_strings(words, n) if len(words) >= n else 0 for n in DUP_NGRAM_SIZES]
    return tops + dups


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["the", "cat", "sat", "ma", "t", "mat", "ca", "."]), max_size=400))
def test_property_compiled_ngram_kernel_equals_the_string_walks(words: list[str]) -> None:
    statistics = gopher_kernel.ngram_statistics(words)
    assert statistics is not None  # numba is in the project's venv
    assert statistics.tolist() == _string_walks(words)


def test_uncompiled_ngram_kernel_is_the_same_function() -> None:
    # The kernel's Python source, run by the interpreter: what numba compiles is what is tested.
    words = gopher_words(("ab c a bc the cat sat. " * 9) + "the cat sat on the mat " * 4)
    with np.errstate(over="ignore"):
        plain = gopher_kernel.ngram_statistics(words, kernel=gopher_kernel._kernel)
    assert plain is not None
    assert plain.tolist() == _string_walks(words)
    assert plain.tolist() == gopher_kernel.ngram_statistics(words).tolist()


def test_kernel_collisions_fall_back_to_the_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Base 0 hashes every n-gram by its last word (or character): collisions everywhere.
    text = ("one two three four five six seven eight nine ten. " * 3) + "ab c a bc x y z"
    words = gopher_words(text)
    colliding = gopher_kernel.ngram_statistics(words, base=0)
    assert colliding is not None and (colliding == -1).any()
    expected = gopher_repetition(text)
    monkeypatch.setattr(
        indicators, "ngram_statistics", lambda w: gopher_kernel.ngram_statistics(w, base=0)
    )
    assert gopher_repetition(text) == expected
    assert dict(zip(NAMES, expected, strict=True)) == pytest.approx(
        _datatrove_reference(text, words)
    )
    monkeypatch.setattr(indicators, "ngram_statistics", lambda w: None)  # no numba
    assert gopher_repetition(text) == expected


class _Colliding(_Joined):
    """Every n-gram hashes alike: the worst collision there can be."""

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        begin, end, hashes = super().ngrams(n)
        return begin, end, np.zeros_like(hashes)


def test_hash_collisions_never_change_a_result() -> None:
    words = gopher_words(("one two three four five six seven eight nine ten. " * 3) + "x y z")
    for n in TOP_NGRAM_SIZES:
        expected = _top_ngram_chars_strings(words, n)
        assert _top_ngram_chars_hashed(_Colliding(words, " "), n) == expected
    for n in DUP_NGRAM_SIZES:
        expected = _dup_ngram_chars_strings(words, n)
        assert expected > 0
        assert _dup_ngram_chars_hashed(_Colliding(words, ""), n) == expected


def test_compression_ratio_values() -> None:
    assert math.isnan(compression_ratio(""))
    text = "Any text at all, é and 字 included."
    data = text.encode("utf-8")
    assert compression_ratio(text) == len(zlib.compress(data, 6)) / len(data)
    repeated = "The quick brown fox jumps over the lazy dog. " * 200
    assert compression_ratio(repeated) < 0.02
    varied = " ".join(f"w{i * 7919 % 10007}" for i in range(400))
    assert compression_ratio(varied) > 0.3


SENTENCE = "The quick brown fox jumps over the lazy dog. "


def test_degenerate_answer_one_sentence_on_one_line() -> None:
    """The issue's row: one sentence repeated on a single line (2 MB). `repeated_line_ratio` is
    0 for it; the new columns are not."""
    answer = (SENTENCE * (2_000_000 // len(SENTENCE) + 1))[:2_000_000]
    row = compute_indicators([msg("user", "Write a story."), msg("assistant", answer)])
    assert row["repeated_line_ratio"] == 0.0
    assert row["longest_response_chars"] == 2_000_000
    assert row["assistant_compression_ratio"] < 0.01
    # One 9-token sentence over and over: every 5..10-gram repeats after the first sentence;
    # spaces are dropped from the joined n-grams, so the fraction tops out near 35/45 = 0.78.
    for n in DUP_NGRAM_SIZES:
        assert row[f"assistant_dup_{n}gram_char_frac"] > 0.75
    assert math.isnan(row["user_compression_ratio"])  # a short instruction is not measured


def test_side_statistics_are_per_message_and_take_the_worst() -> None:
    clean = " ".join(f"word{i}" for i in range(80))  # 80 distinct words
    looping = SENTENCE * 12  # 108 words, one sentence repeated
    row = compute_indicators(
        [
            msg("user", "Go."),
            msg("assistant", clean),
            msg("user", "More."),
            msg("assistant", looping),
        ]
    )
    alone = compute_indicators([msg("user", "Go."), msg("assistant", looping)])
    for name in NAMES:
        assert row[f"assistant_{name}"] == alone[f"assistant_{name}"], name
    assert row["assistant_compression_ratio"] == compression_ratio(looping)
    # Within a message, not across: the same short request three times is no repetition.
    again = [msg("user", "continue"), msg("assistant", clean)] * 3
    stats = compute_indicators(again)
    assert all(math.isnan(stats[f"user_{name}"]) for name in NAMES)
    assert stats["assistant_dup_para_frac"] == 0.0  # three equal answers, each measured alone


def test_side_statistics_minimum_sizes() -> None:
    short = "yes yes yes yes"  # repetitive but under GOPHER_MIN_WORDS words
    row = compute_indicators([msg("user", short), msg("assistant", short)])
    assert all(math.isnan(row[f"assistant_{name}"]) for name in NAMES)
    assert math.isnan(row["assistant_compression_ratio"])
    at_min = " ".join(["yes"] * GOPHER_MIN_WORDS)
    row = compute_indicators([msg("user", "q"), msg("assistant", at_min)])
    assert row["assistant_dup_5gram_char_frac"] > 0.5
    below = compute_indicators([msg("user", "q"), msg("assistant", at_min[4:])])  # 49 words
    assert math.isnan(below["assistant_dup_5gram_char_frac"])
    assert len(at_min) == COMPRESSION_MIN_CHARS - 1
    assert math.isnan(row["assistant_compression_ratio"])
    row = compute_indicators([msg("user", "q"), msg("assistant", at_min + "!")])
    assert row["assistant_compression_ratio"] < 0.2
    # A script without spaces is one \w+ run: no Gopher statistics, but a compression ratio.
    han = "你好世界" * 300
    row = compute_indicators([msg("user", "q"), msg("assistant", han)])
    assert math.isnan(row["assistant_dup_5gram_char_frac"])
    assert row["assistant_compression_ratio"] < 0.05


def test_side_statistics_read_only_the_first_max_chars() -> None:
    words = [f"w{i}" for i in range(REPETITION_MAX_CHARS)]
    clean = " ".join(words)[:REPETITION_MAX_CHARS]  # exactly the budget, nothing repeats
    looping = SENTENCE * 20
    row = compute_indicators([msg("user", "q"), msg("assistant", clean), msg("assistant", looping)])
    assert row["assistant_dup_5gram_char_frac"] == 0.0  # the looping turn is past the budget
    assert row["assistant_compression_ratio"] > 0.2
    assert row["longest_response_chars"] == REPETITION_MAX_CHARS  # the length is exact
    head = compute_indicators([msg("user", "q"), msg("assistant", clean + looping)])
    assert head["assistant_dup_5gram_char_frac"] == row["assistant_dup_5gram_char_frac"]
