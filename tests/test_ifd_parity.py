"""Parity of IFD definitions `cherry` and `superfiltering` with the papers' reference code.

Winnow's batched path (the real `LMScoringActor`: planning in engine.signals.lm, the
transformers backend's packed, answer-only batches) against independent per-sample
implementations of Cherry LLM's and Superfiltering's scripts (tests/support/ifd_reference.py: one
forward per text, full logits, the references' tokenization calls and losses), on real Alpaca
rows from ../shared with the built-in SmolLM2-135M in float32: equal within 1e-4 relative.

SmolLM2's tokenizer adds no BOS (GPT-2-like: Superfiltering's first direct answer token is not
scored; Cherry's "+ 4" then skips rows whose answer is cut). A copy of the same model whose
tokenizer adds a BOS (Llama-like) covers the other branch: Cherry truncates those answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine import reasons
from engine.parse import TURN_TYPE
from engine.records import content_id, to_canonical
from engine.signals.lm import CHERRY_PROMPT_INPUT, CHERRY_PROMPT_NO_INPUT, plan_records
from engine.stages.lm import LMScoringActor
from tests.support.ifd_reference import (
    CHERRY_PROMPT_DICT,
    SUPERFILTERING_PROMPT_DICT,
    cherry_ifd,
    superfiltering_ifd,
)

pytestmark = pytest.mark.slow

RTOL = 1e-4


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.fixture(scope="module")
def model_path() -> str:
    from engine.models import resolve_model

    return resolve_model("builtin:smollm2-135m")


@pytest.fixture(scope="module")
def bos_model_path(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same weights with a tokenizer that adds a BOS token (as Llama's does)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2_bos")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).symlink_to(Path(model_path) / name)
    AutoTokenizer.from_pretrained(model_path, add_bos_token=True).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference_model(model_path: str):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def rows(alpaca_rows: list[dict]) -> list[dict]:
    """50 real rows in file order: the first 25 with an input and the first 25 without."""
    with_input = [r for r in alpaca_rows if r["input"] != ""][:25]
    without = [r for r in alpaca_rows if r["input"] == ""][:25]
    return [*with_input, *without]


def winnow_scores(
    path: str, definition: str, rows: list[dict], max_length: int, tmp_path: Path
) -> list[dict]:
    """Rows -> canonical records -> a records-like Parquet file (the struct ingest writes) ->
    the LM stage's actor, as a run feeds it."""
    conversations = [to_canonical(r, "alpaca").conversation for r in rows]
    table = pa.table(
        {
            "id": [content_id(c) for c in conversations],
            "conversation": pa.array(conversations, pa.list_(TURN_TYPE)),
        }
    )
    pq.write_table(table, tmp_path / f"{definition}.parquet")
    actor = LMScoringActor(
        path,
        template="alpaca",
        max_length=max_length,
        max_turns=None,
        definition=definition,
        backend="transformers",
        dtype="float32",
        max_batch_tokens=4096,
        trust_remote_code=False,
        enforce_eager=True,
        num_threads=1,
        use_gpu=False,
    )
    out = actor(pq.read_table(tmp_path / f"{definition}.parquet")).to_pylist()
    actor.scorer.close()
    assert [o["id"] for o in out] == table["id"].to_pylist()
    return out


def check_cherry(ours: list[dict], rows: list[dict], tokenizer, model, max_length: int) -> dict:
    """Every row: skipped by both, or equal within RTOL; returns what was seen."""
    seen = {"scored": 0, "skipped": 0, "truncated": 0}
    for row, got in zip(rows, ours, strict=True):
        want = cherry_ifd(tokenizer, model, row, max_length)
        if want is None:
            assert math.isnan(got["ifd"]), row["instruction"]
            assert got["lm_reason"] in (reasons.LM_PROMPT_TOO_LONG, reasons.NO_SCORABLE_ANSWER)
            seen["skipped"] += 1
            continue
        assert got["lm_reason"] is None
        for key in ("loss_cond", "loss_direct", "ifd"):
            assert rel(got[key], want[key]) <= RTOL, (key, got[key], want[key], row)
        assert got["answer_tokens"] == want["answer_tokens"]
        seen["scored"] += 1
        seen["truncated"] += got["truncated"]
    return seen


