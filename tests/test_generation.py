"""Answer generation. Fast: the prompt each template hands the generator, the answers key, the
reassembly of the actors' replies, the refusals before any work. Slow (real Ray actors, the real
built-in model): each arm's answers land in `answers/<arm>.parquet` in the prompts' order, equal
to the generator backend called directly (greedy is deterministic), with the Alpaca template (a
RawPrompt) and with the chat template (through the registered stage); a second call keeps files
whose key matches."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.backends import generator
from engine.backends.base import RawPrompt
from engine.config import parse_job
from engine.evaluation.eval_sets import EvalPrompt, load_eval_prompts
from engine.evaluation.generation import (
    ANSWER_SCHEMA,
    KEY_METADATA,
    _collect,
    _complete,
    _input_table,
    answer_info,
    answers_key,
    backend_args,
    generate_answers,
    render,
)
from engine.models import resolve_model
from engine.runtime.rundir import RunDir
from engine.signals.lm import ALPACA_PROMPT
from engine.stages.generate import GenerateSpec
from tests.support.stages import run_stage

NEW_TOKENS = 16
PROMPTS = [
    EvalPrompt("vicuna", "1", "How can I improve my time management skills?"),
    EvalPrompt("vicuna", "2", "Name three colors."),
    EvalPrompt("koala", "k0", "Rewrite this sentence more politely.\n\nGive me the report now."),
    EvalPrompt("koala", "k1", "Hi"),
    EvalPrompt("koala", "k2", "Explain in one sentence why the sky is blue."),
    EvalPrompt("lima", "7", "Write a haiku about the sea."),
]
RESOURCES = {"num_cpus": 1, "batch_size": 2, "max_batch_prompts": 2}


def _spec(**overrides: object) -> GenerateSpec:
    return GenerateSpec.model_validate(
        {
            "max_new_tokens": NEW_TOKENS,
            "max_length": 256,
            "dtype": "float32",  # batched == one-by-one holds exactly in float32
            "resources": RESOURCES,
            **overrides,
        }
    )


def _linked_copy(source: str, target: Path) -> str:
    """Another model folder with the same weights (symlinked files: no 500 MB copy)."""
    target.mkdir(parents=True)
    for item in Path(source).iterdir():
        (target / item.name).symlink_to(item)
    return str(target)


def _direct(model: str, spec: GenerateSpec, prompts: list) -> list[tuple[str, int]]:
    backend = generator(model_path=model, **backend_args(spec))
    try:
        return backend.generate_counted(prompts)
    finally:
        backend.close()


def _pairs(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table["answer"].to_pylist(), table["answer_tokens"].to_pylist(), strict=True))


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_render_by_template() -> None:
    """chat: the user message (the generator applies the chat template); alpaca and plain: the
    training template's text as a RawPrompt without special tokens (as training tokenises it)."""
    assert render("Hi?", "chat") == [{"role": "user", "content": "Hi?"}]
    alpaca = ALPACA_PROMPT.format(instruction="Hi?")
    assert render("Hi?", "alpaca") == RawPrompt(alpaca, special_tokens=False)
    assert render("Hi?", "plain") == RawPrompt("Hi?\n", special_tokens=False)
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        render("Hi?", "vicuna")


def test_answers_key_follows_what_changes_answers(tmp_path: Path) -> None:
    """Model (a trained arm by its training record), template, generation settings and prompts
    change the key; resources (batch sizes, CPUs) do not."""
    trained = tmp_path / "trained"
    trained.mkdir()
    record = {"fingerprint": "f1", "rows_sha": "r1", "arm": "selected"}
    (trained / "winnow_train.json").write_text(json.dumps(record))
    base = answers_key(str(trained), PROMPTS, _spec(), "alpaca")
    assert base == answers_key(str(trained), PROMPTS, _spec(), "alpaca")
    same = _spec(resources={"batch_size": 7, "max_batch_prompts": 3, "num_cpus": 0.5})
    assert answers_key(str(trained), PROMPTS, same, "alpaca") == base
    changed = [
        answers_key(str(trained), PROMPTS, _spec(), "chat"),
        answers_key(str(trained), PROMPTS, _spec(max_new_tokens=8), "alpaca"),
        answers_key(str(trained), PROMPTS, _spec(dtype="bfloat16"), "alpaca"),
        answers_key(str(trained), PROMPTS[:-1], _spec(), "alpaca"),
        answers_key(str(trained), [*PROMPTS[:-1], EvalPrompt("lima", "7", "x")], _spec(), "alpaca"),
        answers_key(str(tmp_path / "other"), PROMPTS, _spec(), "alpaca"),
    ]
    (trained / "winnow_train.json").write_text(json.dumps({**record, "rows_sha": "r2"}))
    changed.append(answers_key(str(trained), PROMPTS, _spec(), "alpaca"))
    assert len({base, *changed}) == len(changed) + 1


