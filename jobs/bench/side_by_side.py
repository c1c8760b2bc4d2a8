"""Benchmark: every stage side by side with the peer a user would pick instead, on the same rows.

Each task runs Winnow's stage (the same code `winnow select` runs, at its default settings) and
each peer's script (jobs/bench/peers/, with that peer's own virtualenv `.venv-peers/<name>`, made
by `make bench-peers`) on the same input files, interleaved over `--rounds` rounds (the order
alternates every round) so load from other processes hits both sides alike; the best round of
each counts. Where a peer cannot run (install failed, no offline model, needs a GPU) the row says
why, and the issue's fallback (a single-process loop in the project's venv) stands in.

Tasks (`--only`, comma-separated): minhash, filters, lang, ifd, semdedup, facility.
Prints one markdown table plus the CPU flags, cores and load average at start and end; writes the
same as JSON to runs/bench/side_by_side.json. Run with `make bench` (BENCH_ARGS=...).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: `jobs.bench.*` imports need the repository root
    sys.path.insert(0, str(REPO))

from jobs.bench.diversity_scale import synthetic_vectors  # noqa: E402
from jobs.bench.ingest_throughput import PeakRss  # noqa: E402
from jobs.bench.lm_throughput import ALPACA, plan_rows  # noqa: E402
from jobs.bench.minhash_throughput import build_corpus  # noqa: E402

PEERS_DIR = REPO / "jobs/bench/peers"
PEER_VENVS = REPO / ".venv-peers"
MAIN_PYTHON = REPO / ".venv/bin/python"
MARKER = "PEER_RESULT "
TASKS = ("minhash", "filters", "lang", "ifd", "semdedup", "facility")
SPARK_TASKS = {"minhash", "filters", "lang"}


@dataclass
class Measure:
    """One side of one row, best round kept."""

    name: str
    rows: int = 0
    seconds: float = float("inf")
    peak_rss_mib: float | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    rounds: list[float] = field(default_factory=list)

    @property
    def rows_s(self) -> float | None:
        if self.error or not self.rows or not np.isfinite(self.seconds):
            return None
        return self.rows / self.seconds

    def keep(self, rows: int, seconds: float, rss: float | None, **extra: Any) -> None:
        self.rounds.append(round(seconds, 3))
        if seconds < self.seconds:
            self.rows, self.seconds, self.peak_rss_mib = rows, seconds, rss
            for key, value in extra.items():
                setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "seconds": None if not np.isfinite(self.seconds) else round(self.seconds, 3),
            "rows_s": None if self.rows_s is None else float(f"{self.rows_s:.4g}"),
            "rounds_s": self.rounds,
            "peak_rss_mib": self.peak_rss_mib,
            "quality": self.quality,
            "settings": self.settings,
            "error": self.error,
        }


@dataclass
class Peer:
    """A peer script run with a venv's python; `score` turns its result into quality figures."""

    name: str
    venv: str | None  # .venv-peers/<venv>; None: the project's venv (a single-process fallback)
    script: str
    args: list[str]
    score: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    timeout_s: float = 1800.0

    def python(self) -> Path:
        return MAIN_PYTHON if self.venv is None else PEER_VENVS / self.venv / "bin/python"

    def unavailable(self) -> str | None:
        """Why this peer cannot run (its install failed or never ran), else None."""
        if self.venv is None:
            return None
        stamp = PEER_VENVS / self.venv / ".stamp"
        if not stamp.exists():
            return f"{stamp} missing: run `make bench-peers`"
        text = stamp.read_text(encoding="utf-8").strip()
        return None if text == "ok" else " ".join(text.split())[-400:]

    def run(self) -> dict[str, Any]:
        """The peer's result line as a dict, or {"error": ...} with the command's last words."""
        why = self.unavailable()
        if why:
            return {"error": f"not installed: {why}"}
        command = [str(self.python()), self.script, *self.args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(PEERS_DIR), *([str(REPO)] * (self.venv is None))])
        proc = subprocess.Popen(
            command,
            cwd=PEERS_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Sampled like Winnow's side (the process tree), not the peer's own ru_maxrss: Linux
        # keeps that across fork + exec, so it would include this (large) parent process.
        with TreeRss(proc.pid) as memory:
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return {"error": f"timed out after {self.timeout_s:.0f} s"}
        for line in stdout.splitlines():
            if line.startswith(MARKER):
                result = json.loads(line[len(MARKER) :])
                result["peak_rss_mib"] = round(memory.peak / 2**20, 1)
                if self.score is not None and "error" not in result:
                    result["quality"] = {**result.get("quality", {}), **self.score(result)}
                return result
        lines = [t.strip() for t in (stderr or stdout).splitlines() if t.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"[:500]}


class TreeRss(PeakRss):
    """Peak summed RSS of one process (by pid) and its descendants, sampled."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.pid = pid

    def _run(self) -> None:
        import contextlib

        import psutil

        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            while not self._stop.is_set():
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss
                self.peak = max(self.peak, total)
                time.sleep(self.interval)


@dataclass
class Task:
    """One row of the table: Winnow's side and its peers."""

    name: str
    winnow: Callable[[], dict[str, Any]]  # rows, seconds, peak_rss_mib, quality, settings
    peers: list[Peer]
    unit: str = "rows/s"
    note: str = ""


# ---- helpers ------------------------------------------------------------------------------------


def stage_context(name: str, job: Any, run: Any, spark: Any) -> Any:
    """A StageContext as the executor builds it (no progress bars, no log)."""
    from engine.stages.registry import quiet_context

    return quiet_context(name, job, run, spark)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak RSS MiB of this process tree: the Spark JVM and workers count)."""
    with PeakRss() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak / 2**20


def cpu_flags() -> dict[str, bool]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(
        next((ln.split(":")[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    )
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}


def planted_quality(
    labels: dict[int, Any], rows: int, base: int, near: set[int] | None = None
) -> dict[str, Any]:
    """Recall of the planted pairs (row r and its original r mod base in one cluster), also over
    only the pairs whose exact shingle Jaccard reaches the threshold (`near`: those rows r), and
    row precision (share of clustered rows in their cluster's majority family)."""
    pairs = [(r, r % base) for r in range(base, rows)]
    hits = {r for r, o in pairs if labels.get(r) is not None and labels.get(r) == labels.get(o)}
    found = len(hits)
    members: dict[Any, Counter] = {}
    for r, label in labels.items():
        members.setdefault(label, Counter())[r % base] += 1
    clustered = sum(sum(c.values()) for c in members.values())
    right = sum(max(c.values()) for c in members.values())
    return {
        "recall": round(found / len(pairs), 4) if pairs else None,
        "recall_j>=t": round(len(hits & near) / len(near), 4) if near else None,
        "precision": round(right / clustered, 4) if clustered else None,
        "clustered_rows": clustered,
    }


def read_text_shards(folder: Path) -> list[tuple[str, str]]:
    """(id, text) of the text shards in row order, as the peers read them."""
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            out.append((row["id"], row["text"]))
    return out


def peer_labels(path: Path) -> dict[int, Any]:
    """A peer's clusters file (id -> label, ids are input row numbers) keyed by row."""
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


# ---- tasks --------------------------------------------------------------------------------------


class Bench:
    """Shared inputs: the near-duplicate corpus, its Winnow ingest, a Spark session."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self._spark = None
        self._ingested: tuple[Any, Any] | None = None

    @property
    def spark(self) -> Any:
        if self._spark is None:
            from engine.runtime.spark import spark_session

            self._spark = spark_session(self.job().spark)
        return self._spark

    def close(self) -> None:
        """Stop Spark (before the tasks that do not use it, so its JVM is not in their RSS)."""
        if self._spark is not None:
            self._spark.stop()
            self._spark = None

    # the near-duplicate corpus (minhash_throughput's: Alpaca 9k replicated, words perturbed)
    def corpus(self) -> Path:
        path = self.work / "alpaca_near_dups.jsonl"
        if not path.exists():
            build_corpus(self.args.rows, self.work)
        return path

    def base_rows(self) -> int:
        return len(json.loads((REPO.parent / "shared/data/alpaca_random_9k.json").read_text()))

    def job(self) -> Any:
        from engine.config import parse_job

        return parse_job(
            {
                "inputs": [{"path": str(self.corpus())}],
                "signals": ["minhash", "lang"],
                "spark": {"master": self.args.master, "shuffle_partitions": 8},
            }
        )

    def text_shards(self) -> Path:
        """The corpus as {"id": row, "text": Winnow's record text} in two shards (a task each)."""
        folder = self.work / "text"
        if folder.exists():
            return folder
        from engine.records import to_canonical
        from engine.signals.embed import record_text

        folder.mkdir()
        lines = self.corpus().read_text(encoding="utf-8").splitlines()
        half = (len(lines) + 1) // 2
        for shard, (lo, hi) in enumerate(((0, half), (half, len(lines)))):
            with open(folder / f"{shard:05d}.jsonl", "w", encoding="utf-8") as handle:
                for i in range(lo, hi):
                    conversation = to_canonical(json.loads(lines[i]), "alpaca").conversation
                    text = record_text(conversation, "conversation")
                    handle.write(json.dumps({"id": str(i), "text": text}) + "\n")
        return folder

    def ingested(self) -> tuple[Any, Any]:
        """(job, run dir) with `records/` written by Winnow's ingest (once, untimed)."""
        if self._ingested is None:
            from engine.runtime.rundir import RunDir

            job, run = self.job(), RunDir(self.work / "run")
            ctx = stage_context("ingest", job, run, self.spark)
            ctx.stage.run(ctx)
            self._ingested = (job, run)
        return self._ingested

    # ---- minhash ----
    def near_pairs(self, shingle_words: int, threshold: float) -> set[int]:
        """Rows r whose planted pair (r, r mod base) has exact shingle Jaccard >= threshold
        (Winnow's words): a perturbation can push a short text below it."""
        from engine.signals.minhash import exact_jaccard

        texts = [text for _, text in read_text_shards(self.text_shards())]
        base = self.base_rows()
        return {
            r
            for r in range(base, len(texts))
            if exact_jaccard(texts[r], texts[r % base], shingle_words) >= threshold
        }

    def winnow_labels(self, run: Any) -> dict[int, Any]:
        """Row -> cluster: near-dup cluster of the row's first copy; exact copies share it."""
        records = pq.read_table(run.records, columns=["id", "row", "dup_of"]).to_pandas()
        clusters = pq.read_table(run.signal("minhash")).to_pandas()
        cluster_of = dict(zip(clusters["id"], clusters["near_dup_cluster"], strict=True))
        canonical = records["dup_of"].fillna(records["id"])
        copies = Counter(canonical)
        labels = {}
        for row, first in zip(records["row"], canonical, strict=True):
            label = cluster_of.get(first)
            if label is None and copies[first] > 1:
                label = first
            if label is not None:
                labels[int(row)] = label
        return labels

    def minhash_task(self) -> Task:
        job, run = self.ingested()
        spec = job.select.dedup.near
        bands, band_rows = spec.banding()
        rows, base = self.args.rows, self.base_rows()
        text = self.text_shards()
        near = self.near_pairs(spec.shingle_words, spec.threshold)

        def winnow() -> dict[str, Any]:
            ctx = stage_context("minhash", job, run, self.spark)
            _, seconds, rss = timed(lambda: ctx.stage.run(ctx))
            return {
                "rows": rows,
                "seconds": seconds,
                "peak_rss_mib": rss,
                "quality": planted_quality(self.winnow_labels(run), rows, base, near),
                "settings": {
                    "processes": f"Spark {self.args.master}",
                    "num_perm": spec.num_perm,
                    "banding": f"{bands}x{band_rows}",
                    "threshold": spec.threshold,
                    "shingles": f"{spec.shingle_words} words (Winnow's normalisation)",
                    "jaccard_verified": True,
                },
            }

        def clusters_peer(name: str, venv: str, script: str, extra: list[str]) -> Peer:
            out = self.work / f"clusters-{name}.json"
            return Peer(
                name,
                venv,
                script,
                ["--input", str(text), "--out", str(out), *extra],
                score=lambda result: planted_quality(peer_labels(out), rows, base, near),
            )

        banding = ["--bands", str(bands), "--band-rows", str(band_rows)]
        return Task(
            "MinHash near-dup (stage only)",
            winnow,
            [
                clusters_peer("datasketch", "datasketch", "datasketch_minhash.py", banding),
                clusters_peer(
                    "datatrove 4-stage",
                    "datatrove",
                    "datatrove_minhash.py",
                    ["--buckets", str(bands), "--hashes-per-bucket", str(band_rows)],
                ),
                clusters_peer("text-dedup", "text-dedup", "textdedup_minhash.py", banding),
            ],
            note=f"{rows} rows, {base} originals + perturbed replicas; threshold {spec.threshold}",
        )

    # ---- ingest (exact dedup + indicators) vs datatrove exact dedup + Gopher filters ----
    def filters_task(self) -> Task:
        job = self.job()
        text = self.text_shards()

        def winnow() -> dict[str, Any]:
            from engine.runtime.rundir import RunDir

            run = RunDir(self.work / "filters-run")
            ctx = stage_context("ingest", job, run, self.spark)
            info, seconds, rss = timed(lambda: ctx.stage.run(ctx))
            shutil.rmtree(run.root, ignore_errors=True)
            return {
                "rows": info["input"],
                "seconds": seconds,
                "peak_rss_mib": rss,
                "quality": {"exact_duplicates": info["exact_duplicates"]},
                "settings": {"work": "parse, normalise, exact dedup, indicators, write Parquet"},
            }

        return Task(
            "Ingest: exact dedup + indicators / filters",
            winnow,
            [Peer("datatrove", "datatrove", "datatrove_filters.py", ["--input", str(text)])],
            note="different work: Winnow computes indicators, datatrove drops rows by Gopher rules",
        )

    # ---- language ID ----
    def lang_task(self) -> Task:
        job, run = self.ingested()
        text = self.text_shards()
        unique = pq.read_table(run.records, columns=["dup_of"]).column("dup_of").null_count

        def winnow() -> dict[str, Any]:
            ctx = stage_context("lang", job, run, self.spark)
            info, seconds, rss = timed(lambda: ctx.stage.run(ctx))
            return {
                "rows": info["rows"],
                "seconds": seconds,
                "peak_rss_mib": rss,
                "quality": {"languages": info.get("languages")},
                "settings": {"master": self.args.master, "detector": "lingua, accuracy auto"},
            }

        limit = str(min(unique, self.args.lang_baseline_rows))
        return Task(
            "Language ID",
            winnow,
            [
                Peer(
                    "datatrove LanguageFilter",
                    "datatrove",
                    "datatrove_lang.py",
                    ["--input", str(text)],
                ),
                Peer(
                    "lingua loop, 1 process (fallback)",
                    None,
                    "lingua_loop.py",
                    ["--records", str(run.records), "--rows", limit],
                ),
            ],
            note=f"{unique} unique rows of the near-dup corpus",
        )

    # ---- IFD ----
    def ifd_task(self) -> Task:
        from engine.backends.hf import cpu_supports_bf16
        from engine.models import resolve_model

        model = resolve_model("builtin:smollm2-135m")
        n = self.args.ifd_rows
        dtype = "bfloat16" if cpu_supports_bf16() else "float32"
        rows_path = self.work / "ifd_rows.jsonl"
        source = json.loads(ALPACA.read_text(encoding="utf-8"))[:n]
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in source), encoding="utf-8")

        def winnow() -> dict[str, Any]:
            import torch
            from transformers import AutoTokenizer

            from engine.backends.transformers_lm import TransformersScorer

            torch.set_num_threads(os.cpu_count() or 1)
            tokenizer = AutoTokenizer.from_pretrained(model)
            plans = plan_rows(tokenizer, source, self.args.max_length)
            scorer = TransformersScorer(model, dtype=dtype)
            try:
                batch = 16

                def score() -> None:
                    for i in range(0, len(plans), batch):
                        chunk = plans[i : i + batch]
                        scorer.token_nll([p.cond for p in chunk] + [p.direct for p in chunk])

                _, seconds, rss = timed(score)
            finally:
                scorer.close()
            return {
                "rows": n,
                "seconds": seconds,
                "peak_rss_mib": rss,
                "settings": {"dtype": dtype, "threads": torch.get_num_threads(), "batch": 16},
            }

        common = ["--input", str(rows_path), "--model", model, "--dtype", dtype]
        common += ["--max-length", str(self.args.max_length)]
        return Task(
            "IFD (LM scorer alone)",
            winnow,
            [
                Peer("data-juicer IFD op", "data-juicer", "datajuicer_ifd.py", common),
                Peer("batch-1 reference loop (fallback)", None, "reference_ifd.py", common),
            ],
            note=f"first {n} Alpaca rows, builtin:smollm2-135m, max_length {self.args.max_length}",
        )

    # ---- semantic dedup and facility location (synthetic clustered vectors, as diversity_scale)
    def vectors(self) -> tuple[Path, np.ndarray, np.ndarray]:
        path = self.work / "vectors.npy"
        vectors, planted_of = synthetic_vectors(self.args.vector_rows, 384, 200, 0.05, 0)
        np.save(path, vectors)
        np.save(self.work / "planted_of.npy", planted_of)
        return path, vectors, planted_of

    def semdedup_task(self) -> Task:
        from engine.selection.dedup import semantic_groups

        path, vectors, planted_of = self.vectors()
        threshold = 0.95
        copies = np.flatnonzero(planted_of >= 0)

        def found(labels: np.ndarray) -> float:
            hit = (labels[copies] >= 0) & (labels[copies] == labels[planted_of[copies]])
            return round(float(hit.mean()), 4)

        def winnow() -> dict[str, Any]:
            labels, seconds, rss = timed(lambda: semantic_groups(vectors, threshold))
            return {
                "rows": len(vectors),
                "seconds": seconds,
                "peak_rss_mib": rss,
                "quality": {"planted_found": found(labels), "grouped": int((labels >= 0).sum())},
                "settings": {
                    "index": "auto: every pair at this size (bf16 GEMM filter, float64 check)",
                    "threshold": threshold,
                },
            }

        def score(out: Path) -> Callable[[dict], dict]:
            return lambda result: {"planted_found": found(np.load(out))}

        args = ["--vectors", str(path), "--threshold", str(threshold)]
        nemo_out, flat_out = self.work / "nemo_labels.npy", self.work / "flat_labels.npy"
        return Task(
            "Semantic dedup",
            winnow,
            [
                Peer(
                    "NeMo Curator SemDedup",
                    "nemo-curator",
                    "nemo_semdedup.py",
                    [*args, "--out", str(nemo_out)],
                    score(nemo_out),
                ),
                Peer(
                    "FAISS flat range search (fallback)",
                    None,
                    "faiss_flat_semdedup.py",
                    [*args, "--out", str(flat_out)],
                    score(flat_out),
                ),
            ],
            note=f"{len(vectors)} x 384 synthetic clustered vectors, 5% planted near-duplicates",
        )

    def facility_task(self) -> Task:
        from engine.selection.diversity import facility_location_select

        n, k = self.args.facility_rows, self.args.facility_k
        _, vectors, _ = self.vectors()
        vectors = np.ascontiguousarray(vectors[:n])
        path = self.work / "facility_vectors.npy"
        np.save(path, vectors)
        ids = np.array([f"{i:09d}" for i in range(n)])
        chosen: dict[str, np.ndarray] = {}

        def winnow() -> dict[str, Any]:
            mask, seconds, rss = timed(
                lambda: facility_location_select(
                    vectors, ids, np.ones(n, bool), k, similarity="euclidean"
                )
            )
            chosen["winnow"] = np.flatnonzero(mask)
            return {
                "rows": n,
                "seconds": seconds,
                "peak_rss_mib": rss,
                "settings": {"k": k, "similarity": "euclidean (submodlib's kernel)"},
            }

        out = self.work / "submodlib_selected.npy"

        def score(result: dict) -> dict:
            theirs = set(np.load(out).tolist())
            ours = set(chosen.get("winnow", np.array([], int)).tolist())
            return {"same_selection_share": round(len(theirs & ours) / max(len(theirs), 1), 4)}

        return Task(
            "Facility location (lazy greedy)",
            winnow,
            [
                Peer(
                    "submodlib",
                    "submodlib",
                    "submodlib_facility.py",
                    ["--vectors", str(path), "--k", str(k), "--out", str(out)],
                    score,
                )
            ],
            note=f"{n} x 384 vectors, k={k}, dense euclidean kernel",
        )


# ---- running and printing -----------------------------------------------------------------------


def run_task(task: Task, rounds: int) -> dict[str, Any]:
    """Interleave Winnow and the peers over `rounds` (order reversed every other round)."""
    winnow = Measure("Winnow")
    peers = {p.name: Measure(p.name) for p in task.peers}
    broken: set[str] = set()
    for r in range(rounds):
        sides: list[Any] = ["winnow", *task.peers]
        for side in sides if r % 2 == 0 else sides[::-1]:
            if side == "winnow":
                try:
                    result = task.winnow()
                except Exception as exc:  # a failing stage is a row that says so
                    winnow.error = f"{type(exc).__name__}: {exc}"[:400]
                    continue
                winnow.keep(
                    result["rows"],
                    result["seconds"],
                    round(result["peak_rss_mib"], 1),
                    quality=result.get("quality", {}),
                    settings=result.get("settings", {}),
                )
                continue
            if side.name in broken:
                continue
            result = side.run()
            measure = peers[side.name]
            if "error" in result:
                measure.error = result["error"]
                broken.add(side.name)  # an install or offline failure does not fix itself
                continue
            measure.keep(
                result["rows"],
                result["seconds"],
                result.get("peak_rss_mib"),
                quality=result.get("quality", {}),
                settings=result.get("settings", {}),
            )
            print(f"  {task.name} / {side.name}: {result['rows_s']} {task.unit}", flush=True)
        print(
            f"  {task.name} / Winnow round {r + 1}: {_fmt(winnow.rows_s, 1)} {task.unit}",
            flush=True,
        )
    return {
        "task": task.name,
        "note": task.note,
        "unit": task.unit,
        "winnow": winnow.as_dict(),
        "peers": [m.as_dict() for m in peers.values()],
    }


def _fmt(value: float | None, digits: int = 0) -> str:
    """Thousands separators; small rates (IFD's rows/s) keep three significant digits."""
    if value is None:
        return "—"
    return f"{value:.3g}" if 0 < abs(value) < 10 else f"{value:,.{digits}f}"


def _quality(q: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in q.items() if v is not None) or "—"


def _settings_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    diff = {k: v for k, v in theirs.items() if ours.get(k) != v}
    return "; ".join(f"{k}={v}" for k, v in diff.items()) or "same"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "| stage | Winnow rows/s | peer (name) rows/s | ratio | Winnow peak RSS | peer peak RSS "
        "| quality (Winnow / peer) | settings that differ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        w = row["winnow"]
        ours = _fmt(w["rows_s"], 1) if not w["error"] else f"failed: {w['error']}"
        for p in row["peers"] or [{"name": "—", "error": "no peer"}]:
            if p.get("error"):
                theirs, ratio, rss = f"{p['name']}: could not run ({p['error']})", "—", "—"
                quality, diff = _quality(w["quality"]), "—"
            else:
                theirs = f"{p['name']}: {_fmt(p['rows_s'], 1)}"
                ratio = f"{w['rows_s'] / p['rows_s']:.2f}×" if w["rows_s"] and p["rows_s"] else "—"
                rss = f"{_fmt(p['peak_rss_mib'])} MiB"
                quality = f"{_quality(w['quality'])} / {_quality(p['quality'])}"
                diff = _settings_diff(w["settings"], p["settings"])
            lines.append(
                f"| {row['task']} ({row['note']}) | {ours} | {theirs} | {ratio} "
                f"| {_fmt(w['peak_rss_mib'])} MiB | {rss} | {quality} | {diff} |"
            )
    lines.append("")
    lines.append(
        f"CPU flags: {meta['cpu_flags']}; nproc {meta['nproc']}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}; rounds {meta['rounds']} (best kept); "
        "Winnow's peak RSS is its whole process tree (Spark JVM, workers, loaded models)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(TASKS), help=f"comma-separated: {TASKS}")
    parser.add_argument("--rows", type=int, default=100_000, help="near-dup corpus rows")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--lang-baseline-rows", type=int, default=5_000)
    parser.add_argument("--ifd-rows", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--vector-rows", type=int, default=100_000)
    parser.add_argument("--facility-rows", type=int, default=4_000)
    parser.add_argument("--facility-k", type=int, default=400)
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench/side_by_side.json")
    args = parser.parse_args()
    chosen = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(chosen) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(0)
    meta: dict[str, Any] = {
        "cpu_flags": cpu_flags(),
        "nproc": os.cpu_count(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "rounds": args.rounds,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    work = Path(tempfile.mkdtemp(prefix="winnow-side-by-side-"))
    bench = Bench(args, work)
    results = []
    try:
        for name in sorted(chosen, key=TASKS.index):  # Spark's tasks first, then stop it
            if name not in SPARK_TASKS:
                bench.close()
            print(f"== {name}", flush=True)
            task = getattr(bench, f"{name}_task")()
            results.append(run_task(task, args.rounds))
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    table = markdown(results, meta)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": results, "table": table}, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
