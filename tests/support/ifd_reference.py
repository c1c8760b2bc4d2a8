"""Per-sample IFD as the papers' reference code computes it, for the parity tests.

Written from the references' logic, independently of engine.signals.lm (nothing is imported from
it): one forward pass per text, full-vocabulary logits, the references' own tokenization calls
(`tokenizer.encode(text, truncation=True, max_length=...)`, the tokenizer's special tokens) and
their losses.

- `cherry_ifd`: Cherry LLM, `cherry_seletion/data_analysis.py` (`--mod cherry --prompt alpaca`)
  for the token losses, `cherry_seletion/data_by_IFD.py` for the slicing, the skip rules and the
  ratio of means.
- `superfiltering_ifd`: Superfiltering, `code_ifd/data_analysis.py` (the model's own `labels`
  loss) and `put_analysis_to_data.py` (ifd_ppl = ppl_condition / ppl_direct).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

# cherry_seletion/data_analysis.py, PROMPT_DICT (verbatim: the template must be byte-identical)
CHERRY_PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

# code_ifd/data_analysis.py, PROMPT_DICT_NONE (verbatim)
SUPERFILTERING_PROMPT_DICT = {
    "prompt_input": ("{instruction}\n{input}\n"),
    "prompt_no_input": ("{instruction}\n"),
}

_log_softmax = nn.LogSoftmax(dim=-1)
_nll_loss = nn.NLLLoss(reduction="none")


def _cherry_token_losses(
    tokenizer: Any, model: Any, text: str, target_span: str, max_length: int
) -> list[float]:
    """data_analysis.py `get_perplexity_and_embedding_part_text`: the loss of every token 1 ..
    end-1 of the truncated text, each from its own log_softmax (the reference's loop)."""
    input_ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    start_index = text.rfind(target_span)
    start_token = len(tokenizer.encode(text[:start_index]))
    end_token = input_ids.shape[1]
    labels = input_ids.clone()
    labels[0, :start_token] = -100
    with torch.no_grad():
        outputs = model(input_ids, labels=labels)
    losses = []
    logits = outputs.logits
    for i in range(1, end_token):
        log_prob_dist = _log_softmax(logits[0, i - 1])
        true_token = input_ids[0, i]
        token_loss = _nll_loss(log_prob_dist.unsqueeze(0), true_token.unsqueeze(0))
        losses.append(token_loss.item())
    return losses


def _cherry_loss_part(
    tokenizer: Any, text: str, target_span: str, max_length: int, loss_list: list[float]
) -> tuple[int, list[float]]:
    """data_by_IFD.py `get_loss_part_text`: the answer's slice of the token losses."""
    input_ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    start_index = text.rfind(target_span)
    start_token = len(tokenizer.encode(text[:start_index]))
    end_token_real = input_ids.shape[1]
    return end_token_real - start_token, loss_list[start_token - 1 : end_token_real - 1]


def cherry_ifd(
    tokenizer: Any, model: Any, row: dict[str, str], max_length: int = 512
) -> dict[str, float] | None:
    """Cherry LLM's IFD for one Alpaca row, or None where data_by_IFD.py skips the row (before
    its `mean_rate > 1` selection rule, which is not part of the score)."""
    instruct_i, output_i = row["instruction"], row["output"]
    direct_answer_text = "### Response:" + output_i
    input_i = row.get("input", "")
    if input_i == "":
        prompt = CHERRY_PROMPT_DICT["prompt_no_input"].format_map({"instruction": instruct_i})
    else:
        prompt = CHERRY_PROMPT_DICT["prompt_input"].format_map(
            {"instruction": instruct_i, "input": input_i}
        )
    whole_text = prompt + output_i
    instruct_i_len = tokenizer.encode(
        prompt, return_tensors="pt", truncation=True, max_length=max_length
    ).shape[1]
    if not max_length - instruct_i_len > 0:
        return None
    direct_max = max_length - instruct_i_len + 4
    loss_alone = _cherry_token_losses(tokenizer, model, direct_answer_text, output_i, direct_max)
    loss_condition = _cherry_token_losses(tokenizer, model, whole_text, output_i, max_length)
    len_1, part_1 = _cherry_loss_part(
        tokenizer, direct_answer_text, output_i, direct_max, loss_alone
    )
    len_2, part_2 = _cherry_loss_part(tokenizer, whole_text, output_i, max_length, loss_condition)
    if len_1 <= 0 or len_2 <= 0:
        return None
    if instruct_i_len + len_1 > max_length:
        return None
    mean_1 = float(torch.tensor(part_1, dtype=torch.float64).mean())
    mean_2 = float(torch.tensor(part_2, dtype=torch.float64).mean())
    return {
        "loss_direct": mean_1,
        "loss_cond": mean_2,
        "ifd": mean_2 / mean_1,
        "answer_tokens": len_2,
    }


def _superfiltering_loss(
    tokenizer: Any, model: Any, text: str, max_length: int, target_span: str | None
) -> float:
    """data_analysis.py: the model's own loss with `labels` (the whole text when `target_span`
    is None, else the part from the span's start token on)."""
    input_ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    labels = input_ids.clone()
    if target_span is not None:
        start_index = text.rfind(target_span)
        start_token = len(tokenizer.encode(text[:start_index]))
        labels[0, :start_token] = -100
    with torch.no_grad():
        outputs = model(input_ids, labels=labels)
    return float(outputs.loss)


def superfiltering_ifd(
    tokenizer: Any, model: Any, row: dict[str, str], max_length: int = 1024
) -> dict[str, float]:
    """Superfiltering's scores for one Alpaca row (NaN where the reference's loss is NaN)."""
    instruct_i, output_i = row["instruction"], row["output"]
    input_i = row.get("input", "")
    if input_i == "":
        prompt = SUPERFILTERING_PROMPT_DICT["prompt_no_input"].format_map(
            {"instruction": instruct_i}
        )
    else:
        prompt = SUPERFILTERING_PROMPT_DICT["prompt_input"].format_map(
            {"instruction": instruct_i, "input": input_i}
        )
    whole_text = prompt + output_i
    instruct_i_len = tokenizer.encode(
        prompt, return_tensors="pt", truncation=True, max_length=max_length
    ).shape[1]
    loss_alone = _superfiltering_loss(
        tokenizer, model, output_i, max_length - instruct_i_len + 1, None
    )
    loss_condition = _superfiltering_loss(tokenizer, model, whole_text, max_length, output_i)
    ppl_alone, ppl_condition = math.exp(loss_alone), math.exp(loss_condition)
    return {
        "loss_direct": loss_alone,
        "loss_cond": loss_condition,
        "ppl_direct": ppl_alone,
        "ppl_cond": ppl_condition,
        "ifd": loss_condition / loss_alone,
        "ifd_ppl": ppl_condition / ppl_alone,
    }