def test_replies_reassembled_in_prompt_order(tmp_path: Path) -> None:
    """The input goes longest first; replies come back in any order and any number of files;
    the table is in the prompts' order, and a lost or doubled reply is an error."""
    source = _input_table(PROMPTS)
    rows = source["row"].to_pylist()
    assert sorted(rows) == list(range(len(PROMPTS)))
    lengths = [len(t) for t in source["prompt"].to_pylist()]
    assert lengths == sorted(lengths, reverse=True)
    assert source["prompt"].to_pylist() == [PROMPTS[r].text for r in rows]

    def write(name: str, picked: list[int]) -> None:
        table = pa.table(
            {
                "row": pa.array(picked, pa.int64()),
                "answer": [f"answer {r}" for r in picked],
                "answer_tokens": pa.array([r * 2 for r in picked], pa.int64()),
            }
        )
        pq.write_table(table, tmp_path / name)

    write("part-1.parquet", rows[3:])
    write("part-0.parquet", rows[:3][::-1])
    table = _collect(tmp_path, PROMPTS, "k1")
    assert table.schema.metadata == {KEY_METADATA: b"k1"}
    assert table.schema.remove_metadata() == ANSWER_SCHEMA
    assert table["prompt_id"].to_pylist() == [p.prompt_id for p in PROMPTS]
    assert _pairs(table) == [(f"answer {r}", r * 2) for r in range(len(PROMPTS))]
    info = answer_info(table, 2.0)
    total = sum(r * 2 for r in range(len(PROMPTS)))
    assert info == {
        "prompts": len(PROMPTS),
        "answer_tokens": total,
        "mean_answer_tokens": round(total / len(PROMPTS), 2),
        "empty_answers": 0,
        "seconds": 2.0,
        "tokens_per_s": total / 2.0,
    }
    target = tmp_path / "answers" / "a.parquet"
    target.parent.mkdir()
    pq.write_table(table, target)
    assert _complete(target, "k1", len(PROMPTS))
    assert not _complete(target, "k2", len(PROMPTS))
    assert not _complete(target, "k1", len(PROMPTS) + 1)
    assert not _complete(tmp_path / "missing.parquet", "k1", len(PROMPTS))
    write("part-2.parquet", rows[:1])  # one reply twice
    with pytest.raises(RuntimeError, match="answers were lost or given twice"):
        _collect(tmp_path, PROMPTS, "k1")


def test_refusals_before_any_work(tmp_path: Path) -> None:
    def call(prompts: list[EvalPrompt], template: str = "alpaca") -> None:
        generate_answers(
            {"a": "unused"},
            prompts,
            _spec(),
            template=template,
            out=tmp_path / "answers",
            log=print,
            progress=lambda d, t: lambda n: None,
        )

    with pytest.raises(ValueError, match="no evaluation prompts"):
        call([])
    with pytest.raises(ValueError, match="prompt ids given twice: koala/k0"):
        call([*PROMPTS, PROMPTS[2]])
    with pytest.raises(ValueError, match="unknown template"):
        call(PROMPTS, "vicuna")
    assert not (tmp_path / "answers").exists()


# ---------------------------------------------------------------------------------------------
# Real actors, real model


