"""Benchmark: LLM-judge throughput of each backend, batched and one request at a time.

The same N real Alpaca rows (default 256) are judged by the `alpagasus` judge (its prompts from
`engine.signals.judge.build_prompt`) with the built-in SmolLM2-135M on:
  transformers  `TransformersJudge` (batches of --batch-size, length-sorted)
  vllm          `VllmJudge`, the offline engine (every prompt in one `generate` call)
  openai        `OpenAIJudge` against a local `vllm serve` of the same model (--concurrency
                requests in flight, no request cache)
Each backend is also run the way the reference implementations call a judge (AlpaGasus' and
DEITA's scripts, data-juicer's llm_quality_score_filter): a loop that sends one prompt, waits for
the reply, then sends the next. That loop runs on the first --single-rows rows (all rows are
too slow on 2 cores); its rows/s is measured on those. Speed-ups are against the one-at-a-time
loop of the same backend, and against the transformers one-at-a-time loop (the reference).
Per backend the expected scores (or parsed replies) are compared with the transformers batched
scores: mean absolute difference over rows both scored.

Engine start-up (model load, server start) is timed separately and not in rows/s. Backends run
one after another, each closed before the next starts (two vLLM engines would not fit together
in a small machine's memory next to other work).

Run: .venv/bin/python jobs/bench/judge_throughput.py --rows 256 --single-rows 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ALPACA = REPO.parent / "shared/data/alpaca_random_9k.json"
BACKENDS = ("transformers", "vllm", "openai")
SERVED_NAME = "smollm2-135m"


@dataclass
class Timing:
    backend: str
    mode: str  # "batched" or "one-at-a-time"
    rows: int = 0
    seconds: float = 0.0
    start_s: float = 0.0
    scores: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def rows_s(self) -> float:
        return self.rows / self.seconds if self.seconds else math.nan


def judge_prompts(n: int, max_length: int) -> tuple[list[list[dict[str, str]]], Any]:
    """AlpaGasus prompts of the first `n` Alpaca rows (one assistant turn each)."""
    from engine.records import to_canonical
    from engine.signals.judge import ALPAGASUS, build_prompt, plan_judge_turns

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:n]
    conversations = [to_canonical(r, "alpaca").conversation for r in rows]
    turns = plan_judge_turns(conversations)
    return [build_prompt(ALPAGASUS, t, max_length=max_length) for t in turns], ALPAGASUS


def scores_of(replies: Sequence[Any], judge: Any) -> list[float]:
    from engine.signals.judge import turn_score

    return [turn_score(r.text, r.score_logprobs, judge.scale) for r in replies]


def run_modes(
    name: str,
    backend: Any,
    prompts: list[list[dict[str, str]]],
    judge: Any,
    single_rows: int,
    start_s: float,
    note: str = "",
) -> list[Timing]:
    """Time the batched call over all prompts and the one-at-a-time loop over the first few."""
    tokens = list(judge.score_tokens)
    backend.judge(prompts[:2], tokens)  # warm-up (first-call compilation, connections)
    batched = Timing(name, "batched", start_s=start_s, note=note)
    began = time.perf_counter()
    replies = backend.judge(prompts, tokens)
    batched.seconds = time.perf_counter() - began
    batched.rows = len(replies)
    batched.scores = scores_of(replies, judge)
    print(f"  {name} batched: {batched.rows} rows in {batched.seconds:.1f} s", flush=True)
    single = Timing(name, "one-at-a-time", start_s=start_s, note=note)
    began = time.perf_counter()
    one_by_one = [backend.judge([p], tokens)[0] for p in prompts[:single_rows]]
    single.seconds = time.perf_counter() - began
    single.rows = len(one_by_one)
    single.scores = scores_of(one_by_one, judge)
    print(f"  {name} one-at-a-time: {single.rows} rows in {single.seconds:.1f} s", flush=True)
    return [batched, single]


def bench_transformers(
    model: str, prompts: list, judge: Any, args: argparse.Namespace
) -> list[Timing]:
    from engine.backends.judge_transformers import TransformersJudge

    began = time.perf_counter()
    backend = TransformersJudge(
        model,
        dtype=args.dtype,
        max_length=args.max_length,
        max_batch_prompts=args.batch_size,
        num_threads=args.threads,
    )
    start_s = time.perf_counter() - began
    try:
        return run_modes(
            "transformers",
            backend,
            prompts,
            judge,
            args.single_rows,
            start_s,
            note=f"{args.dtype}, batch {args.batch_size}, {args.threads} threads",
        )
    finally:
        backend.close()


def bench_vllm(model: str, prompts: list, judge: Any, args: argparse.Namespace) -> list[Timing]:
    from engine.backends.judge_vllm import VllmJudge

    began = time.perf_counter()
    backend = VllmJudge(model, dtype=args.vllm_dtype, max_length=args.max_length)
    start_s = time.perf_counter() - began
    try:
        return run_modes(
            "vllm", backend, prompts, judge, args.single_rows, start_s, note=args.vllm_dtype
        )
    finally:
        backend.close()


def bench_openai(model: str, prompts: list, judge: Any, args: argparse.Namespace) -> list[Timing]:
    from engine.backends.judge_openai import OpenAIJudge

    if str(REPO) not in sys.path:  # the `vllm serve` harness lives with the tests
        sys.path.insert(0, str(REPO))
    from tests.support.vllm_server import VllmServer

    server = VllmServer(
        model,
        served_model_name=SERVED_NAME,
        dtype=args.vllm_dtype,
        max_model_len=args.max_length + 16,
        startup_timeout_s=900,
    )
    began = time.perf_counter()
    server.start()
    start_s = time.perf_counter() - began
    try:
        batched_client = OpenAIJudge(
            server.base_url,
            SERVED_NAME,
            concurrency=args.concurrency,
            max_new_tokens=args.openai_max_new_tokens,
        )
        out = run_modes(
            "openai",
            batched_client,
            prompts,
            judge,
            args.single_rows,
            start_s,
            note=(
                f"vllm serve {args.vllm_dtype}, {args.concurrency} in flight, "
                f"max_tokens {args.openai_max_new_tokens}"
            ),
        )
        batched_client.close()
        return out
    finally:
        server.close()


RUNNERS: dict[str, Callable[[str, list, Any, argparse.Namespace], list[Timing]]] = {
    "transformers": bench_transformers,
    "vllm": bench_vllm,
    "openai": bench_openai,
}


def mean_abs_diff(a: Sequence[float], b: Sequence[float]) -> tuple[float, int]:
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        return math.nan, 0
    return sum(abs(x - y) for x, y in pairs) / len(pairs), len(pairs)


def report(results: list[Timing]) -> str:
    by = {(t.backend, t.mode): t for t in results}
    reference = by.get(("transformers", "one-at-a-time"))
    base_scores = by.get(("transformers", "batched"))
    lines = [
        f"{'backend':<13} {'mode':<14} {'rows':>5} {'seconds':>8} {'rows/s':>7} "
        f"{'vs own 1-at-a-time':>18} {'vs reference':>12} {'start s':>8} {'|dscore|':>9} "
        f"{'nan':>4}  note"
    ]
    for t in results:
        own = by.get((t.backend, "one-at-a-time"))
        vs_own = t.rows_s / own.rows_s if own and own.rows_s else math.nan
        vs_ref = t.rows_s / reference.rows_s if reference and reference.rows_s else math.nan
        diff, _ = mean_abs_diff(t.scores, base_scores.scores) if base_scores else (math.nan, 0)
        nans = sum(1 for s in t.scores if math.isnan(s))
        lines.append(
            f"{t.backend:<13} {t.mode:<14} {t.rows:>5} {t.seconds:>8.1f} {t.rows_s:>7.2f} "
            f"{vs_own:>17.2f}x {vs_ref:>11.2f}x {t.start_s:>8.1f} {diff:>9.3f} {nans:>4}  {t.note}"
        )
    lines.append(
        "reference = transformers one request at a time (the loop of AlpaGasus/DEITA scripts); "
        "|dscore| = mean |score - transformers batched score| over rows both scored"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--single-rows", type=int, default=32)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="transformers dtype")
    parser.add_argument("--vllm-dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2, help="transformers torch threads")
    parser.add_argument("--concurrency", type=int, default=8, help="openai requests in flight")
    parser.add_argument(
        "--openai-max-new-tokens",
        type=int,
        default=1,
        help="1: the score comes from the first token's log-probabilities, as the other "
        "backends generate; the stage default is 8 (text to parse where logprobs are missing)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.models import resolve_model

    model = resolve_model("builtin:smollm2-135m", None)
    prompts, judge = judge_prompts(args.rows, args.max_length)
    args.single_rows = min(args.single_rows, len(prompts))
    print(
        f"{len(prompts)} alpagasus prompts, one-at-a-time on {args.single_rows}; "
        f"model {model}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: list[Timing] = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(f"[{name}]", flush=True)
        results.extend(RUNNERS[name](model, prompts, judge, args))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    print(report(results))
    if args.out:
        args.out.write_text(
            json.dumps([asdict(t) | {"rows_s": t.rows_s} for t in results], indent=2)
        )


if __name__ == "__main__":
    main()
