"""LM scoring arithmetic: which tokens are scored, and how NLLs become perplexity and IFD.

Pure and backend-neutral. Every backend receives the same token-id sequences built here and returns
per-token negative log-likelihoods (NLL) of the scored positions, so transformers and vLLM compute
the same numbers by construction.

For each assistant turn (multi-turn: the preceding turns are the prompt's context):
  prompt P = the template applied to the conversation so far; answer A = the turn's content.
  cond   sequence: P + A        scored positions: the answer tokens (each given all before it)
  direct sequence: [s] + A      scored positions: the answer tokens, given only a start token s
                                (the tokenizer's BOS, else EOS), as Cherry LLM's "answer alone"
  loss_cond / loss_direct = mean NLL over the answer tokens; ppl = exp(loss)
  ifd = loss_cond / loss_direct (Cherry LLM); ifd_ppl = ppl_cond / ppl_direct (Superfiltering)
Truncation to `max_length` tokens (both sides score the same answer tokens): when P + A is too
long, the answer keeps min(len(A), max(max_length - len(P), max_length // 2)) tokens from its
start and the prompt keeps its last tokens in the remaining room; `truncated` is then true.
A record's aggregate pools all its turns' answer tokens (token-weighted mean losses).

That is definition `winnow` (the default, and the only one with templates and multi-turn
history). Two more definitions reproduce the papers' code exactly (`plan_records`):

`cherry`: Cherry LLM, `cherry_seletion/data_analysis.py` + `data_by_IFD.py` (`--prompt alpaca`):
  prompt P = its Alpaca template, with-input variant when the row has an input, ending
  `### Response:` (no newline); cond text = P + A, direct text = '### Response:' + A; every text
  goes through `tokenizer.encode(text, truncation=True, max_length=...)` (the tokenizer's own
  special tokens, BOS included where it adds one, on both sides). The scored tokens start at
  `len(tokenizer.encode(text[:text.rfind(A)]))` (the prompt's token count, untruncated, special
  tokens included) and run to the end of the truncated sequence; loss = mean NLL over them.
  Lengths: max_length (default 512) truncates the cond text's tail; the direct text is truncated
  to `max_length - len(P) + 4` tokens (the reference's "+ 4"). A row is skipped (no score, reason
  `lm_prompt_too_long`) when its prompt fills max_length, or when `len(P) + direct answer tokens
  > max_length`. Quirk: that "+ 4" assumes '### Response:' is 4 tokens with BOS (Llama); with a
  tokenizer that adds no BOS it is 3 (SmolLM2, GPT-2), the direct side keeps one answer token
  more than the cond side and the second rule then skips every row whose answer is truncated.
`superfiltering`: Superfiltering, `code_ifd/data_analysis.py`: P = "{instruction}\n{input}\n"
  (or "{instruction}\n"); cond text = P + A, scored as Cherry's (model loss over the labels
  from `len(tokenizer.encode(P))` on, max_length default 1024); direct text = A alone, encoded
  with `max_length - len(P) + 1` and scored from its second token: with a BOS (Llama) every
  answer token is scored, without one (GPT-2, SmolLM2) the first answer token never is.
  A prompt that fills max_length gives NaN there (reason `lm_prompt_too_long` here).
Both score each answer on its own (the references are single-turn; our extension for chats:
every scorable assistant turn is scored with its own user turn as instruction, without the earlier
turns or the system prompt, and the turns pool as above). `template` does not apply to them. Their
cond and direct sides may score different token counts; `answer_tokens` counts the cond side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from engine import reasons
from engine.records import split_input
from engine.signals.turns import scorable_turns

Template = Literal["alpaca", "plain", "chat"]
Definition = Literal["winnow", "cherry", "superfiltering"]
DEFINITIONS: tuple[str, ...] = ("winnow", "cherry", "superfiltering")
# max_length when the settings leave it unset: the references' own defaults.
DEFAULT_MAX_LENGTH = {"winnow": 1024, "cherry": 512, "superfiltering": 1024}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Cherry LLM, cherry_seletion/data_analysis.py PROMPT_DICT: byte-identical.
CHERRY_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
CHERRY_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CHERRY_DIRECT_PREFIX = "### Response:"  # direct_answer_text = '### Response:' + output
# Superfiltering, code_ifd/data_analysis.py PROMPT_DICT_NONE: byte-identical.
SUPERFILTERING_PROMPT_INPUT = "{instruction}\n{input}\n"
SUPERFILTERING_PROMPT_NO_INPUT = "{instruction}\n"

LM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("loss_direct", pa.float64()),
        ("loss_cond", pa.float64()),
        ("ppl_direct", pa.float64()),
        ("ppl_cond", pa.float64()),
        ("ifd", pa.float64()),
        ("ifd_ppl", pa.float64()),
        ("answer_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("lm_turns", pa.int32()),
        ("turn_ifd", pa.list_(pa.float64())),
        ("lm_reason", pa.string()),
    ]
)
LM_COLUMNS: tuple[str, ...] = tuple(LM_SCHEMA.names[1:])


@dataclass(frozen=True)
class ScoredSequence:
    """One sequence for a backend: score NLL of tokens[score_from:] given what precedes each."""

    token_ids: list[int]
    score_from: int


@dataclass(frozen=True)
class TurnPlan:
    record: int
    turn: int
    cond: ScoredSequence
    direct: ScoredSequence
    truncated: bool


def render_prompt(tokenizer: Any, history: list[dict[str, str]], template: Template) -> str:
    """The text that precedes an assistant answer, by template."""
    if template == "chat":
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    turns = [m["content"] for m in history if m["role"] != "system"]
    system = [m["content"] for m in history if m["role"] == "system"]
    if template == "alpaca":
        instruction = "\n\n".join([*system, *turns])
        return ALPACA_PROMPT.format(instruction=instruction)
    return "\n".join([*system, *turns]) + "\n"


def start_token(tokenizer: Any) -> int:
    token = tokenizer.bos_token_id
    if token is None:
        token = tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a sequence")
    return int(token)


def fit(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """The truncation rule shared by every backend (see the module docstring)."""
    if len(prompt) + len(answer) <= max_length:
        return prompt, answer, False
    keep_answer = min(len(answer), max(max_length - len(prompt), max_length // 2))
    keep_prompt = max_length - keep_answer
    return prompt[len(prompt) - keep_prompt :], answer[:keep_answer], True


def plan_turns(
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    template: Template,
    max_length: int,
    max_turns: int | None = None,
) -> list[TurnPlan]:
    """Every (record, assistant turn) to score, with its cond and direct sequences; with
    `max_turns`, only each record's first `max_turns` scorable assistant turns (long chats cost
    less; which turns are scorable and how they are numbered: engine.signals.turns)."""
    if max_length < 4:
        raise ValueError("max_length must be at least 4 tokens")
    start = start_token(tokenizer)
    plans = []
    for r, conversation in enumerate(conversations):
        for t in scorable_turns(conversation, max_turns):
            history = conversation[: t.index]
            prompt = tokenizer(
                render_prompt(tokenizer, history, template), add_special_tokens=False
            )
            answer = tokenizer(conversation[t.index]["content"], add_special_tokens=False)
            # A prompt that renders to no tokens still needs one context token to score from.
            p, a, truncated = fit(prompt["input_ids"] or [start], answer["input_ids"], max_length)
            if a:
                plans.append(
                    TurnPlan(
                        record=r,
                        turn=t.turn,
                        cond=ScoredSequence(p + a, len(p)),
                        direct=ScoredSequence([start, *a], 1),
                        truncated=truncated,
                    )
                )
    return plans


@dataclass(frozen=True)
class LMPlan:
    """What a batch of records scores: its turns, and why a record without any has none."""

    turns: list[TurnPlan]
    skipped: dict[int, str]  # record -> reason, for records with no planned turn


def encode(tokenizer: Any, text: str, max_length: int | None = None) -> list[int]:
    """`tokenizer.encode` as both references call it: the tokenizer's own special tokens, and
    truncation of the tail to `max_length` tokens (special tokens included) when given."""
    if max_length is None:
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, truncation=True, max_length=max_length))


def answer_start(tokenizer: Any, text: str, answer: str) -> int:
    """The references' first scored position: the token count of the text before the answer's
    last occurrence (`len(tokenizer.encode(text[:text.rfind(answer)]))`, untruncated, special
    tokens included). Where the tokenizer merges across the prompt/answer boundary this is off
    from the answer's true first token, in the reference too; it is kept as is."""
    return len(encode(tokenizer, text[: text.rfind(answer)]))


