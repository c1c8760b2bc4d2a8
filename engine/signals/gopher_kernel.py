"""Gopher's n-gram repetition statistics of one message in one compiled call (numba).

`engine.signals.indicators` computes nine n-gram statistics per measured message: the top
n-gram's characters for n = 2..4 (n-grams joined with spaces) and datatrove's duplicate n-gram walk
for n = 5..10 (joined without). In Python each is a walk over strings; here all nine run over
integer arrays in one call (about 7x faster on Alpaca's answers), and they are most of ingest's
parsing time.

Exact, not approximate: n-grams are grouped by a 64-bit hash and every group is then checked
member by member on the characters of the words' space-free join (duplicate n-grams, where
"ab"+"c" equals "a"+"bc") and, for top n-grams (joined with spaces), on the word boundaries too: a
Gopher word never holds whitespace, so equal space-joined strings are equal words. A group whose
members differ (a hash collision) makes that statistic come back as -1, and the caller computes it
on the strings. Without numba, `ngram_statistics` returns None and the caller keeps its string
path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

# The kernel's two loops run over exactly these sizes.
TOP_SIZES = (2, 3, 4)
DUP_SIZES = (5, 6, 7, 8, 9, 10)
BASE = 0x100000001B3  # FNV's 64-bit prime: odd, many bits set


def _groups(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, group): positions sorted by hash (stable: ties keep their order) and, per
    position, the index in `order` of the first position with the same hash."""
    order = np.argsort(hashes, kind="mergesort")
    group = np.empty(len(hashes), dtype=np.int64)
    lead = 0
    for k in range(len(order)):
        if k > 0 and hashes[order[k]] != hashes[order[k - 1]]:
            lead = k
        group[order[k]] = lead
    return order, group


def _same(codes: np.ndarray, starts: np.ndarray, a: int, b: int, n: int, spaced: bool) -> bool:
    """Whether the n-grams at words `a` and `b` are the same string: joined with spaces (equal
    words, word by word: a Gopher word holds no whitespace) or without (equal characters)."""
    if spaced:
        for j in range(n + 1):
            if starts[a + j] - starts[a] != starts[b + j] - starts[b]:
                return False
    elif starts[a + n] - starts[a] != starts[b + n] - starts[b]:
        return False
    for j in range(starts[a + n] - starts[a]):
        if codes[starts[a] + j] != codes[starts[b] + j]:
            return False
    return True


def _kernel(
    codes: np.ndarray,
    starts: np.ndarray,
    base: np.uint64,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba; tests also call it uncompiled
    """Fill `out` (9 int64) with the top n-gram characters (n = 2..4) and the duplicate n-gram
    characters (n = 5..10) of the words whose space-free join has the character `codes` and
    which start at `starts` in it (one more: the end); `base` is the polynomial hash's.
    -1: a hash collision, compute that statistic on the strings."""
    words = len(starts) - 1
    # Prefix hashes of the space-free join: hash(b, e) = prefix[e] - prefix[b] * power[e - b].
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    power = np.ones(len(codes) + 1, dtype=np.uint64)
    for k in range(len(codes)):
        prefix[k + 1] = prefix[k] * base + np.uint64(codes[k])
        power[k + 1] = power[k] * base
    slot = 0
    for n in range(2, 11):
        count = words - n + 1
        if count <= 0:
            out[slot] = 0
            slot += 1
            continue
        spaced = n <= 4  # top n-grams keep their spaces, duplicate n-grams drop them
        hashes = np.empty(count, dtype=np.uint64)
        for i in range(count):
            b, e = starts[i], starts[i + n]
            h = prefix[e] - prefix[b] * power[e - b]
            if spaced:  # the word lengths too: "ab c" is not "a bc"
                for k in range(1, n):
                    h = h * base + np.uint64(starts[i + k] - b)
            hashes[i] = h
        order, group = _groups(hashes)
        collided = False
        for i in range(count):
            lead = order[group[i]]  # `order` is stable: the group's first occurrence
            if lead != i and not _same(codes, starts, lead, i, n, spaced):
                collided = True
                break
        if collided:
            out[slot] = -1
            slot += 1
            continue
        if spaced:
            # datatrove's find_top_duplicate: the most frequent n-gram (ties: the first to
            # occur) times its count, in characters with its n - 1 spaces.
            best_count, best_first = 0, 0
            k = 0
            while k < count:
                end = k + 1
                while end < count and group[order[end]] == k:
                    end += 1
                first = order[k]
                if end - k > best_count or (end - k == best_count and first < best_first):
                    best_count, best_first = end - k, first
                k = end
            chars = starts[best_first + n] - starts[best_first] + n - 1
            out[slot] = chars * best_count
            slot += 1
            continue
        # datatrove's find_all_duplicate: a visited n-gram seen before adds its characters and
        # jumps past itself; otherwise it is remembered and the walk moves one word on.
        seen = np.zeros(count, dtype=np.bool_)
        repeated = 0
        i = 0
        while i < count:
            g = group[i]
            if seen[g]:
                repeated += starts[i + n] - starts[i]
                i += n
            else:
                seen[g] = True
                i += 1
        out[slot] = repeated
        slot += 1


@lru_cache(maxsize=1)
def compiled_kernel() -> Callable[..., None] | None:
    """The numba build of `_kernel` (cached on disk, as MinHash's), or None without numba.
    Imported lazily: numba costs about a second on import."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is in the project's venv
        return None
    # The kernel calls its helpers by name: compiled, it must find their compiled builds.
    helpers = {f.__name__: numba.njit(cache=True, nogil=True)(f) for f in (_groups, _same)}
    kernel = type(_kernel)(_kernel.__code__, dict(_kernel.__globals__, **helpers), "_kernel")
    return numba.njit(cache=True, nogil=True)(kernel)


def ngram_statistics(
    words: Sequence[str], kernel: Callable[..., None] | None = None, base: int = BASE
) -> np.ndarray | None:
    """The nine n-gram character counts of `words` (TOP_SIZES then DUP_SIZES; -1 where a hash
    collision needs the strings), or None without numba. `kernel`: another build of `_kernel`
    (tests pass the plain Python function); `base`: the hash's (tests force collisions)."""
    kernel = kernel or compiled_kernel()
    if kernel is None:
        return None
    starts = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)), out=starts[1:])
    codes = np.frombuffer("".join(words).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    out = np.empty(len(TOP_SIZES) + len(DUP_SIZES), dtype=np.int64)
    kernel(codes, starts, np.uint64(base), out)
    return out
