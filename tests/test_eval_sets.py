"""Evaluation prompts: the five shared standard sets load as the papers' generation script reads
them (1,030 prompts, each set's own prompt and id fields, Self-Instruct's instance input joined),
any JSONL of prompts loads by its first prompt field, and every malformed input is an error that
says where."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.evaluation.eval_sets import EvalPrompt, join_input, load_eval_prompts, set_name

SIZES = {"koala": 180, "lima": 300, "sinstruct": 252, "vicuna": 80, "wizardlm": 218}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def standard(shared_data: Path) -> list[EvalPrompt]:
    return load_eval_prompts([shared_data / "eval"])


def test_standard_sets_sizes_ids_and_text(standard: list[EvalPrompt], shared_data: Path) -> None:
    assert Counter(p.set for p in standard) == SIZES and len(standard) == 1030
    assert [p.set for p in standard] == sorted(p.set for p in standard)  # files sorted, in order
    assert all(p.text.strip() for p in standard)
    assert len({(p.set, p.prompt_id) for p in standard}) == len(standard)
    by_set = {s: [p for p in standard if p.set == s] for s in SIZES}
    folder = shared_data / "eval"
    # Each set's prompt field and id field, read here straight from the files, in file order.
    fields = {
        "vicuna": ("text", "question_id"),
        "koala": ("prompt", "id"),
        "wizardlm": ("Instruction", "idx"),
        "lima": ("conversations", None),
    }
    for name, (text_field, id_field) in fields.items():
        rows = _lines(folder / f"{name}_test_set.jsonl")
        assert [p.text for p in by_set[name]] == [r[text_field] for r in rows]
        want_ids = [str(r[id_field]) if id_field else str(k + 1) for k, r in enumerate(rows)]
        assert [p.prompt_id for p in by_set[name]] == want_ids
    # Self-Instruct: instruction, then its one instance's input when it has one.
    rows = _lines(folder / "sinstruct_test_set.jsonl")
    with_input = 0
    for prompt, row in zip(by_set["sinstruct"], rows, strict=True):
        extra = row["instances"][0]["input"]
        assert prompt.prompt_id == row["id"]
        if extra.strip():
            with_input += 1
            assert prompt.text == f"{row['instruction']}\n\n{extra}"
        else:
            assert prompt.text == row["instruction"]
    assert 0 < with_input < len(rows)


def test_per_set_takes_each_sets_first_prompts(standard: list[EvalPrompt], shared_data) -> None:
    few = load_eval_prompts([shared_data / "eval"], per_set=3)
    assert few == [p for s in sorted(SIZES) for p in [q for q in standard if q.set == s][:3]]
    with pytest.raises(ValueError, match="per_set"):
        load_eval_prompts([shared_data / "eval"], per_set=0)


def test_default_location_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path / "mine_test_set.jsonl", [{"prompt": "Hello?"}])
    monkeypatch.setenv("WINNOW_EVAL_SETS", str(tmp_path))
    assert load_eval_prompts(None) == [EvalPrompt("mine", "1", "Hello?")]
    monkeypatch.setenv("WINNOW_EVAL_SETS", str(tmp_path / "missing"))
    with pytest.raises(ValueError) as err:
        load_eval_prompts(None)
    message = str(err.value)
    assert "stages.generate.prompts" in message and str(tmp_path / "missing") in message
    assert str(Path("shared") / "data" / "eval") in message


def test_default_location_is_the_shared_folder(monkeypatch, standard) -> None:
    monkeypatch.delenv("WINNOW_EVAL_SETS", raising=False)
    want = [p for s in sorted(SIZES) for p in [q for q in standard if q.set == s][:2]]
    assert load_eval_prompts(None, per_set=2) == want


def test_generic_jsonl_first_prompt_field(tmp_path: Path) -> None:
    """The first prompt field a line has; its id field, else its line number (blank lines
    count: the id is the line number a reader sees)."""
    rows = [
        {"prompt": "P1", "text": "not this", "id": "a"},
        {"instruction": "Summarise.", "input": "Some text.", "question_id": 70},
        {"instruction": "No input.", "input": "  "},
        None,  # a blank line
        {"text": "T5", "question": "not this", "idx": 9},
        {"question": "Q6", "conversations": "not this", "prompt_id": "q6"},
        {"conversations": "C7"},
    ]
    path = tmp_path / "users.jsonl"
    path.write_text("\n".join("" if r is None else json.dumps(r) for r in rows) + "\n")
    got = load_eval_prompts([path])
    assert [(p.set, p.prompt_id, p.text) for p in got] == [
        ("users", "a", "P1"),
        ("users", "70", "Summarise.\n\nSome text."),
        ("users", "3", "No input."),
        ("users", "9", "T5"),
        ("users", "q6", "Q6"),
        ("users", "7", "C7"),
    ]


def test_folder_and_files_in_the_order_given(tmp_path: Path) -> None:
    folder = tmp_path / "sets"
    folder.mkdir()
    _write(folder / "b_test_set.jsonl", [{"prompt": "B1"}, {"prompt": "B2"}])
    _write(folder / "a.jsonl", [{"text": "A1"}])
    (folder / "notes.txt").write_text("not a prompt file")
    extra = _write(tmp_path / "c.jsonl", [{"question": "C1"}])
    got = load_eval_prompts([str(extra), folder], per_set=1)
    assert [(p.set, p.text) for p in got] == [("c", "C1"), ("a", "A1"), ("b", "B1")]
    assert set_name(Path("x/_test_set.jsonl")) == "_test_set"


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1).filter(str.strip),
            st.text(),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_instruction_and_input_round_trip(tmp_path_factory, rows) -> None:
    """Any instruction/input pair reads back as ingest joins it; ids are line numbers."""
    path = tmp_path_factory.mktemp("rt") / "rt.jsonl"
    _write(path, [{"instruction": i, "input": x} for i, x in rows])
    got = load_eval_prompts([path])
    assert [p.text for p in got] == [join_input(i, x) for i, x in rows]
    assert [p.prompt_id for p in got] == [str(k + 1) for k in range(len(rows))]
    for (i, x), p in zip(rows, got, strict=True):
        assert p.text.startswith(i) and (x in p.text if x.strip() else p.text == i)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "ok"}\n{"answer": "no prompt"}\n', r"bad\.jsonl, line 2: no prompt field"),
        ('{"prompt": "ok"}\n{"prompt": \n', r"bad\.jsonl, line 2: not JSON"),
        ('["a list"]\n', r"line 1: a prompt line must be a JSON object"),
        ('{"conversations": [{"from": "human"}]}\n', r"line 1: field 'conversations' is list"),
        ('{"prompt": "   "}\n', r"line 1: the prompt is empty"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n', r"line 2: prompt id '1'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_eval_prompts([path])


def test_missing_and_clashing_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"stages\.generate\.prompts: .*nope.* does not exist"):
        load_eval_prompts([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*\\.jsonl file"):
        load_eval_prompts([tmp_path / "empty"])
    (tmp_path / "x").mkdir()
    one = _write(tmp_path / "koala_test_set.jsonl", [{"prompt": "a", "id": "k"}])
    two = _write(tmp_path / "x" / "koala.jsonl", [{"prompt": "b"}])
    with pytest.raises(ValueError, match="are both set 'koala'"):
        load_eval_prompts([one, two])


def test_sinstruct_instances_as_a_python_literal(tmp_path: Path) -> None:
    """The released Self-Instruct file stores `instances` as a Python-literal string: parsed
    with ast.literal_eval, never evaluated as code."""
    literal = str([{"input": "It's here.", "output": "x"}])  # single quotes: not JSON
    path = _write(
        tmp_path / "sinstruct_test_set.jsonl",
        [
            {"id": "t0", "instruction": "Fix it.", "instances": literal},
            {"id": "t1", "instruction": "No input.", "instances": str([{"input": ""}])},
        ],
    )
    got = load_eval_prompts([path])
    assert [p.text for p in got] == ["Fix it.\n\nIt's here.", "No input."]
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    _write(path, [{"id": "t0", "instruction": "Fix it.", "instances": code}])
    with pytest.raises(ValueError, match="line 1: `instances` is not a Python literal"):
        load_eval_prompts([path])
    assert not marker.exists()
    _write(path, [{"id": "t0", "instruction": "Fix it.", "instances": "{'input': 'x'}"}])
    with pytest.raises(ValueError, match="not a list of"):
        load_eval_prompts([path])
