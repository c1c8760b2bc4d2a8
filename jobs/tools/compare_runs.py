"""Compare two run directories: are `scores.parquet`, `selected.jsonl` and
`random_baseline.jsonl` identical (every row, every column, NaN equal to NaN)?

    python jobs/tools/compare_runs.py RUN_A RUN_B [--rtol 1e-12]

Used to show that a refactoring changed no number: run the same job before and after it and
compare. Exit code 0 when identical, 1 with a list of the differences otherwise. Floats must be
equal to the bit unless `--rtol` allows a relative difference (lingua's confidence values differ
in the last bits with the composition of the batch they were computed in, so two runs of the
same code can differ there by ~1e-15).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _normal(value: object) -> object:
    """A cell as a plain comparable value: NaN equals NaN, arrays become lists."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, list | tuple | np.ndarray):
        return [_normal(v) for v in value]
    return value


def _same(u: object, v: object, rtol: float) -> bool:
    if isinstance(u, float) and isinstance(v, float):
        return math.isclose(u, v, rel_tol=rtol, abs_tol=0.0)
    if isinstance(u, list) and isinstance(v, list):
        return len(u) == len(v) and all(_same(p, q, rtol) for p, q in zip(u, v, strict=True))
    return u == v


def compare_scores(a: Path, b: Path, rtol: float = 0.0) -> list[str]:
    left = pd.read_parquet(a / "scores.parquet")
    right = pd.read_parquet(b / "scores.parquet")
    problems: list[str] = []
    notes: list[str] = []
    if list(left.columns) != list(right.columns):
        problems.append(f"columns differ: {list(left.columns)} vs {list(right.columns)}")
    if len(left) != len(right):
        return [*problems, f"rows differ: {len(left)} vs {len(right)}"]
    for column in [c for c in left.columns if c in right.columns]:
        x, y = left[column], right[column]
        if str(x.dtype) != str(y.dtype):
            problems.append(f"{column}: dtype {x.dtype} vs {y.dtype}")
        # (values compared below whatever the dtype)
        pairs = list(zip(x.tolist(), y.tolist(), strict=True))
        differing = sum(_normal(u) != _normal(v) for u, v in pairs)
        beyond = sum(not _same(_normal(u), _normal(v), rtol) for u, v in pairs)
        if beyond:
            problems.append(f"{column}: {beyond} rows differ")
        elif differing:
            notes.append(f"{column}: {differing} rows differ within rtol {rtol:g}")
    for line in notes:
        print(f"note: {line}")
    return problems


def compare_lines(a: Path, b: Path, name: str) -> list[str]:
    left = (a / name).read_text(encoding="utf-8")
    right = (b / name).read_text(encoding="utf-8")
    if left == right:
        return []
    return [f"{name}: {len(left.splitlines())} vs {len(right.splitlines())} lines, content differs"]


def main(argv: list[str]) -> int:
    rtol = 0.0
    if "--rtol" in argv:
        at = argv.index("--rtol")
        rtol = float(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (Path(p) for p in argv)
    problems = compare_scores(a, b, rtol)
    for name in ("selected.jsonl", "random_baseline.jsonl"):
        problems += compare_lines(a, b, name)
    rows = len(pd.read_parquet(a / "scores.parquet", columns=["id"]))
    if problems:
        print(f"DIFFERENT ({rows} rows):")
        for line in problems:
            print(f"  {line}")
        return 1
    selected = len((a / "selected.jsonl").read_text(encoding="utf-8").splitlines())
    within = f" (rtol {rtol:g})" if rtol else ""
    print(
        f"identical{within}: scores.parquet ({rows} rows, every column), "
        f"selected.jsonl ({selected} rows), random_baseline.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