def check_superfiltering(ours: list[dict], rows: list[dict], tokenizer, model, max_length: int):
    seen = {"scored": 0, "nan": 0}
    for row, got in zip(rows, ours, strict=True):
        want = superfiltering_ifd(tokenizer, model, row, max_length)
        if math.isnan(want["ifd_ppl"]):
            # a loss over no token: a one-token answer without BOS, or a prompt filling max_length
            assert math.isnan(got["ifd_ppl"]) and got["lm_reason"] is not None
            short = len(tokenizer.encode(row["output"])) < 2
            assert short or got["lm_reason"] == reasons.LM_PROMPT_TOO_LONG, row
            seen["nan"] += 1
            continue
        assert got["lm_reason"] is None
        for key in ("loss_cond", "loss_direct", "ifd", "ifd_ppl", "ppl_cond", "ppl_direct"):
            assert rel(got[key], want[key]) <= RTOL, (key, got[key], want[key], row)
        seen["scored"] += 1
    return seen


def test_templates_are_byte_identical_to_the_references() -> None:
    assert CHERRY_PROMPT_DICT["prompt_input"] == CHERRY_PROMPT_INPUT
    assert CHERRY_PROMPT_DICT["prompt_no_input"] == CHERRY_PROMPT_NO_INPUT
    from engine.signals.lm import SUPERFILTERING_PROMPT_INPUT, SUPERFILTERING_PROMPT_NO_INPUT

    assert SUPERFILTERING_PROMPT_DICT["prompt_input"] == SUPERFILTERING_PROMPT_INPUT
    assert SUPERFILTERING_PROMPT_DICT["prompt_no_input"] == SUPERFILTERING_PROMPT_NO_INPUT


def test_cherry_parity_on_50_alpaca_rows(model_path, reference_model, rows, tmp_path) -> None:
    ours = winnow_scores(model_path, "cherry", rows, 512, tmp_path)
    seen = check_cherry(ours, rows, load_tokenizer(model_path), reference_model, 512)
    assert seen["scored"] >= 48, seen


def test_superfiltering_parity_on_50_alpaca_rows(
    model_path, reference_model, rows, tmp_path
) -> None:
    ours = winnow_scores(model_path, "superfiltering", rows, 1024, tmp_path)
    seen = check_superfiltering(ours, rows, load_tokenizer(model_path), reference_model, 1024)
    # two one-token answers ("Yes", "Positive"): no direct loss without a BOS (NaN there too)
    assert seen["scored"] >= 45 and seen["nan"] >= 1, seen


