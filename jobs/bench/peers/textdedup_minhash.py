"""Peer: text-dedup's MinHash (`text_dedup.minhash`, its CLI's main called in-process) on the
same text shards: HF `datasets` JSON loading, `num_proc` processes for fingerprinting, the same
banding (--b/--r), 5-gram shingles on its own tokenizer (split on non-word characters),
union-find over shared buckets with no Jaccard check. Clusters are read from its union-find.
text-dedup 0.4.1 needs Python >= 3.12; the venv has 0.4.0 (the newest for 3.11).
Run with .venv-peers/text-dedup/bin/python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit, read_texts, write_clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="folder of text shards")
    parser.add_argument("--out", type=Path, required=True, help="clusters JSON")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--bands", type=int, default=18)
    parser.add_argument("--band-rows", type=int, default=7)
    parser.add_argument("--shingle-words", type=int, default=5)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from text_dedup import minhash

    ids = [row_id for row_id, _ in read_texts(args.input)]
    work = Path(tempfile.mkdtemp(prefix="peer-textdedup-"))
    argv = ["--path", "json", "--data_files", str(args.input / "*.jsonl"), "--split", "train"]
    argv += ["--cache_dir", str(work / "cache"), "--output", str(work / "out")]
    argv += ["--column", "text", "--num_proc", str(args.num_proc)]
    argv += ["--num_perm", str(args.num_perm), "--b", str(args.bands), "--r", str(args.band_rows)]
    argv += ["--threshold", str(args.threshold), "--ngram", str(args.shingle_words)]
    argv += ["--min_length", "0"]
    start = time.perf_counter()
    try:
        minhash.main.main(args=argv, standalone_mode=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    roots = [minhash.uf.find(i) for i in range(len(ids))]
    sizes: dict[int, int] = {}
    for root in roots:
        sizes[root] = sizes.get(root, 0) + 1
    clusters = {ids[i]: int(r) for i, r in enumerate(roots) if sizes[r] > 1}
    write_clusters(args.out, clusters)
    emit(
        len(ids),
        seconds,
        {
            "processes": args.num_proc,
            "num_perm": args.num_perm,
            "banding": f"{args.bands}x{args.band_rows}",
            "threshold": args.threshold,
            "shingles": f"{args.shingle_words} words (text-dedup's tokenizer)",
            "jaccard_verified": False,
            "version": "0.4.0",
        },
        clustered=len(clusters),
    )


if __name__ == "__main__":
    main()
