"""MinHash near-duplicates: the arithmetic on its own, then the Spark stage on real Alpaca rows
with planted near-duplicates (precision and recall printed), its determinism across partitionings
and its cap on oversized buckets."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import parse_job
from engine.runtime.rundir import RunDir
from engine.selection.groups import connected_components
from engine.signals.minhash import (
    EMPTY,
    MERSENNE_61,
    band_keys,
    banding_errors,
    bucket_pairs,
    candidate_probability,
    estimate_jaccard,
    exact_jaccard,
    hash_words,
    mulmod61,
    optimal_banding,
    shingle_hashes,
    signatures,
    signatures_from_shingles,
    verify_pairs,
    word_bytes,
    words,
)
from engine.stages.minhash import NearDupSpec, candidate_pairs, cluster_column
from tests.support.stages import run_stage

P61 = (1 << 61) - 1


# ---- pure arithmetic -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, P61 - 1), st.integers(0, P61 - 1)), min_size=1))
def test_mulmod61_is_exact(pairs: list[tuple[int, int]]) -> None:
    a = np.array([p[0] for p in pairs], dtype=np.uint64)
    x = np.array([p[1] for p in pairs], dtype=np.uint64)
    assert [int(v) for v in mulmod61(a, x)] == [(i * j) % P61 for i, j in pairs]


def test_words_and_shingles() -> None:
    assert words("Hello, WORLD!  It's ﬁne_ok") == ["hello", "world", "it", "s", "fine", "ok"]
    word_hashes, offsets = hash_words(["a b c d e f", "a b", "", "!!!"])
    hashes, shingle_offsets = shingle_hashes(word_hashes, offsets, 3)
    # 6 words -> 4 shingles; 2 words (< 3) -> one shingle; no word -> none.
    assert np.diff(shingle_offsets).tolist() == [4, 1, 0, 0]
    assert len(set(hashes.tolist())) == 5
    # Order matters inside a shingle; case and punctuation do not.
    sig, has = signatures(["one two three", "three two one", "ONE, two; Three."], 3, 64)
    assert has.tolist() == [True, True, True]
    assert not np.array_equal(sig[0], sig[1]) and np.array_equal(sig[0], sig[2])


_EDGES = [0, 1, (1 << 61) - 2, (1 << 61) - 1, 1 << 61, (1 << 64) - 1, 0xFFFFFFFF, 1 << 32]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(_EDGES), st.integers(0, (1 << 64) - 1)), max_size=300),
    st.lists(st.integers(0, 300), max_size=6),
)
def test_compiled_kernel_equals_numpy(hashes: list[int], cuts: list[int]) -> None:
    """The numba kernel computes exactly the numpy reference's signatures (empty rows too)."""
    values = np.array(hashes, dtype=np.uint64)
    offsets = np.array([0, *sorted(min(c, len(hashes)) for c in cuts), len(hashes)])
    reference = signatures_from_shingles(values, offsets, 64, compiled=False, chunk_elements=512)
    np.testing.assert_array_equal(signatures_from_shingles(values, offsets, 64), reference)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(alphabet=st.characters(max_codepoint=127)),
        st.text(alphabet="aZ9_ -.,'\t\nﬁＡé"),
    )
)
def test_word_bytes_equal_words(text: str) -> None:
    """The ASCII fast path splits exactly as NFKC + lowercase + the regex do."""
    assert word_bytes(text) == [w.encode("utf-8") for w in words(text)]


