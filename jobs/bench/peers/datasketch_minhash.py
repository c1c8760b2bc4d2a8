"""Peer: datasketch MinHash + MinHashLSH in one process, the way a user dedups a JSONL file.

Same text (the `text` field side_by_side.py writes: Winnow's record text), the same word
normalisation and 5-word shingles as Winnow, the same banding (bands x rows) and threshold, the
Jaccard estimate of every candidate verified (as Winnow does), clusters by union-find.
Run with .venv-peers/datasketch/bin/python.
"""

from __future__ import annotations

import argparse
import re
import time
import unicodedata
from pathlib import Path

from _common import emit, read_texts, write_clusters
from datasketch import MinHash, MinHashLSH

_NON_WORD = re.compile(r"[\W_]+")


def shingles(text: str, k: int) -> list[bytes]:
    """Winnow's: NFKC, lowercase, non-word runs are spaces, k-word windows (short text: one)."""
    words = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()
    if not words:
        return []
    if len(words) < k:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="folder of text shards")
    parser.add_argument("--out", type=Path, required=True, help="clusters JSON")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--bands", type=int, default=18)
    parser.add_argument("--band-rows", type=int, default=7)
    parser.add_argument("--shingle-words", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    ids, sets = [], []
    for row_id, text in read_texts(args.input):
        ids.append(row_id)
        sets.append(shingles(text, args.shingle_words))
    hashes = MinHash.bulk(sets, num_perm=args.num_perm, seed=1)
    lsh = MinHashLSH(
        threshold=args.threshold, num_perm=args.num_perm, params=(args.bands, args.band_rows)
    )
    with lsh.insertion_session() as session:
        for i, (words, minhash) in enumerate(zip(sets, hashes, strict=True)):
            if words:  # a text with no word is never a candidate (as in Winnow)
                session.insert(i, minhash, check_duplication=False)
    parent = list(range(len(ids)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, (words, minhash) in enumerate(zip(sets, hashes, strict=True)):
        if not words:
            continue
        for j in lsh.query(minhash):
            if j > i and minhash.jaccard(hashes[j]) >= args.threshold:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = [find(i) for i in range(len(ids))]
    sizes: dict[int, int] = {}
    for r in roots:
        sizes[r] = sizes.get(r, 0) + 1
    clusters = {ids[i]: ids[r] for i, r in enumerate(roots) if sizes[r] > 1}
    seconds = time.perf_counter() - start
    write_clusters(args.out, clusters)
    emit(
        len(ids),
        seconds,
        {
            "processes": 1,
            "num_perm": args.num_perm,
            "banding": f"{args.bands}x{args.band_rows}",
            "threshold": args.threshold,
            "shingles": f"{args.shingle_words} words (Winnow's normalisation)",
            "jaccard_verified": True,
        },
        clustered=len(clusters),
    )


if __name__ == "__main__":
    main()
