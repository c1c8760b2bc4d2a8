"""Peer: data-juicer's `instruction_following_difficulty_filter` (IFD), stats only, on CPU.

The operator scores one sample at a time (two forward passes: with and without the query) on a
local model folder (`--model`, resolved by side_by_side.py: no download). Query template
`{instruction}\\n{input}`, response `{output}`, the model in `--dtype`. Model load is not timed.
Run with .venv-peers/data-juicer/bin/python.
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
    parser.add_argument("--max-length", type=int, default=512, help="not passed (see settings)")
    args = parser.parse_args()
    import torch
    from data_juicer.ops.filter.instruction_following_difficulty_filter import (
        InstructionFollowingDifficultyFilter,
    )
    from data_juicer.utils.constant import Fields, StatsKeys

    torch.set_num_threads(os.cpu_count() or 1)
    rows = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines()]
    op = InstructionFollowingDifficultyFilter(
        hf_model=args.model,
        model_params={"torch_dtype": getattr(torch, args.dtype)},
        min_score=0.0,
        max_score=1e9,
        query_template="{instruction}\n{input}",
        response_template="{output}",
    )
    warm = {**rows[0], Fields.stats: {}}
    op.compute_stats_single(warm)  # loads the model (untimed, as on Winnow's side)
    start = time.perf_counter()
    scores = []
    for row in rows:
        sample = {**row, Fields.stats: {}}
        op.compute_stats_single(sample)
        scores.append(float(sample[Fields.stats][StatsKeys.ifd_score]))
    seconds = time.perf_counter() - start
    finite = [s for s in scores if s == s and s not in (float("inf"), float("-inf"))]
    emit(
        len(rows),
        seconds,
        {
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "batch": 1,
            "template": "{instruction}\\n{input} + {output}, no chat template",
            "max_length": "none (operator default)",
        },
        quality={"finite_scores": len(finite)},
    )


if __name__ == "__main__":
    main()
