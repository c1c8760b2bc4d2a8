"""Hygiene rules (`select.hygiene`): on for every preset, kept when `filters` is replaced, each
with its own reason; real rows pass, degenerate ones do not."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from engine import reasons as R
from engine.cli import app
from engine.config import PRESETS, ConfigError, parse_job
from engine.pipeline import stage_fingerprints
from engine.records import to_canonical
from engine.selection.filters import Rule, first_matching_reason
from engine.selection.hygiene import GOPHER_THRESHOLDS, HygieneSpec, RepetitionSpec
from engine.signals.indicators import DUP_NGRAM_SIZES, INDICATOR_COLUMNS, indicators_frame

runner = CliRunner()
SENTENCE = "The quick brown fox jumps over the lazy dog. "
DEGENERATE = (SENTENCE * (2_000_000 // len(SENTENCE) + 1))[:2_000_000]


def _job(**select: object):
    return parse_job({"inputs": [{"path": "x"}], "select": select})


def _reasons(rules: list[Rule]) -> list[str]:
    return [r.reason for r in rules]


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_every_preset_gets_the_hygiene_rules_between_filters_and_its_own_rule() -> None:
    hygiene = HygieneSpec().rules()
    assert len(hygiene) == 26  # 2 length caps + 12 per side (line, paragraph, 3 + 6 n-gram, zlib)
    for preset in PRESETS:
        job = _job(preset=preset)
        rules = job.select.rules()
        filters = [f.rule() for f in job.select.filters]
        assert rules[: len(filters)] == filters
        assert rules[len(filters) : len(filters) + len(hygiene)] == hygiene
        own = PRESETS[preset].get("reject_if")
        assert rules[len(filters) + len(hygiene) :] == ([Rule.parse(*own)] if own else [])


def test_replacing_filters_keeps_hygiene() -> None:
    job = _job(filters=[], preset="ifd")
    assert job.select.rules()[:-1] == HygieneSpec().rules()
    custom = _job(filters=[{"reject_if": "turns > 3", "reason": "long_chat"}])
    assert _reasons(custom.select.rules())[0] == "long_chat"
    assert set(R.HYGIENE_REASONS) == set(_reasons(custom.select.rules()[1:]))


def test_default_rules_and_reasons() -> None:
    rules = {r.expression: r.reason for r in HygieneSpec().rules()}
    assert rules["longest_response_chars > 65536"] == R.RESPONSE_TOO_LONG
    assert rules["tokens_assistant > 32768"] == R.RESPONSE_TOO_MANY_TOKENS
    assert rules["assistant_dup_line_char_frac > 0.7"] == R.DUPLICATE_LINES
    assert rules["assistant_dup_para_char_frac > 0.5"] == R.DUPLICATE_PARAGRAPHS
    assert rules["assistant_top_2gram_char_frac > 0.5"] == R.TOP_NGRAM_REPETITION
    assert rules["assistant_dup_10gram_char_frac > 0.6"] == R.REPETITIVE_NGRAMS
    assert rules["assistant_compression_ratio < 0.08"] == R.LOW_COMPRESSION_RATIO
    assert rules["user_dup_5gram_char_frac > 0.75"] == "instruction_repetitive_ngrams"
    assert rules["user_compression_ratio < 0.08"] == "instruction_low_compression_ratio"
    assert not any("dup_line_frac" in e or "dup_para_frac" in e for e in rules)  # off
    # Every rule reads an indicator column, except the token cap (optional: the tokens stage).
    for rule in HygieneSpec().rules():
        assert (rule.column in INDICATOR_COLUMNS) != rule.optional, rule
    # The summary's text parses back to the same rules.
    for item, rule in zip(HygieneSpec().summary(), HygieneSpec().rules(), strict=True):
        assert Rule.parse(item["reject_if"], item["reason"], rule.optional) == rule


def test_null_switches_a_rule_or_a_side_off() -> None:
    full = _reasons(HygieneSpec().rules())
    no_cap = _job(hygiene={"max_response_chars": None}).select.hygiene.rules()
    assert R.RESPONSE_TOO_LONG not in _reasons(no_cap) and len(no_cap) == len(full) - 1
    one_n = _job(hygiene={"response": {"dup_ngram_char_frac": {5: None, 6: 0.5}}})
    columns = [r.column for r in one_n.select.hygiene.rules()]
    assert "assistant_dup_5gram_char_frac" not in columns  # switched off
    assert "assistant_dup_7gram_char_frac" not in columns  # a given mapping replaces the default
    assert "user_dup_7gram_char_frac" in columns  # the other side keeps its defaults
    no_user = _job(hygiene={"instruction": None}).select.hygiene.rules()
    assert not any(r.reason.startswith(R.INSTRUCTION_PREFIX) for r in no_user)
    no_response = _job(hygiene={"response": None}).select.hygiene.rules()
    assert not any(r.column.startswith("assistant_") for r in no_response)
    assert _job(hygiene={"enabled": False}).select.hygiene.rules() == []
    gopher = RepetitionSpec(**GOPHER_THRESHOLDS).rules("assistant", "")
    assert len(gopher) == 4 + 3 + 6 + 1


@pytest.mark.parametrize(
    ("hygiene", "message"),
    [
        ({"max_chars": 5}, "select.hygiene.max_chars: Extra inputs are not permitted"),
        ({"response": {"top_ngram_char_frac": {5: 0.2}}}, "no statistic for n = [5]"),
        ({"instruction": {"dup_ngram_char_frac": {4: 0.2}}}, "select.hygiene.instruction"),
        ({"response": {"dup_line_char_frac": 0}}, "select.hygiene.response.dup_line_char_frac"),
        ({"max_response_chars": 0}, "select.hygiene.max_response_chars"),
    ],
)
def test_bad_hygiene_fields_are_named(hygiene: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _job(hygiene=hygiene)
    assert message in str(err.value)


def test_hygiene_reasons_are_reserved() -> None:
    for reason in R.HYGIENE_REASONS:
        assert R.is_reserved(reason)
        with pytest.raises(ConfigError, match="reserved"):
            _job(filters=[{"reject_if": "turns > 9", "reason": reason}])


def test_hygiene_changes_the_select_fingerprint_only() -> None:
    base = stage_fingerprints(_job(budget=10))
    changed = stage_fingerprints(
        _job(budget=10, hygiene={"response": {"min_compression_ratio": 0.1}})
    )
    assert {s for s in base if base[s] != changed[s]} == {"select", "export"}


# ---------------------------------------------------------------------------------------------
# Rules on real rows
# ---------------------------------------------------------------------------------------------


def test_optional_rule_needs_its_column_only_when_present() -> None:
    frame = pd.DataFrame({"longest_response_chars": [10, 100_000]})
    token_cap = Rule("tokens_assistant", ">", 5.0, R.RESPONSE_TOO_MANY_TOKENS, optional=True)
    assert token_cap.matches(frame).tolist() == [False, False]
    assert token_cap.matches(frame.assign(tokens_assistant=[3, 9])).tolist() == [False, True]
    with pytest.raises(KeyError):
        Rule("tokens_assistant", ">", 5.0, "x").matches(frame)


def _conversation(record: dict, schema: str = "alpaca") -> list[dict]:
    return to_canonical(record, schema).conversation


def _decide(conversations: list[list[dict]], spec: HygieneSpec | None = None) -> list[str | None]:
    frame = indicators_frame(conversations)
    return list(first_matching_reason(frame, (spec or HygieneSpec()).rules()))


def test_real_rows_pass(alpaca_rows: list[dict], dolly_rows: list[dict]) -> None:
    """No default rule fires on 2,000 Alpaca and 1,000 Dolly rows (measured on all 12,225:
    none fires either); Gopher's own thresholds would reject some of them."""
    conversations = [_conversation(r) for r in alpaca_rows[:2000]]
    conversations += [_conversation(r, "dolly") for r in dolly_rows[:1000]]
    assert _decide(conversations) == [None] * len(conversations)
    gopher = HygieneSpec(
        response=RepetitionSpec(**GOPHER_THRESHOLDS),
        instruction=RepetitionSpec(**GOPHER_THRESHOLDS),
    )
    assert sum(r is not None for r in _decide(conversations, gopher)) > 10