def _bucket_pairs_reference(keys: np.ndarray, window: int):
    buckets: dict[tuple[int, int], list[int]] = {}
    for member, row in enumerate(keys.tolist()):
        for band, key in enumerate(row):
            buckets.setdefault((band, key), []).append(member)
    pairs, capped, skipped = set(), 0, 0
    for members in buckets.values():
        size = len(members)
        for i in range(size):
            for j in range(i + 1, min(size, i + window + 1)):
                pairs.add((members[i], members[j]))
        if size > window + 1:
            capped += 1
            skipped += size * (size - 1) // 2 - sum(min(window, size - 1 - i) for i in range(size))
    return sorted(pairs), capped, skipped


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.integers(-2, 2), min_size=3, max_size=3), max_size=40),
    st.integers(1, 5),
)
def test_bucket_pairs_match_reference(rows: list[list[int]], window: int) -> None:
    """Vectorised bucket pairing = pairing each bucket's members (by rank) with the next
    `window`, deduplicated; capped buckets and skipped pairs counted alike."""
    keys = np.array(rows, dtype=np.int64).reshape(-1, 3)
    left, right, capped, skipped = bucket_pairs(keys, window)
    expected, want_capped, want_skipped = _bucket_pairs_reference(keys, window)
    assert list(zip(left.tolist(), right.tolist(), strict=True)) == expected
    assert (capped, skipped) == (want_capped, want_skipped)


def test_driver_candidates_verify_and_clusters() -> None:
    """ids in any order: pairs, the Jaccard check and cluster names depend on ids only."""
    import pyarrow as pa

    texts = [
        "the quick brown fox jumps over the lazy dog near the river bank today",
        "the quick brown fox jumps over the lazy dog near the river bank today",
        "a completely different sentence about cooking pasta with tomato sauce",
        "the quick brown fox jumps over the lazy dog near the river bank tonight",
        "",
    ]
    ids = pa.array(["e", "c", "a", "b", "d"])  # row 0 is "e", row 1 is "c", ...
    sig, has = signatures(texts, 3, 128)
    keys = band_keys(sig, 32)
    lists = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(has * 32)]).astype(np.int32)),
        pa.array(keys[has].reshape(-1).view(np.int64)),
    )
    order, left, right, capped, skipped = candidate_pairs(ids, lists, 100)
    assert order.tolist() == [2, 3, 1, 4, 0] and (capped, skipped) == (0, 0)
    assert {frozenset(p) for p in zip(left.tolist(), right.tolist(), strict=True)} >= {
        frozenset((0, 1))
    }
    # Left is always the smaller id.
    assert all(ids[a].as_py() < ids[b].as_py() for a, b in zip(left, right, strict=True))
    ok_left, ok_right, jaccard = verify_pairs(sig, left, right, 0.7)
    np.testing.assert_array_equal(jaccard, estimate_jaccard(sig[ok_left], sig[ok_right]))
    assert (jaccard >= 0.7).all()
    expected = estimate_jaccard(sig[left], sig[right]) >= 0.7
    assert ok_left.size == int(expected.sum())
    cluster = cluster_column(ids, order, ok_left, ok_right).to_pylist()
    # Rows 0, 1, 3 ("e", "c", "b": 11 shingles, 10 shared) are one cluster named by "b".
    assert cluster == ["b", "b", None, "b", None]
    labels = connected_components(len(texts), ok_left, ok_right)
    assert labels[0] == labels[1] == labels[3] != labels[2]


def test_signature_does_not_depend_on_the_batch() -> None:
    texts = [f"text number {i} with some shared words and more words" for i in range(50)]
    together, _ = signatures(texts, 3, 128)
    alone, _ = signatures([texts[17]], 3, 128)
    np.testing.assert_array_equal(together[17], alone[0])
    assert together.dtype == np.uint64 and (together < MERSENNE_61).all()


def test_empty_text_has_no_signature() -> None:
    sig, has = signatures(["", "   ...  ", "words here"], 2, 32)
    assert has.tolist() == [False, False, True]
    assert (sig[:2] == EMPTY).all()
    assert estimate_jaccard(sig[0], sig[1]) == 0.0