def _cherry_turn(
    tokenizer: Any, instruction: str, extra: str, answer: str, max_length: int
) -> tuple[ScoredSequence, ScoredSequence, bool] | str:
    """Cherry LLM's cond and direct sequences for one answer, or the reason it is skipped."""
    if extra != "":
        prompt = CHERRY_PROMPT_INPUT.format_map({"instruction": instruction, "input": extra})
    else:
        prompt = CHERRY_PROMPT_NO_INPUT.format_map({"instruction": instruction})
    whole, direct_text = prompt + answer, CHERRY_DIRECT_PREFIX + answer
    prompt_len = len(encode(tokenizer, prompt, max_length))
    if max_length - prompt_len <= 0:  # data_by_IFD: `if args.max_length-instruct_i_len > 0`
        return reasons.LM_PROMPT_TOO_LONG
    direct = encode(tokenizer, direct_text, max_length - prompt_len + 4)
    direct_from = answer_start(tokenizer, direct_text, answer)
    cond = encode(tokenizer, whole, max_length)
    cond_from = answer_start(tokenizer, whole, answer)
    direct_len, cond_len = len(direct) - direct_from, len(cond) - cond_from
    if direct_len <= 0 or cond_len <= 0 or min(direct_from, cond_from) < 1:
        return reasons.NO_SCORABLE_ANSWER
    if prompt_len + direct_len > max_length:
        return reasons.LM_PROMPT_TOO_LONG
    truncated = len(encode(tokenizer, whole)) > len(cond)
    return ScoredSequence(cond, cond_from), ScoredSequence(direct, direct_from), truncated


