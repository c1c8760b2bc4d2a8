"""Canonical records: schema mapping, normalisation and the content id."""

from __future__ import annotations

import pytest

from engine.records import (
    RecordError,
    content_id,
    detect_schema,
    normalise_text,
    split_input,
    to_canonical,
)


def test_alpaca_with_input_joins_instruction_and_input() -> None:
    record = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    canonical = to_canonical(record, "alpaca")
    assert canonical.conversation == [
        {"role": "user", "content": "Translate.\n\nBonjour", "input": "Bonjour"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_kept_input_splits_back_and_leaves_the_id_alone() -> None:
    """The verbatim input rides on the user turn for IFD's reference templates; the id hashes
    role and content only, so it is the id the merged turn always had."""
    record = {"instruction": "Sum up:\n\nbelow", "input": "A\n\nB", "output": "AB"}
    conversation = to_canonical(record, "alpaca").conversation
    assert split_input(conversation[0]) == ("Sum up:\n\nbelow", "A\n\nB")
    merged = [{"role": m["role"], "content": m["content"]} for m in conversation]
    assert content_id(conversation) == content_id(merged)
    no_input = to_canonical({"instruction": "Hi.", "input": "", "output": "Yo"}, "alpaca")
    assert "input" not in no_input.conversation[0]
    assert split_input(no_input.conversation[0]) == ("Hi.", "")
    # a blank input stays out of the content but the references still see it (input != "")
    blank = to_canonical({"instruction": "Hi.", "input": " ", "output": "Yo"}, "alpaca")
    assert blank.conversation[0]["content"] == "Hi."
    assert split_input(blank.conversation[0]) == ("Hi.", " ")
    assert blank.id == no_input.id
    # a turn read back from Parquet has input None when it had none
    assert split_input({"role": "user", "content": "Hi.", "input": None}) == ("Hi.", "")


def test_dolly_context_becomes_input() -> None:
    dolly = {"instruction": "Summarise.", "context": "Long text", "response": "Short"}
    alpaca = {"instruction": "Summarise.", "input": "Long text", "output": "Short"}
    assert detect_schema(dolly) == "dolly"
    assert to_canonical(dolly, "dolly") == to_canonical(alpaca, "alpaca")


def test_sharegpt_roles_are_mapped() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "chatgpt", "value": "Goodbye"},
        ]
    }
    roles = [m["role"] for m in to_canonical(record, "sharegpt").conversation]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_messages_schema_matches_sharegpt() -> None:
    messages = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert to_canonical(messages, "messages").id == to_canonical(sharegpt, "sharegpt").id


def test_sharegpt_with_role_content_keys() -> None:
    record = {
        "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }
    assert [m["role"] for m in to_canonical(record, "sharegpt").conversation] == [
        "user",
        "assistant",
    ]


def test_id_ignores_whitespace_runs_and_unicode_form_but_not_case() -> None:
    base = [
        {"role": "user", "content": "Caf\u00e9  au\n\tlait "},
        {"role": "assistant", "content": "Oui"},
    ]
    spaced = [
        {"role": "user", "content": " Cafe\u0301 au lait"},
        {"role": "assistant", "content": "Oui\n"},
    ]
    upper = [
        {"role": "user", "content": "CAF\u00c9 au lait"},
        {"role": "assistant", "content": "Oui"},
    ]
    assert content_id(base) == content_id(spaced)
    assert content_id(base) != content_id(upper)
    assert normalise_text(" a \n\n b ") == "a b"


def test_id_depends_on_roles() -> None:
    a = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    b = [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    assert content_id(a) != content_id(b)
    assert len(content_id(a)) == 32


@pytest.mark.parametrize(
    ("record", "schema", "reason"),
    [
        ({"instruction": "x"}, "alpaca", "missing_field:output"),
        ({"instruction": 3, "output": "y"}, "alpaca", "wrong_type:instruction"),
        ({"conversations": "hello"}, "sharegpt", "wrong_type:conversations"),
        ({"conversations": []}, "sharegpt", "empty_conversation"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "unknown_role"),
        ({"conversations": [{"value": "x"}]}, "sharegpt", "missing_field:conversations.from"),
        ({"instruction": " ", "input": "", "output": "\n"}, "alpaca", "empty_conversation"),
        (["not", "a", "dict"], "alpaca", "not_an_object"),
        (
            {"conversations": [{"from": 1, "value": "x"}]},
            "sharegpt",
            "wrong_type:conversations.from",
        ),
        ({"instruction": "\ud800 hi", "output": "b"}, "alpaca", "invalid_utf8"),
    ],
)
def test_bad_records_raise_with_reason(record: object, schema: str, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        to_canonical(record, schema)
    assert info.value.reason == reason
