"""engine.evaluation.sft: loss on assistant tokens only, with the LM signal's template, the
truncation and drop rule, padding, and the seeded train/eval split (real SmolLM2 tokenizer)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.evaluation.sft import (
    IGNORE,
    collate,
    encode_conversation,
    encode_rows,
    pad_id,
    rows_sha,
    split_rows,
)
from engine.signals.lm import render_prompt


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from engine.models import resolve_tokenizer

    return AutoTokenizer.from_pretrained(resolve_tokenizer("builtin:smollm2-135m"))


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SINGLE = [_m("user", "Name a colour."), _m("assistant", "Blue.")]
CHAT = [
    _m("system", "Be brief."),
    _m("user", "Hi there"),
    _m("assistant", "Hello!"),
    _m("user", "More?"),
    _m("assistant", "   "),  # blank: context, never labelled
    _m("user", "Please."),
    _m("assistant", "Sure."),
]


def _labelled_text(tokenizer: Any, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE])


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_single_turn_prompt_is_the_lm_signals_and_only_answer_and_eos_are_labelled(
    tokenizer: Any, template: str
) -> None:
    (example,) = encode_conversation(tokenizer, SINGLE, template)
    prompt = render_prompt(tokenizer, SINGLE[:1], template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("Blue.", add_special_tokens=False)["input_ids"]
    assert example.input_ids == [*prompt_ids, *answer_ids, tokenizer.eos_token_id]
    assert example.labels == [IGNORE] * len(prompt_ids) + [*answer_ids, tokenizer.eos_token_id]
    assert tokenizer.decode(example.input_ids).startswith(prompt)


def test_multi_turn_alpaca_gives_one_example_per_scorable_turn_with_its_history(
    tokenizer: Any,
) -> None:
    examples = encode_conversation(tokenizer, CHAT, "alpaca")
    assert len(examples) == 2  # the blank turn is neither an example nor labelled
    first, last = examples
    assert _labelled_text(tokenizer, first.labels) == "Hello!" + tokenizer.eos_token
    assert _labelled_text(tokenizer, last.labels) == "Sure." + tokenizer.eos_token
    # The last example's context is the whole history before it, rendered as the LM signal does.
    context = [t for t, label in zip(last.input_ids, last.labels, strict=True) if label == IGNORE]
    assert tokenizer.decode(context) == render_prompt(tokenizer, CHAT[:6], "alpaca")


def test_chat_template_labels_every_scorable_assistant_span_in_one_sequence(
    tokenizer: Any,
) -> None:
    (example,) = encode_conversation(tokenizer, CHAT, "chat")
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )
    labelled = _labelled_text(tokenizer, example.labels)
    assert "Hello!" in labelled and "Sure." in labelled
    assert "Hi there" not in labelled and "Be brief." not in labelled and "More?" not in labelled
    # The spans end with the template's end of turn (what generation stops on).
    assert labelled.count("<|im_end|>") == 2
    # A conversation with no scorable turn has no example.
    assert encode_conversation(tokenizer, [_m("assistant", "orphan")], "chat") == []


def test_truncation_keeps_the_start_and_drops_rows_left_without_answer(tokenizer: Any) -> None:
    long_answer = [_m("user", "Count."), _m("assistant", " ".join(str(i) for i in range(200)))]
    long_prompt = [_m("user", "word " * 300), _m("assistant", "yes")]
    (full,) = encode_conversation(tokenizer, long_answer, "alpaca")
    encoded = encode_rows(tokenizer, [long_answer, long_prompt, SINGLE], "alpaca", 64)
    assert encoded.rows == 3 and encoded.dropped == 1 and encoded.truncated == 2
    assert len(encoded.examples) == 2
    cut = encoded.examples[0]
    assert cut.input_ids == full.input_ids[:64] and cut.labels == full.labels[:64]
    assert cut.labelled > 0
    assert all(len(e.input_ids) <= 64 for e in encoded.examples)


def test_collate_pads_right_and_ignores_padded_labels(tokenizer: Any) -> None:
    examples = encode_rows(tokenizer, [SINGLE, CHAT], "alpaca", 512).examples
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    batch = collate(rows, pad_id(tokenizer))
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(examples), width)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][i, :n].tolist() == e.input_ids
        assert batch["labels"][i, :n].tolist() == e.labels
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert set(batch["labels"][i, n:].tolist()) <= {IGNORE}


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=8), min_size=0, max_size=40, unique=True),
    fraction=st.floats(0, 0.9),
    cap=st.integers(0, 10),
    seed=st.integers(0, 3),
)
def test_split_is_seeded_order_free_and_sized(
    ids: list[str], fraction: float, cap: int, seed: int
) -> None:
    train, held = split_rows(ids, fraction, cap, seed)
    assert sorted(train + held) == list(range(len(ids)))
    assert len(held) <= cap and (len(ids) == 0 or train)
    if fraction > 0 and cap > 0 and len(ids) >= 2:
        assert held
    # The same ids in another order hold out the same rows.
    _, held_rev = split_rows(ids[::-1], fraction, cap, seed)
    assert {ids[i] for i in held} == {ids[::-1][i] for i in held_rev}
    # A row held out of an arm is held out of a smaller arm that still holds as many rows out.
    if held and len(ids) > len(held) + 1:
        kept = [ids[i] for i in sorted(held)] + [ids[i] for i in train[:1]]
        _, sub = split_rows(kept, 1.0, len(held), seed)
        assert {kept[i] for i in sub} == {ids[i] for i in held}


def test_rows_hash_changes_with_content_and_order() -> None:
    a = [("1", SINGLE), ("2", CHAT)]
    assert rows_sha(a) == rows_sha([(i, [dict(m) for m in c]) for i, c in a])
    assert rows_sha(a) != rows_sha(a[::-1])
    assert rows_sha(a) != rows_sha([("1", [_m("user", "Name a colour."), _m("assistant", "Red.")])])
