"""Evaluation prompts: the five standard test sets of the data-selection literature, or any JSONL.

The standard sets (Vicuna 80, Koala 180, WizardLM 218, Self-Instruct 252, LIMA 300 = 1,030
prompts) are the ones AlpaGasus, Cherry LLM (IFD) and Superfiltering answer and judge pairwise.
Their field names differ; which field is the prompt follows Cherry LLM's generation script
(`evaluation/generation/eva_generation.py`, MingLiiii/Cherry_LLM): vicuna `text`, koala
`prompt`, wizardlm `Instruction`, lima `conversations` (one string), sinstruct `instruction` plus
the input of its single instance (`instances[0]["input"]`, when not empty). Cherry LLM puts
that input under an Alpaca `### Input:` heading because its models were trained on that
template; here it is joined to the instruction as ingest joins an Alpaca row's input
(`instruction + "\\n\\n" + input`, engine.records), so a set's prompt looks like the training
rows the arms learned from, and every template (alpaca, plain, chat) renders it the same way.

Any other JSONL (real users' prompts): one prompt per line, from the first of the fields
`prompt`, `instruction` (+ `input`), `text`, `question`, `conversations` (a string) that the
line has. The set is the file's stem without `_test_set`; a prompt's id is the line's id field
(`id`, `question_id`, `idx`, `prompt_id`) where it has one, else its line number, unique per set.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "WINNOW_EVAL_SETS"
SUFFIX = "_test_set"
# Where a line's id is, in order; none of them -> the line number.
ID_FIELDS = ("id", "question_id", "idx", "prompt_id")
# A JSONL of prompts other than the standard sets: the first of these fields a line has.
GENERIC_FIELDS = ("prompt", "instruction", "text", "question", "conversations")
# The standard sets: (prompt field, id field or None = line number), per Cherry LLM's script.
STANDARD_SETS: dict[str, tuple[str, str | None]] = {
    "vicuna": ("text", "question_id"),
    "koala": ("prompt", "id"),
    "wizardlm": ("Instruction", "idx"),
    "sinstruct": ("instruction", "id"),
    "lima": ("conversations", None),
}


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its set, its id in that set, and the text a model answers."""

    set: str
    prompt_id: str
    text: str


def default_location() -> Path:
    """$WINNOW_EVAL_SETS, else `shared/data/eval` beside the checkout; a ValueError naming the
    config field and both places when the one that applies does not exist."""
    repo = Path(__file__).resolve().parents[2]  # the folder above engine/
    shared = repo.parent / "shared" / "data" / "eval"
    env = os.environ.get(ENV_VAR)
    place = Path(env) if env else shared
    if not place.exists():
        raise ValueError(
            "stages.generate.prompts is not set and the standard evaluation sets are not there: "
            f"${ENV_VAR} is {env!r}, the default is {shared}; set stages.generate.prompts to "
            f"JSONL files or folders of prompts, or point ${ENV_VAR} at the folder of the five "
            "*_test_set.jsonl files"
        )
    return place


def set_name(path: Path) -> str:
    """`vicuna_test_set.jsonl` -> `vicuna`; any other file -> its stem."""
    stem = path.stem
    return stem[: -len(SUFFIX)] if stem.endswith(SUFFIX) and len(stem) > len(SUFFIX) else stem


def join_input(instruction: str, extra: str) -> str:
    """An instruction and its input as one prompt, as ingest joins an Alpaca row's input."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _string(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def _instance_input(value: Any, where: str) -> str:
    """Self-Instruct's `instances`: a list of {input, output} (or a Python-literal string of
    one, as the released file has it; parsed with ast.literal_eval, never eval). The first
    instance's input, as Cherry LLM takes it (every test task has exactly one)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"{where}: `instances` is not a Python literal: {err}") from err
    if not isinstance(value, list) or not all(isinstance(i, Mapping) for i in value):
        raise ValueError(f"{where}: `instances` is not a list of {{input, output}} objects")
    if not value:
        return ""
    return _string(value[0].get("input") or "", "instances[0].input", where)


def _standard_text(name: str, row: Mapping[str, Any], where: str) -> str:
    field, _ = STANDARD_SETS[name]
    if field not in row:
        raise ValueError(f"{where}: the {name} set has no field {field!r} on this line")
    text = _string(row[field], field, where)
    if name == "sinstruct":
        text = join_input(text, _instance_input(row.get("instances", []), where))
    return text


def _generic_text(row: Mapping[str, Any], where: str) -> str:
    for field in GENERIC_FIELDS:
        if field in row and row[field] is not None:
            text = _string(row[field], field, where)
            if field == "instruction":
                text = join_input(text, _string(row.get("input") or "", "input", where))
            return text
    raise ValueError(
        f"{where}: no prompt field; a prompt line needs one of {', '.join(GENERIC_FIELDS)}"
    )


def _prompt_id(name: str, row: Mapping[str, Any], line: int) -> str:
    if name in STANDARD_SETS:
        field = STANDARD_SETS[name][1]
        fields: tuple[str, ...] = (field,) if field else ()
    else:
        fields = ID_FIELDS
    for field in fields:
        if row.get(field) is not None:
            return str(row[field])
    return str(line)


def _read_file(path: Path) -> Iterator[EvalPrompt]:
    name = set_name(path)
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}, line {line}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON: {err}") from err
            if not isinstance(row, Mapping):
                raise ValueError(f"{where}: a prompt line must be a JSON object")
            if name in STANDARD_SETS:
                text = _standard_text(name, row, where)
            else:
                text = _generic_text(row, where)
            if not text.strip():
                raise ValueError(f"{where}: the prompt is empty")
            prompt_id = _prompt_id(name, row, line)
            if prompt_id in seen:
                raise ValueError(f"{where}: prompt id {prompt_id!r} is not unique in its set")
            seen.add(prompt_id)
            yield EvalPrompt(name, prompt_id, text)


def _files(paths: Sequence[str | Path]) -> list[Path]:
    """Each path as given; a folder as its *.jsonl files, sorted."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise ValueError(f"stages.generate.prompts: no *.jsonl file in {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"stages.generate.prompts: {path} does not exist")
    return files


def load_eval_prompts(
    paths: Sequence[str | Path] | None = None, per_set: int | None = None
) -> list[EvalPrompt]:
    """Every prompt of the files (or folders of *.jsonl) in `paths`, set by set in the order
    given (a folder's files sorted), each set in file order and cut to its first `per_set`
    prompts when given. `paths` None: the standard sets (`default_location`)."""
    if per_set is not None and per_set < 1:
        raise ValueError(f"per_set must be at least 1, got {per_set}")
    files = _files([default_location()] if paths is None else paths)
    if not files:
        raise ValueError("stages.generate.prompts: no prompt file given")
    prompts: list[EvalPrompt] = []
    owner: dict[str, Path] = {}
    for path in files:
        name = set_name(path)
        if name in owner:
            raise ValueError(
                f"stages.generate.prompts: {owner[name]} and {path} are both set {name!r}; "
                "rename one (a set is its file's name)"
            )
        owner[name] = path
        for k, prompt in enumerate(_read_file(path)):
            if per_set is not None and k >= per_set:
                break
            prompts.append(prompt)
    return prompts