def short_rows(alpaca_rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Rows around a small max_length, by the length of Cherry's prompt and whole text: three
    whose prompt alone fills it, four whose answer runs past it, three that fit."""
    groups: dict[str, list[dict]] = {"long_prompt": [], "long_answer": [], "fit": []}
    for row in alpaca_rows:
        template = CHERRY_PROMPT_DICT["prompt_input" if row["input"] else "prompt_no_input"]
        prompt = template.format_map(row)
        n_prompt = len(tokenizer.encode(prompt))
        n_whole = len(tokenizer.encode(prompt + row["output"]))
        if n_prompt >= max_length:
            groups["long_prompt"].append(row)
        elif n_whole > max_length + 8:
            groups["long_answer"].append(row)
        elif n_whole < max_length - 8:  # clear of the edge, whichever tokenizer counts
            groups["fit"].append(row)
        if all(len(v) >= k for v, k in zip(groups.values(), (3, 4, 3), strict=True)):
            break
    return [*groups["long_prompt"][:3], *groups["long_answer"][:4], *groups["fit"][:3]]


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
def test_cherry_parity_with_a_small_max_length(
    bos, model_path, bos_model_path, reference_model, alpaca_rows, tmp_path
) -> None:
    """max_length 96: prompts that fill it are skipped (`lm_prompt_too_long`); long answers are
    truncated at the tail with a BOS tokenizer, skipped without one (the "+ 4" quirk)."""
    path = bos_model_path if bos else model_path
    tokenizer = load_tokenizer(path)
    assert (tokenizer.encode("x")[0] == tokenizer.bos_token_id) == bos
    chosen = short_rows(alpaca_rows, tokenizer, 96)
    ours = winnow_scores(path, "cherry", chosen, 96, tmp_path)
    seen = check_cherry(ours, chosen, tokenizer, reference_model, 96)
    assert [o["lm_reason"] for o in ours[:3]] == [reasons.LM_PROMPT_TOO_LONG] * 3
    if bos:
        assert seen["truncated"] == 4 and seen["scored"] == 7, seen
    else:
        assert seen["truncated"] == 0 and seen["scored"] == 3, seen
        assert [o["lm_reason"] for o in ours[3:7]] == [reasons.LM_PROMPT_TOO_LONG] * 4


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
def test_superfiltering_parity_with_a_small_max_length(
    bos, model_path, bos_model_path, reference_model, alpaca_rows, tmp_path
) -> None:
    """max_length 96 (truncation on both sides, NaN where the prompt fills it) and the BOS
    branch: with a BOS every direct answer token is scored, without one the first is not."""
    path = bos_model_path if bos else model_path
    tokenizer = load_tokenizer(path)
    chosen = short_rows(alpaca_rows, tokenizer, 96)
    ours = winnow_scores(path, "superfiltering", chosen, 96, tmp_path)
    check_superfiltering(ours, chosen, tokenizer, reference_model, 96)
    assert any(o["truncated"] for o in ours)
    for row, got in zip(chosen, ours, strict=True):
        if got["lm_reason"] is None:
            n_direct = len(tokenizer.encode(row["output"]))
            assert got["answer_tokens"] >= 1 and n_direct >= 2


def test_split_input_survives_parquet_and_picks_the_template(model_path, rows) -> None:
    """The with-input template only for rows whose source had an input; a ShareGPT-like
    conversation (no `input`) uses the no-input one; multi-turn: each turn with its own user
    turn."""
    tokenizer = load_tokenizer(model_path)
    with_input, without = rows[0], rows[-1]
    conversations = [to_canonical(r, "alpaca").conversation for r in (with_input, without)]
    assert conversations[0][0]["input"] == with_input["input"]
    assert "input" not in conversations[1][0]
    chat = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Green."},
    ]
    table = pa.table({"conversation": pa.array([*conversations, chat], pa.list_(TURN_TYPE))})
    back = table["conversation"].to_pylist()
    plan = plan_records(tokenizer, back, 512, definition="cherry")
    assert [p.record for p in plan.turns] == [0, 1, 2, 2]
    texts = [tokenizer.decode(p.cond.token_ids) for p in plan.turns]
    assert "### Input:\n" + with_input["input"] + "\n\n### Response:" in texts[0]
    assert "### Input:" not in texts[1]
    assert texts[3].startswith(CHERRY_PROMPT_NO_INPUT.format(instruction="Another one."))
    assert "Name a colour." not in texts[3]
    direct = tokenizer.decode(plan.turns[3].direct.token_ids)
    assert direct == "### Response:Green."


def test_float32_is_float32_end_to_end(model_path) -> None:
    """dtype float32: weights, buffers, hidden states and the head's logits all in fp32."""
    from engine.backends.transformers_lm import TransformersScorer

    scorer = TransformersScorer(model_path, dtype="float32", num_threads=1)
    try:
        assert scorer.dtype == torch.float32
        assert {p.dtype for p in scorer.model.parameters()} == {torch.float32}
        floats = {b.dtype for b in scorer.model.buffers() if b.is_floating_point()}
        assert floats <= {torch.float32}
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.inference_mode():
            hidden = scorer.decoder(input_ids=ids).last_hidden_state
            assert hidden.dtype == torch.float32
            assert scorer._head_logits(hidden[0]).dtype == torch.float32
    finally:
        scorer.close()


def test_bos_copy_is_the_same_model(model_path, bos_model_path) -> None:
    """The BOS fixture changes the tokenizer only: same config, same ids after the BOS."""
    assert json.loads((Path(bos_model_path) / "config.json").read_text()) == json.loads(
        (Path(model_path) / "config.json").read_text()
    )
    plain, bos = load_tokenizer(model_path), load_tokenizer(bos_model_path)
    text = "### Response:Paris is the capital of France."
    assert bos.encode(text) == [bos.bos_token_id, *plain.encode(text)]
