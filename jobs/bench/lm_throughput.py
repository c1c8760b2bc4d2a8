"""Benchmark: LM scoring (IFD) throughput of each backend against the batch-1 reference loop.

On the first N real Alpaca rows (template "alpaca", the built-in SmolLM2-135M, `max_length`
tokens) every configuration scores the same cond + direct sequences that `engine.signals.lm`
plans:
  (a) reference: the batch-1 loop of Cherry LLM / Superfiltering (fp32, one forward per sequence,
      full-vocabulary logits)                        `reference_token_nll`
  (b) TransformersScorer fp32 (length-bucketed batches, answer-only logits)
  (c) TransformersScorer bf16 (only where the CPU has native bf16, unless --bf16 on)
  (d) VllmScorer (eager; bf16 where native, else fp32: --vllm-dtype), when vLLM is importable
(a)-(c) run with torch threads = 1 and = 2. Throughput counts every token of every sequence
processed (cond + direct). Records go to the scorers in batches of --batch-rows, as the pipeline's
actors receive them, in a seeded random order (a representative sample when not all rows are
reached). (a)-(c) are interleaved: each batch is scored by every configuration in turn, so load
from other processes on a shared machine hits them alike; a configuration drops out once its
scoring time passes --budget-s (vLLM, a separate engine process, runs afterwards on the same
batches with the same budget). tokens/s is measured on the rows each one scored and the wall time
for all rows is extrapolated per token (marked "~" in the output). The machine's matmul ceiling
(square products up to 2048^2, `torch.matmul` and `F.linear`, fp32 and bf16, 1 and 2 threads; the
better op counts) becomes a ceiling in tokens/s = FLOP/s / (2 x parameters).

`--stage` also runs the lm stage itself on the same rows, per dtype, through
`winnow select --signals lm` (a subprocess; default resources, and --stage-resources too), and
compares its rows/s (rows / the stage's seconds in the run's `_stages/lm.json`: Ray Data, the
actor's model load and the Parquet hand-off included) with the bare scorer's at the machine's
thread count.

Run: .venv/bin/python jobs/bench/lm_throughput.py --rows 512 --max-length 512
     .venv/bin/python jobs/bench/lm_throughput.py --rows 128 --max-length 1024 --threads 2 \
         --no-vllm --stage
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
ALPACA = REPO.parent / "shared/data/alpaca_random_9k.json"


@dataclass
class Result:
    name: str
    dtype: str
    threads: str
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    nll: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def gemm_gflops(op: str, dtype_name: str, threads: int, budget_s: float = 3.0) -> tuple[float, int]:
    """Best GFLOP/s of a square `torch.matmul` (op "matmul") or `F.linear` (op "linear", what the
    model's layers call) with `threads` threads: 2048^2 where one product takes under a second,
    smaller where the kernel is slow (bf16 `torch.matmul` without native bf16: ~1 GFLOP/s)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    fn = torch.matmul if op == "matmul" else F.linear

    def timed(n: int) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        fn(a, b)  # warm-up
        start = time.perf_counter()
        fn(a, b)
        return time.perf_counter() - start

    probe = timed(512)
    n = next((n for n in (2048, 1024) if probe * (n / 512) ** 3 < 1.0), 512)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    fn(a, b)
    best, spent = float("inf"), 0.0
    for _ in range(4):
        start = time.perf_counter()
        fn(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return 2 * n**3 / best / 1e9, n


def plan_rows(tokenizer, rows: list[dict], max_length: int):
    from engine.records import to_canonical
    from engine.signals.lm import plan_turns

    conversations = [to_canonical(row, "alpaca").conversation for row in rows]
    return plan_turns(tokenizer, conversations, "alpaca", max_length)


@dataclass
class Config:
    result: Result
    score: Callable[[Sequence], list[np.ndarray]]
    threads: int | None  # torch threads to set before each call (None: the backend's own)


def round_robin(configs: list[Config], batches: list[list], budget_s: float) -> None:
    """Score the same batches with every configuration in turn, batch by batch (the order
    alternates), so load from other processes hits all of them alike. A configuration drops out
    once its own scoring time passes `budget_s` (its last batch completes)."""
    import torch

    warm = batches[0][:2]
    for config in configs:  # first-call costs (allocator, oneDNN primitives) stay out of the timing
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        config.score([p.cond for p in warm] + [p.direct for p in warm])
    active = list(configs)
    for b, batch in enumerate(batches):
        if not active:
            break
        sequences = [p.cond for p in batch] + [p.direct for p in batch]
        tokens = sum(len(s.token_ids) for s in sequences)
        for config in active if b % 2 == 0 else active[::-1]:
            if config.threads is not None:
                torch.set_num_threads(config.threads)
            start = time.perf_counter()
            nll = config.score(sequences)
            result = config.result
            result.seconds += time.perf_counter() - start
            result.tokens += tokens
            result.rows += len(batch)
            for k, plan in enumerate(batch):
                result.nll[(plan.record, plan.turn)] = (nll[k], nll[len(batch) + k])
        active = [c for c in active if c.result.seconds < budget_s]


def max_rel_diff(a: Result, b: Result) -> tuple[float, int]:
    """Max relative difference of per-sequence mean NLL over the records both scored."""
    common = sorted(set(a.nll) & set(b.nll))
    worst = 0.0
    for r in common:
        for x, y in zip(a.nll[r], b.nll[r], strict=True):
            worst = max(worst, abs(x.mean() - y.mean()) / abs(y.mean()))
    return worst, len(common)


def stage_run(
    rows: list[dict], dtype: str, max_length: int, resources: dict | None
) -> tuple[float, dict]:
    """(rows/s, the stage's info) of the lm stage on `rows` through `winnow select`, in a fresh
    run directory and score cache (no scores cached; the built-in model's converted folder is
    shared)."""
    from engine.models import cache_root

    work = Path(tempfile.mkdtemp(prefix="winnow-bench-lm-stage-"))
    try:
        data = work / "rows.json"
        data.write_text(json.dumps(rows), encoding="utf-8")
        lm: dict = {"dtype": dtype, "max_length": max_length}
        if resources:
            lm["resources"] = resources
        config = work / "job.yaml"  # JSON is YAML
        config.write_text(json.dumps({"stages": {"lm": lm}}), encoding="utf-8")
        env = {**os.environ, "WINNOW_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        # An empty score cache, but the built-in model already converted (this process did it):
        # a one-time GGUF conversion (~20 s) is not the stage's throughput.
        (work / "cache").mkdir()
        (work / "cache/models").symlink_to(cache_root() / "models", target_is_directory=True)
        winnow = Path(sys.executable).with_name("winnow")
        command = [str(winnow), "select", str(data), "--out", str(work / "run")]
        command += ["--signals", "lm", "--dedup", "none", "--select", "ifd", "--budget", "10"]
        command += ["--config", str(config)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"winnow select failed ({done.returncode}):\n{done.stderr[-3000:]}")
        stage = json.loads((work / "run/_stages/lm.json").read_text(encoding="utf-8"))
        return stage["info"]["rows"] / stage["seconds"], stage["info"]
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-rows", type=int, default=16, help="records per scorer call")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument(
        "--budget-s", type=float, default=60.0, help="seconds of scoring per configuration"
    )
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    parser.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: only where the CPU computes bf16 natively (emulated bf16 is ~4x slower)",
    )
    parser.add_argument(
        "--vllm-dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="auto: bfloat16 where the CPU has native bf16 (or on CUDA), else float32",
    )
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stage", action="store_true", help="also time `winnow select --signals lm` (module doc)"
    )
    parser.add_argument(
        "--stage-resources",
        type=json.loads,
        default=None,
        help="with --stage, also run the stage with these stages.lm.resources (JSON), e.g. "
        '\'{"num_cpus": 1, "concurrency": 1}\' (the old default pool)',
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer

    from engine.backends.hf import cpu_supports_bf16
    from engine.backends.transformers_lm import TransformersScorer, reference_token_nll
    from engine.models import resolve_model

    threads = [int(t) for t in args.threads.split(",")]
    start_all = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}; cores: {os.cpu_count()}")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    native_bf16 = cpu_supports_bf16()
    print(f"native bf16 (AVX512-BF16/AMX): {native_bf16}")

    path = resolve_model("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[: args.rows]
    plans = plan_rows(tokenizer, rows, args.max_length)
    total_tokens = sum(len(p.cond.token_ids) + len(p.direct.token_ids) for p in plans)
    order = list(plans)
    random.Random(args.seed).shuffle(order)
    batches = [order[i : i + args.batch_rows] for i in range(0, len(order), args.batch_rows)]
    print(
        f"{len(rows)} rows -> {len(plans)} scored turns, {2 * len(plans)} sequences, "
        f"{total_tokens} tokens (cond + direct), {sum(p.truncated for p in plans)} truncated at "
        f"{args.max_length}; batches of {args.batch_rows} records, budget {args.budget_s:.0f} s "
        "per configuration"
    )

    # ---- matmul ceiling -------------------------------------------------------------------------
    gflops = {}
    for dtype in ("float32", "bfloat16"):
        for t in threads:
            parts = []
            for op in ("matmul", "linear"):
                value, n = gemm_gflops(op, dtype, t)
                gflops[(dtype, t)] = max(gflops.get((dtype, t), 0.0), value)
                parts.append(f"{op} {value:6.1f} GFLOP/s ({n}^2)")
            print(f"gemm {dtype:8s} threads={t}: " + ", ".join(parts), flush=True)

    fp32 = TransformersScorer(path, dtype="float32", max_batch_tokens=args.max_batch_tokens)
    params = fp32.model.num_parameters()
    print(f"model parameters: {params / 1e6:.1f} M (2 x params = FLOP per token at the ceiling)")
    configs: list[Config] = []
    for t in threads:
        configs.append(
            Config(
                Result("(a) reference batch-1", "float32", str(t)),
                lambda s: reference_token_nll(fp32.model, s),
                t,
            )
        )
        configs.append(Config(Result("(b) transformers", "float32", str(t)), fp32.token_nll, t))
    bf16 = None
    if args.bf16 == "on" or (args.bf16 == "auto" and native_bf16):
        bf16 = TransformersScorer(path, dtype="bfloat16", max_batch_tokens=args.max_batch_tokens)
        note = "" if native_bf16 else "emulated bf16"
        for t in threads:
            result = Result("(c) transformers", "bfloat16", str(t), note=note)
            configs.append(Config(result, bf16.token_nll, t))
    else:
        print("(c) transformers bf16: skipped (no native bf16 on this CPU; --bf16 on forces it)")
    round_robin(configs, batches, args.budget_s)
    results = [c.result for c in configs]
    fp32.close()
    if bf16 is not None:
        bf16.close()

    if args.no_vllm:
        print("vllm: skipped (--no-vllm)")
    else:
        try:
            from engine.backends.vllm_engine import vllm_dtype as resolve_vllm_dtype
            from engine.backends.vllm_lm import VllmScorer

            vllm_dtype = resolve_vllm_dtype(args.vllm_dtype)
            started = time.perf_counter()
            vllm = VllmScorer(
                path,
                dtype=vllm_dtype,
                max_model_len=args.max_length + 16,
                enforce_eager=True,
            )
        except ImportError as exc:
            print(f"vllm: not available ({exc})")
        else:
            print(f"vllm engine ({vllm_dtype}) started in {time.perf_counter() - started:.0f} s")
            try:
                result = Result("(d) vllm eager", vllm_dtype, "vllm")
                round_robin([Config(result, vllm.token_nll, None)], batches, args.budget_s)
                results.append(result)
            finally:
                vllm.close()

    # ---- report ---------------------------------------------------------------------------------
    base = {r.threads: r for r in results if r.name.startswith("(a)")}
    best_ref = max(base.values(), key=lambda r: r.tok_s)
    print()
    print(
        f"{'configuration':24s} {'dtype':9s} {'thr':>4s} {'rows':>5s} {'tokens':>7s} "
        f"{'wall_s':>7s} {'tok/s':>7s} {'rows/s':>7s} {'x(a)':>6s} {'full_s':>8s} {'ceiling':>8s}"
    )
    for r in results:
        full = total_tokens / r.tok_s
        sampled = "~" if r.rows < len(plans) else " "
        same = base.get(r.threads, best_ref)
        # vLLM picks its own threads: its ceiling is the best thread count's
        flops = [gflops[(r.dtype, t)] for t in threads if r.threads in (str(t), "vllm")]
        cap = max(flops) * 1e9 / (2 * params)
        ceiling = f"{r.tok_s / cap:7.1%}"
        print(
            f"{r.name:24s} {r.dtype:9s} {r.threads:>4s} {r.rows:5d} {r.tokens:7d} "
            f"{r.seconds:7.1f} {r.tok_s:7.0f} {r.rows / r.seconds:7.2f} "
            f"{r.tok_s / same.tok_s:6.2f} "
            f"{sampled}{full:7.0f} {ceiling:>8s} {r.note}"
        )
    print(
        "x(a): speed-up over the reference loop at the same thread count (vLLM: over the best "
        "reference); full_s: wall seconds for all rows, '~' = extrapolated per token from the "
        "sampled rows; ceiling: tok/s as a share of matmul GFLOP/s / (2 x params), same dtype "
        "and threads"
    )
    best = max(results, key=lambda r: r.tok_s)
    top = max(gflops.values()) * 1e9 / (2 * params)
    print(
        f"best: {best.name} {best.dtype} threads={best.threads}: {best.tok_s:.0f} tok/s = "
        f"{best.tok_s / top:.1%} of the machine's best matmul ceiling ({top:.0f} tok/s at "
        f"{max(gflops.values()):.0f} GFLOP/s), {best.tok_s / best_ref.tok_s:.2f}x the best "
        "reference"
    )
    for r in results:
        if r.name.startswith("(a)"):
            continue
        ref = base.get(r.threads, best_ref)
        worst, n = max_rel_diff(r, ref)
        print(
            f"agreement {r.name} {r.dtype} threads={r.threads} vs (a) threads={ref.threads}: "
            f"max rel diff of per-sequence mean NLL {worst:.2e} over {2 * n} sequences"
        )
    if args.stage:
        # The stage's actor gets the machine (engine.stages.actor_scoring.fit_resources): its
        # rival is the bare scorer at the most threads measured.
        top_threads = str(max(threads))
        for r in results:
            if not r.name.startswith(("(b)", "(c)")) or r.threads != top_threads:
                continue
            bare = r.rows / r.seconds
            for label, resources in (("defaults", None), ("given", args.stage_resources)):
                if label == "given" and resources is None:
                    continue
                rate, info = stage_run(rows, r.dtype, args.max_length, resources)
                print(
                    f"stage lm via winnow select, {r.dtype}, {label} resources: {rate:.2f} "
                    f"rows/s = {rate / bare:.0%} of the bare scorer's {bare:.2f} rows/s at "
                    f"{r.threads} threads; pool {info.get('actors')}; load {os.getloadavg()}",
                    flush=True,
                )
    print(
        f"total wall time {time.perf_counter() - start_all:.0f} s; load average {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