@pytest.fixture(scope="module")
def model() -> str:
    return resolve_model("builtin:smollm2-135m")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_two_arms_alpaca_equal_the_backend(model: str, tmp_path: Path) -> None:
    spec = _spec()
    models = {"a": model, "b": _linked_copy(model, tmp_path / "copy")}
    out = tmp_path / "answers"
    bars: dict[str, list[int]] = {}

    def progress(description: str, total: int | None):
        bars[description] = [total or 0, 0]
        return lambda n: bars[description].__setitem__(1, bars[description][1] + n)

    logs: list[str] = []
    info = generate_answers(
        models, PROMPTS, spec, template="alpaca", out=out, log=logs.append, progress=progress
    )
    want = _direct(model, spec, [render(p.text, "alpaca") for p in PROMPTS])
    assert all(0 <= n <= NEW_TOKENS for _, n in want) and any(t.strip() for t, _ in want)
    for arm in models:
        table = pq.read_table(out / f"{arm}.parquet")
        assert table.schema.remove_metadata() == ANSWER_SCHEMA
        assert table["prompt_id"].to_pylist() == [p.prompt_id for p in PROMPTS]
        assert table["set"].to_pylist() == [p.set for p in PROMPTS]
        assert table["prompt"].to_pylist() == [p.text for p in PROMPTS]
        assert _pairs(table) == want
        tokens = [n for _, n in want]
        assert info[arm]["prompts"] == len(PROMPTS) and info[arm]["reused"] is False
        assert info[arm]["mean_answer_tokens"] == round(sum(tokens) / len(tokens), 2)
        assert info[arm]["empty_answers"] == sum(not t.strip() for t, _ in want)
        assert info[arm]["seconds"] > 0 and info[arm]["model"] == models[arm]
        assert bars[f"generate {arm}"] == [len(PROMPTS), len(PROMPTS)]
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet", "b.parquet"]  # no work left
    print(json.dumps(info, indent=1))

    # Same model, prompts and settings: kept, not generated again.
    before = (out / "a.parquet").stat().st_mtime_ns
    again = generate_answers(
        {"a": model}, PROMPTS, spec, template="alpaca", out=out, log=logs.append, progress=progress
    )
    assert again["a"]["reused"] is True and (out / "a.parquet").stat().st_mtime_ns == before
    assert again["a"]["mean_answer_tokens"] == info["a"]["mean_answer_tokens"]
    assert any("up to date" in line for line in logs)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_generate_stage_chat_template_and_base_arm(model: str, tmp_path: Path) -> None:
    """The registered stage: arms from eval/models/<arm> plus the base model, prompts from the
    spec's JSONL (first 3 of the set), the chat template: answers equal the backend on the chat
    messages."""
    prompts_file = tmp_path / "mine.jsonl"
    prompts_file.write_text(
        "\n".join(json.dumps({"prompt": p.text}) for p in PROMPTS) + "\n", encoding="utf-8"
    )
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    job = parse_job(
        {
            "inputs": [{"path": str(data)}],
            "eval": {"arms": ["selected"], "baseline": "base", "base_model": True},
            "stages": {
                "train": {"template": "chat"},
                "generate": {
                    "prompts": [str(prompts_file)],
                    "per_set": 3,
                    "max_new_tokens": NEW_TOKENS,
                    "max_length": 256,
                    "dtype": "float32",
                    "resources": RESOURCES,
                },
            },
        }
    )
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no trained model for arm 'selected'"):
        run_stage("generate", job, run)
    _linked_copy(model, run.evaluation / "models" / "selected")

    info = run_stage("generate", job, run)
    assert info["template"] == "chat" and info["prompts"] == 3 and info["sets"] == {"mine": 3}
    assert list(info["arms"]) == ["selected", "base"]
    assert info["arms"]["base"]["model"] == model
    expected = load_eval_prompts([prompts_file], per_set=3)
    want = _direct(model, job.stages.generate, [render(p.text, "chat") for p in expected])
    for arm in ("selected", "base"):
        table = pq.read_table(run.evaluation / "answers" / f"{arm}.parquet")
        assert table["prompt_id"].to_pylist() == ["1", "2", "3"]
        assert _pairs(table) == want