def _turns(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_degenerate_rows_get_their_own_reason() -> None:
    loop = SENTENCE * 40  # 1,800 characters, one sentence on one line
    cases = {
        "2 MB, one sentence on one line": (_turns("Write.", DEGENERATE), R.RESPONSE_TOO_LONG),
        "a sentence looping": (_turns("Write.", loop), R.REPETITIVE_NGRAMS),
        "a short phrase looping": (_turns("Laugh.", "ha " * 400), R.TOP_NGRAM_REPETITION),
        "the same paragraph five times": (
            _turns("Explain.", "\n\n".join([" ".join(f"w{i}" for i in range(60))] * 5)),
            R.DUPLICATE_LINES,
        ),
        "a script without spaces, looping": (
            _turns("Write.", "你好世界" * 300),
            "low_compression_ratio",
        ),
        "a looping instruction": (_turns(loop, "Done."), "instruction_repetitive_ngrams"),
        "a short repetitive answer (under 50 words)": (_turns("Laugh.", "ha ha ha ha"), None),
    }
    got = _decide([conversation for conversation, _ in cases.values()])
    assert dict(zip(cases, got, strict=True)) == {name: want for name, (_, want) in cases.items()}
    # Without the length cap the 2 MB row is still caught, by its repetition.
    no_cap = HygieneSpec(max_response_chars=None)
    assert _decide([_turns("Write.", DEGENERATE)], no_cap) == [R.REPETITIVE_NGRAMS]
    no_ngrams = HygieneSpec(
        max_response_chars=None,
        response=RepetitionSpec(dup_ngram_char_frac=dict.fromkeys(DUP_NGRAM_SIZES)),
    )
    assert _decide([_turns("Write.", DEGENERATE)], no_ngrams) == [R.LOW_COMPRESSION_RATIO]
    assert _decide([_turns("Write.", DEGENERATE)], HygieneSpec(enabled=False)) == [None]


# ---------------------------------------------------------------------------------------------
# End to end: `winnow select` with `filters: []` (real Spark)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("spark")
def test_winnow_select_rejects_the_degenerate_row_without_filters(
    tmp_path: Path, alpaca_rows: list[dict]
) -> None:
    rows = [*alpaca_rows[:60], {"instruction": "Write a story.", "input": "", "output": DEGENERATE}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "job.yaml"
    config.write_text(
        "select:\n  filters: []\n  dedup: {near: {enabled: false}, semantic: {enabled: false}}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["select", str(corpus), "--out", str(out), "--budget", "50", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(out / "scores.parquet")
    bad = scores.loc[scores["row"] == 60].iloc[0]
    # Under `longest` it is the longest row by far: only hygiene stands between it and the top.
    assert bad["assistant_chars"] == scores["assistant_chars"].max() == 2_000_000
    assert not bad["selected"] and bad["reason"] == R.RESPONSE_TOO_LONG
    assert scores["selected"].sum() == 50
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["rejected"][R.RESPONSE_TOO_LONG] == 1
    assert manifest["config"]["select"]["filters"] == []
    assert manifest["config"]["select"]["hygiene"]["enabled"] is True
