"""Peer: NeMo Curator's semantic deduplication (k-means + pairwise cosine within clusters).

NeMo Curator 1.4's SemDedup stages import RAPIDS (cudf, cupy, rmm) at module level: they need an
NVIDIA GPU and the CUDA builds of those libraries, which a CPU machine cannot install. This script
tries the import; where it fails, the error is the row's result and side_by_side.py uses the
FAISS flat fallback. Run with .venv-peers/nemo-curator/bin/python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--out", type=Path, required=True)
    parser.parse_args()
    try:
        from nemo_curator.stages.deduplication.semantic.workflow import (  # noqa: F401
            SemanticDeduplicationWorkflow,
        )
    except ImportError as exc:
        sys.exit(f"nemo_curator SemDedup cannot load on this machine: {type(exc).__name__}: {exc}")
    sys.exit("nemo_curator SemDedup imported, but it runs on a GPU (RAPIDS): not run on a CPU")


if __name__ == "__main__":
    main()
