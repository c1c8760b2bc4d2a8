"""Hygiene rules: degenerate rows that no preset may select (`select.hygiene`).

They run for every preset, after the configured `select.filters` and before the preset's own rule,
so a job that replaces `filters:` keeps them. Each rule reads an indicator column computed in
ingest (`engine.signals.indicators`) and rejects with its own reason (`engine.reasons`); `null`
switches a rule (or a side: `response`, `instruction`) off, `enabled: false` all of them.

The statistics are Gopher's repetition rules (Rae et al. 2021, table A1, as datatrove's
`GopherRepetitionFilter` computes them), measured per message on messages of 50+ words, plus a
zlib compression ratio and length caps. Gopher's thresholds were set for web documents; on chat
data they reject songs with a chorus, code, JSON and markdown tables (on a 3,971-row ShareGPT
sample its duplicate 5-gram rule alone rejects 28% of rows, nearly all of them good answers), so
the defaults here are Winnow's, looser, and aimed at degenerate text (a sentence repeated to the
end, a loop of one phrase). `GOPHER_THRESHOLDS` holds the paper's values for anyone who wants them.

Measured (first matching reason): the defaults reject 0 of 9,229 Alpaca rows, 0 of 2,996 Dolly
rows and 11 of 3,971 ShareGPT rows (a 40 kB worksheet of blanks, ASCII art, a 256-cell table of
one phrase, scrambled text, a looping user story); Gopher's thresholds reject 82, 26 and 1,451.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator

from engine import reasons as R
from engine.selection.filters import Rule
from engine.signals.indicators import DUP_NGRAM_SIZES, TOP_NGRAM_SIZES
from engine.stages.contract import Strict

__all__ = ["GOPHER_THRESHOLDS", "HygieneSpec", "RepetitionSpec"]

Fraction = Annotated[float, Field(gt=0, le=1)]

# Gopher's table A1 (Rae et al. 2021): reject a document above any of these.
GOPHER_THRESHOLDS: dict[str, Any] = {
    "dup_line_frac": 0.30,
    "dup_para_frac": 0.30,
    "dup_line_char_frac": 0.20,
    "dup_para_char_frac": 0.20,
    "top_ngram_char_frac": {2: 0.20, 3: 0.18, 4: 0.16},
    "dup_ngram_char_frac": {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
}


def _per_n(sizes: tuple[int, ...], value: float) -> dict[int, float | None]:
    return dict.fromkeys(sizes, value)


class RepetitionSpec(Strict):
    """Thresholds on one side's repetition statistics (its worst message of 50+ words): a rule
    rejects a row above its threshold (below, for the compression ratio); `null` switches it off."""

    # Line and paragraph counts: off. Code repeats short lines (closing braces) and songs repeat
    # their chorus; the character fractions weigh a repeat by its size instead, and
    # `select.filters`' `repeated_line_ratio > 0.5` still counts lines.
    dup_line_frac: Fraction | None = None
    dup_para_frac: Fraction | None = None
    dup_line_char_frac: Fraction | None = 0.7
    dup_para_char_frac: Fraction | None = 0.5
    top_ngram_char_frac: dict[int, Fraction | None] | None = Field(
        default_factory=lambda: _per_n(TOP_NGRAM_SIZES, 0.5),
        description="n (2-4) -> threshold on the most frequent n-gram's character fraction",
    )
    # A text that is one sentence repeated reaches about 0.78 (the n-grams are joined without
    # their spaces, the text's length counts them).
    dup_ngram_char_frac: dict[int, Fraction | None] | None = Field(
        default_factory=lambda: _per_n(DUP_NGRAM_SIZES, 0.6),
        description="n (5-10) -> threshold on the character fraction of repeated n-grams",
    )
    min_compression_ratio: Fraction | None = Field(
        default=0.08, description="zlib size / text size of a message of 200+ characters"
    )

    @field_validator("top_ngram_char_frac", "dup_ngram_char_frac")
    @classmethod
    def _known_sizes(
        cls, value: dict[int, float | None] | None, info: ValidationInfo
    ) -> dict[int, float | None] | None:
        if value is None:
            return None
        sizes = TOP_NGRAM_SIZES if info.field_name == "top_ngram_char_frac" else DUP_NGRAM_SIZES
        unknown = sorted(set(value) - set(sizes))
        if unknown:
            known = ", ".join(map(str, sizes))
            raise ValueError(f"no statistic for n = {unknown}; n is one of {known}")
        return value

    def rules(self, side: str, prefix: str) -> list[Rule]:
        """Rules on the `<side>_*` indicator columns, reasons prefixed with `prefix`."""

        def rule(column: str, op: str, value: float, reason: str) -> Rule:
            return Rule(f"{side}_{column}", op, float(value), prefix + reason)

        rules: list[Rule] = []
        for name, reason in (
            ("dup_line_frac", R.DUPLICATE_LINES),
            ("dup_line_char_frac", R.DUPLICATE_LINES),
            ("dup_para_frac", R.DUPLICATE_PARAGRAPHS),
            ("dup_para_char_frac", R.DUPLICATE_PARAGRAPHS),
        ):
            threshold = getattr(self, name)
            if threshold is not None:
                rules.append(rule(name, ">", threshold, reason))
        for field, template, reason in (
            ("top_ngram_char_frac", "top_{n}gram_char_frac", R.TOP_NGRAM_REPETITION),
            ("dup_ngram_char_frac", "dup_{n}gram_char_frac", R.REPETITIVE_NGRAMS),
        ):
            for n, threshold in sorted((getattr(self, field) or {}).items()):
                if threshold is not None:
                    rules.append(rule(template.format(n=n), ">", threshold, reason))
        if self.min_compression_ratio is not None:
            rules.append(
                rule("compression_ratio", "<", self.min_compression_ratio, R.LOW_COMPRESSION_RATIO)
            )
        return rules


def _instruction_default() -> RepetitionSpec:
    # Users paste logs and tracebacks (duplicate n-gram fractions 0.6-0.7 on ShareGPT) and ask
    # about them: a fair request. Only a near-total repeat (0.75) counts on this side.
    return RepetitionSpec(dup_ngram_char_frac=_per_n(DUP_NGRAM_SIZES, 0.75))


class HygieneSpec(Strict):
    """`select.hygiene`: length caps, then the response's and the instruction's repetition rules.
    `null` switches a rule (or a whole side) off; `enabled: false` switches all of them off."""

    enabled: bool = True
    max_response_chars: Annotated[int, Field(ge=1)] | None = Field(
        default=65_536, description="longest assistant message, characters"
    )
    max_assistant_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=32_768,
        description="assistant tokens of the row (tokens_assistant); applies when the tokens "
        "signal is on",
    )
    response: RepetitionSpec | None = Field(
        default_factory=RepetitionSpec, description="on the assistant messages"
    )
    instruction: RepetitionSpec | None = Field(
        default_factory=_instruction_default,
        description="on the user messages (reasons prefixed instruction_)",
    )

    def rules(self) -> list[Rule]:
        """The hygiene rules in the order they decide: length caps, then the response's
        repetition, then the instruction's."""
        if not self.enabled:
            return []
        rules: list[Rule] = []
        if self.max_response_chars is not None:
            rules.append(
                Rule(
                    "longest_response_chars",
                    ">",
                    float(self.max_response_chars),
                    R.RESPONSE_TOO_LONG,
                )
            )
        if self.max_assistant_tokens is not None:
            # The tokens stage is optional; without it the character cap bounds the length.
            rules.append(
                Rule(
                    "tokens_assistant",
                    ">",
                    float(self.max_assistant_tokens),
                    R.RESPONSE_TOO_MANY_TOKENS,
                    optional=True,
                )
            )
        if self.response is not None:
            rules.extend(self.response.rules("assistant", ""))
        if self.instruction is not None:
            rules.extend(self.instruction.rules("user", R.INSTRUCTION_PREFIX))
        return rules

    def summary(self) -> list[dict[str, str]]:
        """The active rules as `{reject_if, reason}` (for the selection summary)."""
        return [{"reject_if": r.expression, "reason": r.reason} for r in self.rules()]
