"""Peer: submodlib's FacilityLocationFunction (dense euclidean kernel) maximised by LazyGreedy,
the call Superfiltering.D makes. Run with .venv-peers/submodlib/bin/python.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, required=True, help=".npy")
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help=".npy selected row indices")
    args = parser.parse_args()
    import numpy as np
    from submodlib import FacilityLocationFunction

    vectors = np.load(args.vectors)
    start = time.perf_counter()
    function = FacilityLocationFunction(
        n=len(vectors), mode="dense", data=vectors, metric="euclidean"
    )
    chosen = function.maximize(
        budget=args.k,
        optimizer="LazyGreedy",
        stopIfZeroGain=False,
        stopIfNegativeGain=False,
        verbose=False,
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    np.save(args.out, np.array([i for i, _ in chosen], dtype=np.int64))
    emit(len(vectors), seconds, {"k": args.k, "similarity": "euclidean (dense kernel)"})


if __name__ == "__main__":
    main()
