"""Peer: datatrove's exact dedup (3 stages: signatures, find duplicates, filter) followed by its
Gopher repetition and quality filters, over the same text shards, 2 workers, writing JSONL.
Run with .venv-peers/datatrove/bin/python.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit, text_files
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def document_text(doc) -> str:
    """The content exact dedup hashes (module level: the executor pickles the config)."""
    return doc.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="folder of text shards")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    shards = len(text_files(args.input))
    work = Path(tempfile.mkdtemp(prefix="peer-datatrove-filters-"))
    config = ExactDedupConfig(content_getter=document_text)

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
    try:
        sigs = executor(
            [reader(), ExactDedupSignature(output_folder=str(work / "sigs"), config=config)],
            shards,
            "sigs",
        )
        find = executor(
            [
                ExactFindDedups(
                    data_folder=str(work / "sigs"), output_folder=str(work / "dups"), config=config
                )
            ],
            1,
            "find",
            sigs,
        )
        executor(
            [
                reader(),
                ExactDedupFilter(data_folder=str(work / "dups"), config=config),
                GopherRepetitionFilter(),
                GopherQualityFilter(),
                JsonlWriter(str(work / "kept"), compression=None),
            ],
            shards,
            "filter",
            find,
        ).run()
        seconds = time.perf_counter() - start
        rows = sum(
            sum(1 for _ in p.read_text(encoding="utf-8").splitlines())
            for p in text_files(args.input)
        )
        kept = sum(
            sum(1 for _ in p.read_text(encoding="utf-8").splitlines())
            for p in (work / "kept").glob("*.jsonl")
        )
        stats = {}
        for path in (work / "logs" / "filter" / "stats").glob("*.json"):
            for step in json.loads(path.read_text()):
                name = " ".join(step.get("name", "").encode("ascii", "ignore").decode().split())
                dropped = step.get("stats", {}).get("dropped", 0)
                stats[name] = stats.get(name, 0) + (
                    dropped.get("total", 0) if isinstance(dropped, dict) else dropped
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(
        rows,
        seconds,
        {"workers": args.workers, "work": "exact dedup + Gopher repetition + Gopher quality"},
        quality={"kept": kept, "dropped_by_step": stats},
    )


if __name__ == "__main__":
    main()
