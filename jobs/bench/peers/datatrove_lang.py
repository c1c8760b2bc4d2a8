"""Peer: datatrove's LanguageFilter (fastText ft176) over the same text shards, 2 workers.

The filter downloads its fastText model from the Hugging Face Hub on first use; offline (as the
bench runs, HF_HUB_OFFLINE=1) that fails, and the error is the row's result.
Run with .venv-peers/datatrove/bin/python.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit, text_files
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import LanguageFilter
from datatrove.pipeline.readers import JsonlReader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="folder of text shards")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    shards = len(text_files(args.input))
    work = Path(tempfile.mkdtemp(prefix="peer-datatrove-lang-"))
    start = time.perf_counter()
    try:
        LocalPipelineExecutor(
            pipeline=[
                JsonlReader(str(args.input), glob_pattern="*.jsonl", compression=None),
                LanguageFilter(backend="ft176", label_only=True),
            ],
            tasks=shards,
            workers=min(args.workers, shards),
            logging_dir=str(work / "logs"),
        ).run()
        seconds = time.perf_counter() - start
        rows = sum(
            sum(1 for _ in p.read_text(encoding="utf-8").splitlines())
            for p in text_files(args.input)
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(rows, seconds, {"workers": args.workers, "detector": "fastText ft176"})


if __name__ == "__main__":
    main()
