"""Peer: datatrove's 4-stage MinHash pipeline (signatures, buckets, clusters, filter), local.

Reads the same text shards (one task per shard), datatrove's own text normalisation and word
tokenizer, 5-gram shingles, `--buckets` x `--hashes-per-bucket` banding, no Jaccard check of the
candidates (datatrove has none). Cluster ids come back through stage 4's metadata.
Run with .venv-peers/datatrove/bin/python.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

from _common import emit, text_files, write_clusters
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="folder of text shards")
    parser.add_argument("--out", type=Path, required=True, help="clusters JSON")
    parser.add_argument("--buckets", type=int, default=18)
    parser.add_argument("--hashes-per-bucket", type=int, default=7)
    parser.add_argument("--shingle-words", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    shards = len(text_files(args.input))
    config = MinhashConfig(
        n_grams=args.shingle_words,
        num_buckets=args.buckets,
        hashes_per_bucket=args.hashes_per_bucket,
    )
    work = Path(tempfile.mkdtemp(prefix="peer-datatrove-minhash-"))

    def reader() -> JsonlReader:
        return JsonlReader(str(args.input), glob_pattern="*.jsonl", compression=None)

    def executor(pipeline: list, tasks: int, name: str, depends=None) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=min(args.workers, tasks),
            logging_dir=str(work / "logs" / name),
            depends=depends,
        )

    start = time.perf_counter()
    stage1 = executor(
        [reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)],
        shards,
        "sigs",
    )
    stage2 = executor(
        [
            MinhashDedupBuckets(
                input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config
            )
        ],
        config.num_buckets,
        "buckets",
        stage1,
    )
    stage3 = executor(
        [
            MinhashDedupCluster(
                input_folder=str(work / "buckets"),
                output_folder=str(work / "remove"),
                config=config,
                save_cluster_id=True,
            )
        ],
        1,
        "clusters",
        stage2,
    )
    stage4 = executor(
        [
            reader(),
            MinhashDedupFilter(
                input_folder=str(work / "remove"),
                exclusion_writer=JsonlWriter(str(work / "removed"), compression=None),
                load_cluster_ids=True,
            ),
            JsonlWriter(str(work / "kept"), compression=None),
        ],
        shards,
        "filter",
        stage3,
    )
    stage4.run()
    seconds = time.perf_counter() - start

    # Cluster ids from stage 3's files, not stage 4's metadata: MinhashDedupFilter skips the
    # metadata of a whole task that removes no document (no `.remove` file), which here is the
    # first shard, where every cluster's root lies.
    ids = [
        [json.loads(line)["id"] for line in p.read_text(encoding="utf-8").splitlines()]
        for p in text_files(args.input)
    ]
    rows = sum(len(shard) for shard in ids)
    clusters = {}
    for path in sorted((work / "remove").glob("*.clusters")):
        values = struct.unpack(f"<{path.stat().st_size // 4}I", path.read_bytes())
        shard = ids[int(path.stem)]
        for doc, cluster in zip(values[::2], values[1::2], strict=True):
            clusters[shard[doc]] = cluster
    shutil.rmtree(work, ignore_errors=True)
    write_clusters(args.out, clusters)
    emit(
        rows,
        seconds,
        {
            "workers": args.workers,
            "num_perm": config.num_buckets * config.hashes_per_bucket,
            "banding": f"{config.num_buckets}x{config.hashes_per_bucket}",
            "shingles": f"{args.shingle_words}-grams (datatrove's normalisation and tokenizer)",
            "jaccard_verified": False,
            "hash": str(config.hash_config),
        },
        clustered=len(clusters),
    )


if __name__ == "__main__":
    main()
