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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from engine import reasons
from engine.signals.turns import scorable_turns

Template = Literal["alpaca", "plain", "chat"]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

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
    `max_turns`, only each record's first `max_turns` assistant turns (long chats cost less)."""
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
) -> pa.RecordBatch:
    """Per-record columns: pooled over turns (token-weighted), plus each turn's IFD."""
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
            out["lm_reason"].append(reasons.NO_SCORABLE_ANSWER)
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