def _superfiltering_turn(
    tokenizer: Any, instruction: str, extra: str, answer: str, max_length: int
) -> tuple[ScoredSequence, ScoredSequence, bool] | str:
    """Superfiltering's cond and direct sequences for one answer, or the reason it is skipped
    (where the reference's losses are NaN)."""
    if extra != "":
        prompt = SUPERFILTERING_PROMPT_INPUT.format_map(
            {"instruction": instruction, "input": extra}
        )
    else:
        prompt = SUPERFILTERING_PROMPT_NO_INPUT.format_map({"instruction": instruction})
    whole = prompt + answer
    prompt_len = len(encode(tokenizer, prompt, max_length))
    if prompt_len >= max_length:  # the direct side keeps 1 token, the cond side none: NaN
        return reasons.LM_PROMPT_TOO_LONG
    # `labels=input_ids`: the model's shifted loss never scores position 0
    direct = encode(tokenizer, answer, max_length - prompt_len + 1)
    cond = encode(tokenizer, whole, max_length)
    cond_from = max(1, answer_start(tokenizer, whole, answer))
    if len(direct) < 2 or cond_from >= len(cond):  # a loss over no token: NaN in the reference
        return reasons.NO_SCORABLE_ANSWER
    truncated = len(encode(tokenizer, whole)) > len(cond)
    return ScoredSequence(cond, cond_from), ScoredSequence(direct, 1), truncated


_REFERENCE_TURN = {"cherry": _cherry_turn, "superfiltering": _superfiltering_turn}


