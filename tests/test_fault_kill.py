"""Kill -9 at every stage (issue 14): a job that enables every stage of the registry is killed
(SIGKILL to its whole process group, `WINNOW_FAULT`, engine.runtime.faults) inside each stage in
turn, resumed by running the same command again, and compared with an uninterrupted run.

To keep wall time low the kills are chained in one run directory: run k is started with
`WINNOW_FAULT=kill:<stage k>:<point>` and must die inside stage k; run k+1 resumes it and dies in
stage k+1; the last run completes. After each kill: that stage's marker is absent and every
earlier one present, every present marker's outputs are readable (no half-written file is taken
as complete), no public output is half-written, and no process of the run survives (Ray's
raylet/gcs, Ray workers, Spark's JVM and Python workers included). The per-stage assertions are
one test item per registered stage, so a stage added to the registry later and not covered by
the job fails here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from engine.runtime.faults import parse_fault
from engine.stages.registry import STAGES, enabled_stages

REPO = Path(__file__).resolve().parents[1]
EVAL_SETS = REPO.parent / "shared" / "data" / "eval"
ROWS = slice(100, 114)  # 14 Alpaca rows
STAGE_NAMES = [s.name for s in STAGES]
# Where each stage is killed. Stages that report progress are killed mid-work; the rest (and
# a few that do report progress) just before their marker, the most dangerous moment: every
# byte written, nothing yet saying so. A stage missing here (added to the registry later) is
# killed before its marker.
POINTS = {
    "ingest": "progress",
    "lang": "before_marker",
    "minhash": "start",
    "tokens": "progress",
    "embed": "before_marker",
    "lm": "progress",
    "judge": "progress",
    "rm": "before_marker",
    "select": "before_marker",
    "export": "start",
    "train": "progress",
    "generate": "progress",
    "judge_pairwise": "before_marker",
}
RUN_TIMEOUT_S = 420
SURVIVOR_GRACE_S = 5.0
PUBLIC_OUTPUTS = ("selected.jsonl", "random_baseline.jsonl", "scores.parquet", "manifest.json")


def point(stage: str) -> str:
    return POINTS.get(stage, "before_marker")


def test_fault_spec_is_parsed_strictly() -> None:
    assert parse_fault(None) is None and parse_fault("") is None
    assert parse_fault("kill:lm:progress") == ("lm", "progress")
    for bad in ("kill:lm", "kill::start", "stop:lm:start", "kill:lm:middle", "kill:lm:start:x"):
        with pytest.raises(ValueError, match="WINNOW_FAULT"):
            parse_fault(bad)


def _hook(fault: str | None, code: str) -> subprocess.CompletedProcess:
    """Run `code` after importing the hook, in a session of its own (the kill hits it alone)."""
    env = {k: v for k, v in os.environ.items() if k != "WINNOW_FAULT"}
    if fault is not None:
        env["WINNOW_FAULT"] = fault
    prelude = "from engine.runtime.faults import fault_point, with_fault\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code + "\nprint('survived')"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )


def test_the_hook_kills_only_at_its_stage_and_point() -> None:
    code = "fault_point('lm', 'start'); fault_point('judge', 'before_marker')"
    assert _hook(None, code).stdout.strip() == "survived"
    assert _hook("kill:lm:progress", code).stdout.strip() == "survived"
    assert _hook("kill:judge:before_marker", code).returncode == -signal.SIGKILL


def test_the_progress_point_waits_for_work_done() -> None:
    code = (
        "ticks = []\n"
        "advance = with_fault('lm', lambda d, t: ticks.append)('lm', 10)\n"
        "advance(0); print('after 0', flush=True); advance(3); print('after 3', flush=True)"
    )
    result = _hook("kill:lm:progress", code)
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.splitlines() == ["after 0"]


# ---- the job -------------------------------------------------------------------------------


def job_spec(rows: Path, reward_model: Path, cache: Path) -> dict:
    """Every stage of the registry on a tiny input, each as small as it can be and still real:
    built-in SmolLM2 for tokens/lm/judge/train/generate/judge_pairwise, built-in MiniLM for
    embed, a tiny trained reward model for rm. `cache` holds the score caches (one per chain,
    so the faulted chain really computes instead of reading the baseline's scores)."""
    actor = {"num_cpus": 1, "num_threads": 2, "concurrency": 1, "batch_size": 4}
    spec = {
        "inputs": [{"path": str(rows)}],
        "seed": 0,
        "signals": ["lang", "minhash", "tokens", "embed", "lm", "judge.alpagasus", "rm"],
        "spark": {"master": "local[2]", "shuffle_partitions": 2},
        "select": {"budget": 6},
        "stages": {
            "tokens": {"resources": actor},
            "embed": {"resources": actor},
            "lm": {"max_length": 128, "resources": actor},
            "judge": {"scoring": "expected", "max_length": 512, "resources": actor},
            "rm": {"model": str(reward_model), "max_length": 64, "resources": actor},
            "train": {
                "max_steps": 2,
                "batch_size": 2,
                "max_length": 96,
                "eval_fraction": 0.0,
                "resources": {
                    "num_workers": 1,
                    "cpus_per_worker": 1,
                    "num_threads": 2,
                    "save_steps": 1,
                },
            },
            "generate": {
                "prompts": [str(EVAL_SETS / "vicuna_test_set.jsonl")],
                "per_set": 2,
                "max_new_tokens": 4,
                "resources": {**actor, "batch_size": 2, "max_batch_prompts": 2},
            },
            "judge_pairwise": {
                "scoring": "expected",
                "max_length": 768,
                "bootstrap_resamples": 100,
                "resources": {**actor, "batch_size": 2, "max_batch_prompts": 2},
            },
        },
        # One trained arm judged against the untrained base model: the whole eval loop with
        # the fewest fine-tunes.
        "eval": {"arms": ["selected"], "base_model": True, "baseline": "base"},
    }
    for stage in STAGES:
        if stage.spec is not None and "cache" in stage.spec.model_fields:
            spec["stages"].setdefault(stage.name, {})["cache"] = {"dir": str(cache / stage.name)}
    return spec


def test_the_job_enables_every_registered_stage(tmp_path: Path) -> None:
    """A stage added to the registry and not switched on by this job fails here."""
    from engine.config import parse_job

    job = parse_job(job_spec(tmp_path / "rows.jsonl", tmp_path / "rm", tmp_path / "cache"))
    assert [s.name for s in enabled_stages(job)] == STAGE_NAMES
    assert set(POINTS) == set(STAGE_NAMES), "give the new stage its kill point in POINTS"


# ---- running and killing -------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int
    seconds: float
    survivors: list[str]  # processes of the run still alive SURVIVOR_GRACE_S after it ended
    stderr: str
    seen: int = 0  # the most processes of the run alive at once while it ran


@dataclass
class Chain:
    run_dir: Path
    outcomes: list[Outcome] = field(default_factory=list)
    markers_after: dict[str, set[str]] = field(default_factory=dict)  # killed stage -> markers
    damaged: dict[str, list[str]] = field(default_factory=dict)  # killed stage -> problems
    resumed: dict[str, bool] = field(default_factory=dict)  # stage -> next run completed it


def _tagged(tag: str) -> list[tuple[int, str]]:
    """Live processes whose environment or command line carries `tag` (the run's own
    RAY_TMPDIR: every process a run starts inherits it or names it)."""
    needle = tag.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if needle in environ or needle in cmdline:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def _reap(tag: str) -> list[str]:
    """Wait for the run's processes to go; kill (by pid, all ours) and name any that stay."""
    deadline = time.monotonic() + SURVIVOR_GRACE_S
    while (alive := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.25)
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [f"{pid}: {cmd[:160]}" for pid, cmd in alive]


def run_winnow(job: Path, out: Path, tag: str, fault: str | None) -> Outcome:
    """`winnow run job --out out` in its own session (so the fault's killpg hits it alone)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": tag}
    env.pop("WINNOW_FAULT", None)
    if fault is not None:
        env["WINNOW_FAULT"] = fault
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", str(job), "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = 0  # the most processes of the run seen at once: proves the survivor scan sees them
    while True:
        try:
            _, stderr = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            seen = max(seen, len(_tagged(tag)))
            if time.perf_counter() - started > RUN_TIMEOUT_S:
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = round(time.perf_counter() - started, 1)
    return Outcome(proc.returncode, seconds, _reap(tag), stderr[-3000:], seen)


def markers(run_dir: Path) -> set[str]:
    return {p.stem for p in (run_dir / "_stages").glob("*.json")}


def unreadable(path: Path) -> str | None:
    """Why `path` (a file or a folder of outputs) is not complete, or None when it reads."""
    try:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if file.name.startswith("."):
                continue  # an atomic_path temporary: never read as output
            if file.suffix == ".parquet":
                pq.read_table(file)
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".jsonl":
                for line in file.read_text(encoding="utf-8").splitlines():
                    json.loads(line)
            elif file.suffix == ".html" and "</html>" not in file.read_text(encoding="utf-8"):
                return f"{file}: no closing </html>"
        if path.is_dir() and path.name == "models":
            for model in path.iterdir():
                if not model.name.startswith(".") and not (model / "config.json").is_file():
                    return f"{model}: a model folder without config.json"
    except Exception as exc:  # any reader error is the finding
        return f"{path}: {type(exc).__name__}: {exc}"
    return None


def damage(run_dir: Path) -> list[str]:
    """Problems with what the run directory claims is complete: each marked stage's outputs,
    and every public output present."""
    problems = []
    by_name = {s.name: s for s in STAGES}
    for name in markers(run_dir):
        for rel in by_name[name].writes:
            target = run_dir / rel
            if not target.exists():
                problems.append(f"{name}: marker present, {rel} missing")
            elif (why := unreadable(target)) is not None:
                problems.append(f"{name}: {why}")
    for rel in (*PUBLIC_OUTPUTS, "report.html"):
        if (run_dir / rel).exists() and (why := unreadable(run_dir / rel)) is not None:
            problems.append(f"public output {why}")
    return problems


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict]) -> dict[str, Path]:
    """The rows file, a tiny reward model and one job file per chain (own score caches)."""
    from tests.support.reward_model import train_reward_model

    root = tmp_path_factory.mktemp("fault-kill")
    rows = root / "alpaca.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows[ROWS]), encoding="utf-8")
    # Its scores only need to be real numbers from a real model: a few steps are enough.
    model = train_reward_model(root / "rm", alpaca_rows[:64], steps=4, batch_size=4)
    jobs = {}
    for name in ("baseline", "chain"):
        spec = job_spec(rows, model, root / f"cache-{name}")
        jobs[name] = root / f"{name}.yaml"
        jobs[name].write_text(yaml.safe_dump(spec), encoding="utf-8")
    return {"root": root, **jobs}


@pytest.fixture(scope="module")
def ray_tag():
    """A short RAY_TMPDIR per module (Ray's socket paths must stay under ~107 bytes); every
    process of a run carries it, which is how survivors are found."""
    tag = tempfile.mkdtemp(prefix="wfk-", dir="/tmp")
    yield tag
    _reap(tag)
    shutil.rmtree(tag, ignore_errors=True)


@pytest.fixture(scope="module")
def baseline(inputs: dict[str, Path], ray_tag: str) -> Path:
    out = inputs["root"] / "baseline"
    outcome = run_winnow(inputs["baseline"], out, ray_tag, None)
    assert outcome.returncode == 0, outcome.stderr
    assert not outcome.survivors, outcome.survivors
    return out


@pytest.fixture(scope="module")
def chain(inputs: dict[str, Path], ray_tag: str) -> Chain:
    """Run k killed in stage k, run k+1 resuming it; the last run completes."""
    result = Chain(inputs["root"] / "chain")
    for k, name in enumerate(STAGE_NAMES):
        outcome = run_winnow(inputs["chain"], result.run_dir, ray_tag, f"kill:{name}:{point(name)}")
        result.outcomes.append(outcome)
        result.markers_after[name] = markers(result.run_dir)
        result.damaged[name] = damage(result.run_dir)
        if k:
            result.resumed[STAGE_NAMES[k - 1]] = STAGE_NAMES[k - 1] in markers(result.run_dir)
        if outcome.returncode != -signal.SIGKILL:
            break  # the kill did not happen where asked: later items report it
    final = run_winnow(inputs["chain"], result.run_dir, ray_tag, None)
    result.outcomes.append(final)
    result.resumed[STAGE_NAMES[-1]] = STAGE_NAMES[-1] in markers(result.run_dir)
    return result


# The chain (14 runs, each starting Python, Spark or Ray and its models) runs in the setup of
# the first item: 8 minutes measured on 2 cores at load average 7-10 (other suites
# running), the baseline 3.3 minutes more (11.4 minutes for the whole file).
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_killed_in_stage_then_resumed(chain: Chain, name: str) -> None:
    k = STAGE_NAMES.index(name)
    assert k < len(chain.outcomes) - 1, "an earlier run was not killed where asked"
    outcome = chain.outcomes[k]
    assert outcome.returncode == -signal.SIGKILL, (
        f"WINNOW_FAULT=kill:{name}:{point(name)} did not kill the run "
        f"(returncode {outcome.returncode}):\n{outcome.stderr}"
    )
    assert not outcome.survivors, f"processes outlived the killed run: {outcome.survivors}"
    assert chain.markers_after[name] == set(STAGE_NAMES[:k]), "killed in another stage"
    assert not chain.damaged[name], chain.damaged[name]
    assert chain.resumed.get(name), f"the next run did not complete {name}"


# ---- the resumed run against the uninterrupted one -------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_resumed_run_matches_the_uninterrupted_one(chain: Chain, baseline: Path) -> None:
    final = chain.outcomes[-1]
    assert final.returncode == 0, final.stderr
    # The survivor scan is not blind: it saw the driver and its Ray/Spark processes.
    assert max(o.seen for o in chain.outcomes) >= 3
    assert not final.survivors, final.survivors
    run = chain.run_dir
    assert not damage(run)

    def scores(root: Path) -> pd.DataFrame:
        return pd.read_parquet(root / "scores.parquet").sort_values("id").reset_index(drop=True)

    assert_same_rows(scores(run), scores(baseline))
    for rel in ("selected.jsonl", "random_baseline.jsonl"):
        assert _ids(run / rel) == _ids(baseline / rel), rel
    got, want = _manifest(run), _manifest(baseline)
    assert got["counts"] == want["counts"]
    assert got["ingest"] == want["ingest"]
    for folder in sorted((baseline / "signals").iterdir()):
        assert_same_rows(_sidecar(run / "signals" / folder.name), _sidecar(folder))
    # Every prompt judged in both runs; the split into wins/ties/losses is not compared: the
    # resumed fine-tune is not bit-identical (below), so its answers, and verdicts, may differ.
    assert _judged(run) == _judged(baseline)
    # The untrained base model's greedy answers are deterministic: identical.
    pd.testing.assert_frame_equal(_answers(run, "base"), _answers(baseline, "base"))
    # The arm's fine-tune really resumed from its step-1 checkpoint and ran the same steps.
    # Measured: not bit-identical to the uninterrupted fine-tune (step-2 loss 2.126023 vs
    # 2.126161, max merged-weight difference 2.6e-4, so the arm's 4-token answers differ);
    # the loss curves are compared to 1e-3.
    resumed, straight = _loss(run), _loss(baseline)
    assert resumed["resumed_from_step"] is not None and straight["resumed_from_step"] is None
    assert resumed["steps"] == straight["steps"]
    assert [step for step, _ in resumed["train"]] == [step for step, _ in straight["train"]]
    losses = [loss for _, loss in straight["train"]]
    assert [loss for _, loss in resumed["train"]] == pytest.approx(losses, rel=1e-3)


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Identical rows; float columns to 1e-12 relative. Why a tolerance: the lang stage's
    lingua confidences differ in the last bits between two computations from identical records
    (measured 6.7e-16: the chain recomputes lang from scratch after its kill, exactly as the
    baseline computes it, so this is lingua's float summation order, not a resume artefact).
    Every other column (ids, decisions, LM/judge/RM scores, token counts, embeddings) came
    out bit-identical in the measured runs; the tolerance is far below any decision."""
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=0.0)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text(encoding="utf-8"))


def _sidecar(folder: Path) -> pd.DataFrame:
    frame = pq.read_table(folder).to_pandas()
    return frame.sort_values("id").reset_index(drop=True)


def _answers(root: Path, arm: str) -> pd.DataFrame:
    return pq.read_table(root / "eval" / "answers" / f"{arm}.parquet").to_pandas()


def _loss(root: Path) -> dict:
    path = root / "eval" / "train" / "selected" / "loss.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _judged(root: Path) -> dict:
    """How many prompts were judged per pair, per set and pooled (wins + ties + losses +
    unparsed): every prompt once, whatever the verdicts."""
    results = json.loads((root / "eval" / "results.json").read_text(encoding="utf-8"))
    keys = ("wins", "ties", "losses", "unparsed")
    counts = {}
    for pair, result in results["pairs"].items():
        blocks = {"pooled": result["pooled"], **result["sets"]}
        counts[pair] = {name: sum(block[k] for k in keys) for name, block in blocks.items()}
    return counts
