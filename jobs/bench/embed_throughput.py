"""Benchmark: embedding rows/s of the built-in MiniLM, sentence-transformers batched vs batch 1.

Both sides embed the same real Alpaca instructions (first user turn, as the embed stage does with
`text: instruction`) with the same model object and thread count, interleaved in chunks of rows so
both see the same machine load; the batch-1 loop is the baseline a naive per-row scorer would be.
Prints rows/s of each, the ratio, and checks that both give the same vectors. Run with
`make bench` (or `python jobs/bench/embed_throughput.py --device cuda` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from engine.backends.sentence_transformers import SentenceTransformersEmbedder
from engine.models import resolve_embedding_model
from engine.records import to_canonical
from engine.signals.embed import record_text

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an actor's CPUs)")
    parser.add_argument("--chunk", type=int, default=512, help="rows per interleaved round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = json.loads((REPO.parent / "shared/data/alpaca_random_9k.json").read_text())
    texts = [
        record_text(to_canonical(row, "alpaca").conversation, "instruction")
        for row in rows[: args.rows]
    ]
    path = resolve_embedding_model("builtin:all-minilm-l6-v2", None)
    embedder = SentenceTransformersEmbedder(
        path, use_gpu=args.device == "cuda", num_threads=args.threads, batch_size=args.batch_size
    )
    embedder.embed(texts[:16])  # warm-up: first call pays for lazy initialisation
    print(
        f"rows: {len(texts)} Alpaca instructions, device {embedder.device}, "
        f"torch threads {args.threads}, cores {os.cpu_count()}"
    )

    # Interleaved in chunks, so both sides see the same machine load (it varies here).
    batched_s = single_s = 0.0
    batched_parts, single_parts = [], []
    batched_size = embedder.batch_size
    for lo in range(0, len(texts), args.chunk):
        chunk = texts[lo : lo + args.chunk]
        embedder.batch_size = batched_size
        start = time.perf_counter()
        batched_parts.append(embedder.embed(chunk))
        batched_s += time.perf_counter() - start
        embedder.batch_size = 1
        start = time.perf_counter()
        single_parts.extend(embedder.embed([text]) for text in chunk)
        single_s += time.perf_counter() - start
    batched, single = np.concatenate(batched_parts), np.concatenate(single_parts)

    cosine = np.sum(batched * single, axis=1)
    print(f"{'':32}{'seconds':>9}{'rows/s':>10}")
    print(
        f"{f'batched (batch {args.batch_size})':32}{batched_s:9.1f}{len(texts) / batched_s:10.0f}"
    )
    print(f"{'batch-1 loop':32}{single_s:9.1f}{len(texts) / single_s:10.0f}")
    print(f"speed-up batched / batch-1: {single_s / batched_s:.2f}x")
    print(f"same vectors: min cosine batched vs batch-1 = {cosine.min():.6f}")


if __name__ == "__main__":
    main()