def plan_records(
    tokenizer: Any,
    conversations: Sequence[list[dict[str, Any]]],
    max_length: int,
    max_turns: int | None = None,
    definition: Definition = "winnow",
    template: Template = "alpaca",
) -> LMPlan:
    """Every turn to score under `definition` (see the module docstring); `template` only
    applies to `winnow`."""
    if definition == "winnow":
        return LMPlan(plan_turns(tokenizer, conversations, template, max_length, max_turns), {})
    if definition not in _REFERENCE_TURN:
        raise ValueError(f"definition must be one of {', '.join(DEFINITIONS)}, got {definition!r}")
    if max_length < 4:
        raise ValueError("max_length must be at least 4 tokens")
    plan_turn = _REFERENCE_TURN[definition]
    turns: list[TurnPlan] = []
    skipped: dict[int, str] = {}
    for r, conversation in enumerate(conversations):
        why: set[str] = set()
        planned = 0
        for t in scorable_turns(conversation, max_turns):
            instruction, extra = split_input(conversation[t.user_index])
            out = plan_turn(
                tokenizer, instruction, extra, conversation[t.index]["content"], max_length
            )
            if isinstance(out, str):
                why.add(out)
                continue
            cond, direct, truncated = out
            turns.append(TurnPlan(r, t.turn, cond, direct, truncated))
            planned += 1
        if not planned:
            skipped[r] = (
                reasons.LM_PROMPT_TOO_LONG
                if reasons.LM_PROMPT_TOO_LONG in why
                else reasons.NO_SCORABLE_ANSWER
            )
    return LMPlan(turns, skipped)


def mean_loss(nll: np.ndarray) -> float:
    return float(np.mean(nll)) if len(nll) else math.nan


def turn_signals(cond_nll: np.ndarray, direct_nll: np.ndarray) -> dict[str, float]:
    """IFD arithmetic for one answer: both NLL arrays cover the same answer tokens."""
    loss_cond, loss_direct = mean_loss(cond_nll), mean_loss(direct_nll)
    ppl_cond, ppl_direct = math.exp(loss_cond), math.exp(loss_direct)
    return {
        "loss_cond": loss_cond,
        "loss_direct": loss_direct,
        "ppl_cond": ppl_cond,
        "ppl_direct": ppl_direct,
        "ifd": loss_cond / loss_direct if loss_direct > 0 else math.nan,
        "ifd_ppl": ppl_cond / ppl_direct,
    }


def record_signals(
    ids: Sequence[str],
    plans: Sequence[TurnPlan],
    cond_nll: Sequence[np.ndarray],
    direct_nll: Sequence[np.ndarray],
    skipped: dict[int, str] | None = None,
) -> pa.RecordBatch:
    """Per-record columns: pooled over turns (token-weighted), plus each turn's IFD; a record
    without turns gets NaN and its reason from `skipped` (default: no scorable answer)."""
    by_record: dict[int, list[int]] = {}
    for k, plan in enumerate(plans):
        by_record.setdefault(plan.record, []).append(k)
    out: dict[str, list] = {name: [] for name in LM_SCHEMA.names}
    for r, record_id in enumerate(ids):
        out["id"].append(record_id)
        turns = by_record.get(r, [])
        if not turns:
            for name in ("loss_direct", "loss_cond", "ppl_direct", "ppl_cond", "ifd", "ifd_ppl"):
                out[name].append(math.nan)
            out["answer_tokens"].append(0)
            out["truncated"].append(False)
            out["lm_turns"].append(0)
            out["turn_ifd"].append([])
            out["lm_reason"].append((skipped or {}).get(r, reasons.NO_SCORABLE_ANSWER))
            continue
        pooled = turn_signals(
            np.concatenate([cond_nll[k] for k in turns]),
            np.concatenate([direct_nll[k] for k in turns]),
        )
        for name, value in pooled.items():
            out[name].append(value)
        out["answer_tokens"].append(int(sum(len(cond_nll[k]) for k in turns)))
        out["truncated"].append(any(plans[k].truncated for k in turns))
        out["lm_turns"].append(len(turns))
        out["turn_ifd"].append([turn_signals(cond_nll[k], direct_nll[k])["ifd"] for k in turns])
        out["lm_reason"].append(None)
    return pa.RecordBatch.from_pydict(out, schema=LM_SCHEMA)
