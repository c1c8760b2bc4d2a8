"""Fallback peer: the batch-1 reference loop of Cherry LLM / Superfiltering (one forward per
sequence, full-vocabulary logits, `engine.backends.transformers_lm.reference_token_nll`) on the
same cond + direct sequences Winnow plans. Run with the project's .venv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="Alpaca rows, JSONL")
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.backends.transformers_lm import reference_token_nll
    from jobs.bench.lm_throughput import plan_rows

    torch.set_num_threads(os.cpu_count() or 1)
    rows = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    plans = plan_rows(tokenizer, rows, args.max_length)
    reference_token_nll(model, [plans[0].cond])  # first-call costs stay out of the timing
    start = time.perf_counter()
    for plan in plans:
        reference_token_nll(model, [plan.cond, plan.direct])
    seconds = time.perf_counter() - start
    emit(
        len(rows),
        seconds,
        {"dtype": args.dtype, "threads": torch.get_num_threads(), "batch": 1},
    )


if __name__ == "__main__":
    main()