def test_signatures_are_identical_in_another_process() -> None:
    text = "The quick brown fox jumps over the lazy dog, again and again."
    code = (
        "import sys; from engine.signals.minhash import signatures; "
        f"sys.stdout.write(signatures([{text!r}], 3, 64)[0].tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert other == signatures([text], 3, 64)[0].tobytes().hex()


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_estimate_tracks_exact_jaccard(target: float) -> None:
    rng = random.Random(int(target * 100))
    errors = []
    for _ in range(40):
        vocabulary = [f"w{rng.getrandbits(40)}" for _ in range(400)]
        union = rng.randint(60, 200)
        shared = round(target * union)
        only = union - shared
        a = vocabulary[:shared] + vocabulary[shared : shared + only // 2]
        b = vocabulary[:shared] + vocabulary[shared + only // 2 : shared + only]
        rng.shuffle(a)
        rng.shuffle(b)
        text_a, text_b = " ".join(a), " ".join(b)
        sig, _ = signatures([text_a, text_b], 1, 256)
        errors.append(estimate_jaccard(sig[0], sig[1]) - exact_jaccard(text_a, text_b, 1))
    errors = np.abs(np.array(errors))
    # Standard error at 256 permutations is <= 0.031: mean and worst case well inside that.
    assert errors.mean() < 0.03 and errors.max() < 0.13, (errors.mean(), errors.max())


def test_band_keys() -> None:
    sig, _ = signatures(["alpha beta gamma delta", "alpha beta gamma delta epsilon"], 2, 128)
    keys = band_keys(sig, 16)
    assert keys.shape == (2, 16) and keys.dtype == np.uint64
    same = sig.copy()
    same[1] = sig[0]
    same[1, :8] += np.uint64(1)  # only the first band differs
    keys = band_keys(same, 16)
    assert keys[0, 0] != keys[1, 0] and np.array_equal(keys[0, 1:], keys[1, 1:])
    with pytest.raises(ValueError, match="must divide"):
        band_keys(sig, 7)
    # An explicit rows per band may leave the signature's tail unused (datasketch's bandings).
    tail = sig.copy()
    tail[1] = sig[0]
    tail[1, 126:] += np.uint64(1)
    keys = band_keys(tail, 18, 7)  # 126 of 128 values
    assert keys.shape == (2, 18) and np.array_equal(keys[0], keys[1])
    with pytest.raises(ValueError, match="rows"):
        band_keys(sig, 18, 8)


# datasketch 2.0.0, `datasketch.lsh._optimal_param(threshold, num_perm, fp_weight, fn_weight)`,
# computed in a separate venv (`pip install datasketch`; it is not a dependency of Winnow):
# {(threshold, num_perm, fp_weight, fn_weight): (bands, rows)}.
DATASKETCH_OPTIMAL = {
    (0.5, 16, 0.5, 0.5): (5, 3),
    (0.6, 16, 0.5, 0.5): (4, 4),
    (0.7, 16, 0.5, 0.5): (3, 5),
    (0.75, 16, 0.5, 0.5): (2, 6),
    (0.8, 16, 0.5, 0.5): (2, 8),
    (0.85, 16, 0.5, 0.5): (2, 8),
    (0.9, 16, 0.5, 0.5): (1, 15),
    (0.95, 16, 0.5, 0.5): (1, 16),
    (0.5, 64, 0.5, 0.5): (14, 4),
    (0.6, 64, 0.5, 0.5): (10, 6),
    (0.7, 64, 0.5, 0.5): (8, 8),
    (0.75, 64, 0.5, 0.5): (7, 9),
    (0.8, 64, 0.5, 0.5): (5, 11),
    (0.85, 64, 0.5, 0.5): (4, 15),
    (0.9, 64, 0.5, 0.5): (3, 21),
    (0.95, 64, 0.5, 0.5): (2, 32),
    (0.5, 128, 0.5, 0.5): (25, 5),
    (0.6, 128, 0.5, 0.5): (18, 7),
    (0.7, 128, 0.5, 0.5): (14, 9),
    (0.75, 128, 0.5, 0.5): (11, 11),
    (0.8, 128, 0.5, 0.5): (9, 13),
    (0.85, 128, 0.5, 0.5): (8, 16),
    (0.9, 128, 0.5, 0.5): (5, 25),
    (0.95, 128, 0.5, 0.5): (3, 42),
    (0.5, 256, 0.5, 0.5): (42, 6),
    (0.6, 256, 0.5, 0.5): (32, 8),
    (0.7, 256, 0.5, 0.5): (25, 10),
    (0.75, 256, 0.5, 0.5): (21, 12),
    (0.8, 256, 0.5, 0.5): (17, 15),
    (0.85, 256, 0.5, 0.5): (13, 19),
    (0.9, 256, 0.5, 0.5): (9, 28),
    (0.95, 256, 0.5, 0.5): (5, 51),
    (0.7, 1024, 0.5, 0.5): (73, 14),
    (0.8, 1024, 0.5, 0.5): (51, 20),
    (0.5, 128, 0.3, 0.7): (25, 5),
    (0.7, 128, 0.3, 0.7): (16, 8),
    (0.8, 128, 0.3, 0.7): (11, 11),
    (0.9, 128, 0.3, 0.7): (6, 20),
    (0.7, 64, 0.2, 0.8): (10, 6),
    (0.5, 128, 0.2, 0.8): (30, 4),
    (0.7, 128, 0.2, 0.8): (18, 7),
    (0.8, 128, 0.2, 0.8): (12, 10),
    (0.9, 128, 0.2, 0.8): (7, 18),
    (0.7, 256, 0.2, 0.8): (28, 9),
    (0.8, 256, 0.2, 0.8): (21, 12),
    (0.7, 128, 0.1, 0.9): (20, 6),
    (0.9, 256, 0.1, 0.9): (13, 19),
    (0.7, 128, 0.7, 0.3): (11, 11),
    (0.9, 64, 0.7, 0.3): (2, 26),
}
# datasketch 2.0.0, `lsh._false_positive_probability(0.7, b, r)` and
# `lsh._false_negative_probability(0.7, b, r)` (scipy `quad`).
DATASKETCH_INTEGRALS_AT_07 = {
    (16, 8): (0.05793994908774782, 0.020970307622892315),
    (14, 9): (0.03463792975032921, 0.037871025881048945),
    (1, 1): (0.24499999999999997, 0.04500000000000001),
    (1, 128): (0.0, 0.2922480620155039),
}


@pytest.mark.parametrize(("key", "expected"), sorted(DATASKETCH_OPTIMAL.items()))
def test_optimal_banding_reproduces_datasketch(key: tuple, expected: tuple[int, int]) -> None:
    assert optimal_banding(*key) == expected


def test_banding_integrals_match_datasketch() -> None:
    bands, rows, fp, fn = banding_errors(0.7, 128)
    assert len(bands) == sum(128 // b for b in range(1, 129))  # every banding datasketch visits
    for (b, r), (want_fp, want_fn) in DATASKETCH_INTEGRALS_AT_07.items():
        k = int(np.flatnonzero((bands == b) & (rows == r))[0])
        assert fp[k] == pytest.approx(want_fp, abs=1e-12)
        assert fn[k] == pytest.approx(want_fn, abs=1e-12)


def test_s_curve_and_spec_banding() -> None:
    # The old default, 16 bands x 8 rows: 0.61 at Jaccard 0.7 (the README said 0.93).
    old = candidate_probability(np.array([0.5, 0.6, 0.7, 0.75, 0.8, 0.9]), 16, 8)
    np.testing.assert_allclose(old, [0.0607, 0.2374, 0.6133, 0.8151, 0.9470, 0.9999], atol=1e-4)
    assert NearDupSpec().banding() == (18, 7)  # bands: null, false_negative_weight 0.8
    assert NearDupSpec(false_negative_weight=0.5).banding() == (14, 9)  # datasketch's default
    assert NearDupSpec(bands=16).banding() == (16, 8)  # explicit: num_perm / bands rows
    assert NearDupSpec(threshold=0.9, num_perm=256).banding() == optimal_banding(0.9, 256, 0.2, 0.8)
    with pytest.raises(ValueError, match="must divide"):
        NearDupSpec(bands=7)


def test_default_banding_keeps_planted_recall_on_real_rows(alpaca_rows: list[dict]) -> None:
    """Planted near-duplicates of real Alpaca text with Jaccard >= 0.7 (random word
    replacements): the default banding finds at least as many as the old 16 x 8 did."""
    rng = random.Random(0)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in alpaca_rows]
    vocabulary = [w for t in texts[:500] for w in t.split()]
    base = [t for t in texts if len(t.split()) >= 40][:1500]
    copies = []
    for text in base:
        rate = rng.uniform(0.0, 0.06)
        copies.append(
            " ".join(rng.choice(vocabulary) if rng.random() < rate else w for w in text.split())
        )
    jaccard = np.array([exact_jaccard(a, b, 5) for a, b in zip(base, copies, strict=True)])
    sig_a, _ = signatures(base, 5, 128)
    sig_b, _ = signatures(copies, 5, 128)
    verified = estimate_jaccard(sig_a, sig_b) >= 0.7
    near = jaccard >= 0.7
    assert near.sum() > 500

    def recall(bands: int, rows: int) -> float:
        candidate = (band_keys(sig_a, bands, rows) == band_keys(sig_b, bands, rows)).any(axis=1)
        return float((candidate & verified)[near].mean())

    old, new = recall(16, 8), recall(*NearDupSpec().banding())
    symmetric = recall(*NearDupSpec(false_negative_weight=0.5).banding())
    print(
        f"\nplanted recall (J >= 0.7): 16x8 {old:.3f}, default {new:.3f}, 0.5/0.5 {symmetric:.3f}"
    )
    assert new >= old > symmetric


# ---- the Spark stage -------------------------------------------------------------------------


def _perturb(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    """A near-duplicate: about one word edit per 50 words, plus case and punctuation noise."""
    tokens = text.split(" ")
    for _ in range(max(1, len(tokens) // 50)):
        i = rng.randrange(len(tokens))
        op = rng.choice(("replace", "delete", "swap"))
        if op == "replace":
            tokens[i] = rng.choice(vocabulary)
        elif op == "delete" and len(tokens) > 1:
            del tokens[i]
        elif i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    i = rng.randrange(len(tokens))
    tokens[i] = tokens[i].upper()
    return " ".join(tokens).replace(",", "").rstrip(".") + "!"


def _planted_rows(alpaca_rows: list[dict]) -> tuple[list[dict], list[tuple[int, int]], list[int]]:
    """1,500 real rows + 100 planted near-duplicates + 10 same-instruction, other-answer rows
    + a 30-row boilerplate family (one long answer, one word changed in each)."""
    rng = random.Random(7)
    rows = [dict(r) for r in alpaca_rows[:1500]]
    vocabulary = sorted({w for r in rows[:300] for w in r["output"].split()})
    long_enough = [
        i for i, r in enumerate(rows) if len(f"{r['instruction']} {r['output']}".split()) >= 40
    ]
    originals = rng.sample(long_enough, 110)
    planted: list[tuple[int, int]] = []
    for i in originals[:100]:
        copy = dict(rows[i])
        copy["output"] = _perturb(copy["output"], rng, vocabulary)
        copy["instruction"] = copy["instruction"].lower()
        planted.append((i, len(rows)))
        rows.append(copy)
    unrelated = []
    for k, i in enumerate(originals[100:]):
        unrelated.append(len(rows))
        rows.append({**rows[i], "output": alpaca_rows[3000 + k]["output"]})
    boilerplate = alpaca_rows[2000]["output"] + " " + alpaca_rows[2001]["output"]
    for k in range(30):
        rows.append(
            {
                "instruction": "Write the standard notice.",
                "input": "",
                "output": f"{boilerplate} v{k}",
            }
        )
    return rows, planted, unrelated


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict], spark):
    rows, planted, unrelated = _planted_rows(alpaca_rows)
    folder = tmp_path_factory.mktemp("minhash")
    path = folder / "planted.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    job = parse_job({"inputs": [{"path": str(path)}], "signals": ["minhash"]})
    run = RunDir(folder / "run")
    run_stage("ingest", job, run, spark)
    records = pd.read_parquet(run.records, columns=["id", "row", "dup_of"])
    assert records["dup_of"].isna().all()
    id_of_row = dict(zip(records["row"], records["id"], strict=True))
    return job, run, rows, planted, unrelated, id_of_row


def _clusters(run: RunDir) -> pd.Series:
    return pd.read_parquet(run.signal("minhash")).set_index("id")["near_dup_cluster"].sort_index()


@pytest.mark.slow
def test_planted_near_duplicates_are_found(planted_run, spark) -> None:
    job, run, rows, planted, unrelated, id_of_row = planted_run
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(64 * 1024))  # several partitions
    try:
        info = run_stage("minhash", job, run, spark)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    clusters = _clusters(run)
    assert len(clusters) == len(rows) == info["rows"]
    same = {
        (a, b)
        for a, b in ((id_of_row[i], id_of_row[j]) for i, j in planted)
        if pd.notna(clusters[a]) and clusters[a] == clusters[b]
    }
    recall = len(same) / len(planted)
    boiler_ids = [id_of_row[i] for i in range(len(rows) - 30, len(rows))]
    planted_ids = {id_of_row[i] for pair in planted for i in pair} | set(boiler_ids)
    in_clusters = clusters.dropna()
    # Precision over rows put in a cluster: members of planted families are right, others wrong.
    wrong = in_clusters[~in_clusters.index.isin(planted_ids)]
    precision = 1 - len(wrong) / len(in_clusters)
    exact = [
        exact_jaccard(
            f"{rows[i]['instruction']} {rows[i]['output']}",
            f"{rows[j]['instruction']} {rows[j]['output']}",
            5,
        )
        for i, j in planted
    ]
    print(
        f"\nminhash planted pairs: recall {recall:.3f} ({len(same)}/{len(planted)}), "
        f"row precision {precision:.3f} ({len(wrong)} unplanted rows clustered), "
        f"planted exact Jaccard min {min(exact):.2f} median {np.median(exact):.2f}; {info}"
    )
    assert recall >= 0.9 and precision >= 0.9
    # Same instruction with another row's answer is not a near-duplicate of the original.
    assert clusters[[id_of_row[i] for i in unrelated]].isna().all()
    # The boilerplate family is one cluster named by its smallest id.
    assert set(clusters[boiler_ids]) == {min(boiler_ids)}
    assert info["capped_buckets"] == 0 and info["verified_pairs"] <= info["candidate_pairs"]
    assert info["rows_in_clusters"] == len(in_clusters)
    assert info["clusters"] == in_clusters.nunique()

    # One partition and one shuffle partition give exactly the same output.
    single = RunDir(run.root.parent / "single")
    single.records.mkdir(parents=True)
    pq.write_table(pq.read_table(run.records).sort_by("id"), single.records / "part-0.parquet")
    spark.conf.set("spark.sql.shuffle.partitions", "1")
    try:
        again = run_stage("minhash", job, single, spark)
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "4")
    pd.testing.assert_series_equal(_clusters(single), clusters)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in info.items() if k != "seconds"
    }


@pytest.mark.slow
def test_oversized_buckets_are_capped_deterministically(planted_run, spark) -> None:
    job, run, rows, _, _, id_of_row = planted_run
    job = job.model_copy(deep=True)
    job.select.dedup.near.bucket_window = 4
    info = run_stage("minhash", job, run, spark)
    # The 30-row family shares buckets of 30: each member is paired with its next 4 by id only.
    assert info["capped_buckets"] >= 1
    assert info["skipped_pairs"] > 0
    clusters = _clusters(run)
    boiler_ids = [id_of_row[i] for i in range(len(rows) - 30, len(rows))]
    # Chains of neighbours still join the whole family into one cluster.
    assert set(clusters[boiler_ids]) == {min(boiler_ids)}
