"""Every reason Winnow gives for a row it did not select, in one place.

Reasons are part of the public contract (`scores.parquet`'s `reason`, `quarantine.jsonl`, the
manifest's counts): choose them once, keep them stable. The ones Winnow decides itself are
reserved: a user filter may not reuse them, or the counts would mix two different causes.
"""

from __future__ import annotations

# -- Quarantine (ingest): the record could not be read as a conversation -----------------------
INVALID_JSON = "invalid_json"
TOO_LARGE = "too_large"
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_SCHEMA = "unknown_schema"
UNKNOWN_ROLE = "unknown_role"
EMPTY_CONVERSATION = "empty_conversation"
INVALID_UTF8 = "invalid_utf8"
TRUNCATED_RECORD = "truncated_record"  # the file ends inside a record
MISSING_FIELD = "missing_field"  # written as missing_field:<field>
WRONG_TYPE = "wrong_type"  # written as wrong_type:<field>

QUARANTINE_REASONS = (
    INVALID_JSON,
    TOO_LARGE,
    NOT_AN_OBJECT,
    UNKNOWN_SCHEMA,
    UNKNOWN_ROLE,
    EMPTY_CONVERSATION,
    INVALID_UTF8,
    TRUNCATED_RECORD,
)
QUARANTINE_PREFIXES = (MISSING_FIELD, WRONG_TYPE)


def missing_field(name: str) -> str:
    return f"{MISSING_FIELD}:{name}"


def wrong_type(name: str) -> str:
    return f"{WRONG_TYPE}:{name}"


# -- Signals: why a signal is NaN for a row (the `<signal>_reason` columns) --------------------
NO_SCORABLE_ANSWER = "no_scorable_answer"  # lm: no assistant turn with an instruction before it
LM_PROMPT_TOO_LONG = "lm_prompt_too_long"  # lm (definition cherry): the prompt fills max_length
JUDGE_UNPARSED = "judge_unparsed"  # the judge's reply gave no score
JUDGE_NO_TURN = "judge_no_turn"  # no assistant turn with a user turn before it
JUDGE_INJECTION = "judge_injection"  # record text addresses the grader: lowest score, no call
RM_NO_TURN = "rm_no_turn"  # reward model: no (instruction, response) pair to score

# -- Selection (select stage), in the order they are decided ----------------------------------
EXACT_DUPLICATE = "exact_duplicate"
LANG_NOT_ALLOWED = "lang_not_allowed"
SCORE_MISSING = "score_missing"  # the ranking score is NaN and its signal gave no reason
NEAR_DUPLICATE = "near_duplicate"
SEMANTIC_DUPLICATE = "semantic_duplicate"
TOO_SIMILAR = "too_similar"  # deita: too close to a row already kept
BELOW_BUDGET = "below_budget"

# Hygiene (select.hygiene, engine.selection.hygiene): applied under every preset, after the
# configured filters. The instruction side's reasons carry the `instruction_` prefix.
DUPLICATE_LINES = "duplicate_lines"
DUPLICATE_PARAGRAPHS = "duplicate_paragraphs"
TOP_NGRAM_REPETITION = "top_ngram_repetition"
REPETITIVE_NGRAMS = "repetitive_ngrams"
LOW_COMPRESSION_RATIO = "low_compression_ratio"
RESPONSE_TOO_LONG = "response_too_long"
RESPONSE_TOO_MANY_TOKENS = "response_too_many_tokens"
INSTRUCTION_PREFIX = "instruction_"
_SIDED_HYGIENE = (
    DUPLICATE_LINES,
    DUPLICATE_PARAGRAPHS,
    TOP_NGRAM_REPETITION,
    REPETITIVE_NGRAMS,
    LOW_COMPRESSION_RATIO,
)
HYGIENE_REASONS = (
    *_SIDED_HYGIENE,
    *(INSTRUCTION_PREFIX + reason for reason in _SIDED_HYGIENE),
    RESPONSE_TOO_LONG,
    RESPONSE_TOO_MANY_TOKENS,
)

# Presets' own rules (the paper's threshold), e.g. `ifd` drops IFD >= 1.
IFD_NOT_BELOW_1 = "ifd_not_below_1"
IFD_ABOVE_1 = "ifd_above_1"  # cherry: Cherry LLM keeps IFD == 1 (`if mean_rate > 1: continue`)
IFD_PPL_NOT_BELOW_1 = "ifd_ppl_not_below_1"
ALPAGASUS_BELOW_4_5 = "judge_alpagasus_below_4.5"

RESERVED_REASONS = (
    EXACT_DUPLICATE,
    BELOW_BUDGET,
    NEAR_DUPLICATE,
    SEMANTIC_DUPLICATE,
    TOO_SIMILAR,
    LANG_NOT_ALLOWED,
    SCORE_MISSING,
    NO_SCORABLE_ANSWER,
    LM_PROMPT_TOO_LONG,
    JUDGE_UNPARSED,
    JUDGE_NO_TURN,
    JUDGE_INJECTION,
    RM_NO_TURN,
    IFD_NOT_BELOW_1,
    IFD_ABOVE_1,
    IFD_PPL_NOT_BELOW_1,
    ALPAGASUS_BELOW_4_5,
    *HYGIENE_REASONS,
    *QUARANTINE_REASONS,
)

# -- The default filters' reasons: not reserved, a job file writes them itself -----------------
EMPTY_RESPONSE = "empty_response"
REFUSAL = "refusal"
NON_PRINTABLE = "non_printable"
REPEATED_LINES = "repeated_lines"


def is_reserved(reason: str) -> bool:
    """True for a reason Winnow gives itself (a user filter must choose another name)."""
    return (
        reason in RESERVED_REASONS
        or reason.startswith("quarantine")
        or any(reason.startswith(f"{prefix}:") for prefix in QUARANTINE_PREFIXES)
    )
