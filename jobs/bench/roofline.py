"""LM scoring against this CPU's matmul roofline, at bf16 and fp32 (issue 15).

Detects the case at run time from /proc/cpuinfo: native bf16 (`avx512_bf16` or AMX) or AVX2
(bf16 emulated). Measures the roofline as torch achieves it: `F.linear` on the shapes of the
model's own linear layers (q/k/v/o, gate/up/down) with `--tokens` rows, at the threads the scorer
uses, both dtypes; the roofline of a dtype is the FLOP-weighted mix of one decoder layer (total
FLOPs / total time), the best single shape is printed beside it. Then scores `--rows` Alpaca
rows (cond + direct sequences, as the LM stage) with `TransformersScorer` at both dtypes and
counts the FLOPs it did: 2 x non-embedding parameters per token, 2 x vocabulary x hidden per
scored token (the answer-only output head) and causal attention (2 x len^2 x hidden per layer per
sequence, the useful part only). Targets: bf16 CPU: bf16 >= 60% of the bf16 roofline with IFD
within 1% of fp32 (median relative difference); AVX2: fp32 >= 80% of the fp32 roofline.
Writes runs/bench/roofline.json; prints the case, ratios, CPU flags and load average.

    .venv/bin/python jobs/bench/roofline.py [--rows 64] [--threads N] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
ALPACA = ROOT.parent / "shared/data/alpaca_random_9k.json"
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "fma")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_case(flags: set[str]) -> str:
    """Which target applies: native bf16 (AVX512-BF16 or AMX) or AVX2 (bf16 emulated)."""
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    return "avx2"


def layer_shapes(config) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of one decoder layer's linears."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = config.intermediate_size
    return [
        ("q", hidden, heads * head_dim),
        ("k", hidden, kv),
        ("v", hidden, kv),
        ("o", heads * head_dim, hidden),
        ("gate", hidden, inter),
        ("up", hidden, inter),
        ("down", inter, hidden),
    ]


def matmul_roofline(shapes, tokens: int, dtype, seconds: float) -> dict:
    """FLOP/s of `F.linear` per shape and for the layer's mix, best of repeated runs."""
    import torch
    import torch.nn.functional as F

    per_shape = {}
    total_flops = total_time = 0.0
    for name, k, n in shapes:
        x = torch.randn(tokens, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        with torch.inference_mode():
            for _ in range(3):
                F.linear(x, w)
            best, spent, reps = float("inf"), 0.0, 0
            while spent < seconds or reps < 5:
                start = time.perf_counter()
                F.linear(x, w)
                t = time.perf_counter() - start
                best, spent, reps = min(best, t), spent + t, reps + 1
        flops = 2.0 * tokens * k * n
        per_shape[name] = flops / best
        total_flops += flops
        total_time += best
    return {
        "layer_mix": total_flops / total_time,
        "best_shape": max(per_shape.values()),
        "per_shape": per_shape,
    }


def scoring_flops(config, sequences, scored_tokens: int, params_non_embedding: int) -> float:
    tokens = sum(len(s.token_ids) for s in sequences)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    attention = sum(2.0 * len(s.token_ids) ** 2 * hidden * layers for s in sequences)
    head = 2.0 * config.vocab_size * hidden * scored_tokens
    return 2.0 * params_non_embedding * tokens + head + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the roofline matmuls")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/roofline.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from engine.backends.hf import cpu_supports_bf16
    from engine.backends.transformers_lm import TransformersScorer
    from engine.models import resolve_model
    from engine.signals.lm import record_signals
    from jobs.bench.lm_throughput import plan_rows

    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    case = cpu_case(flags)
    model = resolve_model("builtin:smollm2-135m")
    config = AutoConfig.from_pretrained(model)
    shapes = layer_shapes(config)
    roof = {
        name: matmul_roofline(shapes, args.tokens, dtype, 1.0)
        for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
    }

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[: args.rows]
    plans = plan_rows(tokenizer, rows, args.max_length)
    sequences = [p.cond for p in plans] + [p.direct for p in plans]
    scored = sum(len(s.token_ids) - s.score_from for s in sequences)
    scorers = {name: TransformersScorer(model, dtype=name) for name in ("bfloat16", "float32")}
    embed = scorers["float32"].model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in scorers["float32"].model.parameters()) - embed
    flops = scoring_flops(config, sequences, scored, params)
    best: dict[str, float] = {name: float("inf") for name in scorers}
    nll: dict[str, list] = {}
    try:
        for scorer in scorers.values():
            scorer.token_nll(sequences[:4])  # first-call costs stay out of the timing
        for r in range(args.rounds):  # interleaved, the order alternating, so load hits both
            for name in list(scorers) if r % 2 == 0 else list(reversed(scorers)):
                start = time.perf_counter()
                nll[name] = scorers[name].token_nll(sequences)
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        for scorer in scorers.values():
            scorer.close()

    n = len(plans)
    ids = [str(i) for i in range(n)]
    ifd = {
        name: record_signals(ids, plans, v[:n], v[n:])["ifd"].to_numpy() for name, v in nll.items()
    }
    ok = np.isfinite(ifd["bfloat16"]) & np.isfinite(ifd["float32"])
    rel = np.abs(ifd["bfloat16"][ok] - ifd["float32"][ok]) / np.abs(ifd["float32"][ok])
    result = {
        "case": case,
        "native_bf16_detected_by_torch": cpu_supports_bf16(),
        "cpu_flags": sorted(flags & set(FLAGS_OF_INTEREST)),
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "rows": n,
        "tokens": sum(len(s.token_ids) for s in sequences),
        "scored_tokens": scored,
        "model_flops": flops,
        "roofline_tokens": args.tokens,
        "ifd_bf16_vs_fp32": {
            "median_rel": float(np.median(rel)),
            "p90_rel": float(np.quantile(rel, 0.9)),
            "max_rel": float(rel.max()),
        },
        "dtypes": {},
    }
    for name in scorers:
        achieved = flops / best[name]
        result["dtypes"][name] = {
            "seconds": best[name],
            "rows_per_s": n / best[name],
            "tokens_per_s": result["tokens"] / best[name],
            "achieved_flops": achieved,
            "roofline_flops": roof[name]["layer_mix"],
            "roofline_best_shape_flops": roof[name]["best_shape"],
            "roofline_per_shape": roof[name]["per_shape"],
            "fraction_of_roofline": achieved / roof[name]["layer_mix"],
        }
    target_dtype, target = ("bfloat16", 0.6) if case == "bf16" else ("float32", 0.8)
    fraction = result["dtypes"][target_dtype]["fraction_of_roofline"]
    result["target"] = {"dtype": target_dtype, "fraction": target, "met": fraction >= target}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")

    print(f"case: {'native bf16 CPU' if case == 'bf16' else 'AVX2 CPU (bf16 emulated)'}")
    print(
        f"cpu flags: {' '.join(result['cpu_flags'])}; threads {args.threads}; "
        f"load average {' '.join(f'{x:.2f}' for x in result['load_average'])}"
    )
    print(f"{n} Alpaca rows, {result['tokens']} tokens ({scored} scored)")
    for name, d in result["dtypes"].items():
        print(
            f"{name:9s} roofline {d['roofline_flops'] / 1e9:7.1f} GFLOP/s (best shape "
            f"{d['roofline_best_shape_flops'] / 1e9:.1f}); scoring {d['achieved_flops'] / 1e9:7.1f}"
            f" GFLOP/s = {d['fraction_of_roofline']:.0%}; {d['rows_per_s']:.2f} rows/s, "
            f"{d['tokens_per_s']:.0f} tokens/s"
        )
    q = result["ifd_bf16_vs_fp32"]
    print(
        f"IFD bf16 vs fp32: median rel {q['median_rel']:.2%}, p90 {q['p90_rel']:.2%}, "
        f"max {q['max_rel']:.2%}"
    )
    print(
        f"target: {target_dtype} >= {target:.0%} of its roofline: "
        f"{'MET' if result['target']['met'] else 'NOT MET'} ({fraction:.0%})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
