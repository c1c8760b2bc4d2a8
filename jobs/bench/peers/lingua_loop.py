"""Fallback peer for language ID: one Python process looping over the same unique records with
lingua (Winnow's `lang_table`, sequential, batches of 512: `lang_throughput.baseline`). The
models load in an untimed warm-up (reported). Run with the project's .venv/bin/python.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, required=True, help="Winnow's records/ folder")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--accuracy", default="auto")
    args = parser.parse_args()
    import pyarrow.dataset as ds

    from jobs.bench.lang_throughput import baseline

    table = ds.dataset(str(args.records), format="parquet").to_table(
        columns=["conversation"], filter=ds.field("dup_of").is_null()
    )
    conversations = table.column("conversation").to_pylist()[: args.rows]
    start = time.perf_counter()
    baseline(conversations, min(200, len(conversations)), False, args.accuracy)
    load_s = time.perf_counter() - start
    seconds = baseline(conversations, len(conversations), False, args.accuracy)
    emit(
        len(conversations),
        seconds,
        {"processes": 1, "detector": f"lingua, accuracy {args.accuracy}", "threads": 1},
        model_load_s=round(load_s, 2),
    )


if __name__ == "__main__":
    main()
