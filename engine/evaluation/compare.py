"""`winnow compare`: several selection presets on the same pool, budget, recipe, prompts and judge.

Each preset is an ordinary Winnow run (`OUT/runs/<preset>/`: ingest, signals, select, export),
so every signal a preset needs is computed by the runs' shared score cache once and read by the
others. Then one evaluation over all of them, with the same functions the `eval:` stages use:
each preset's selection is an arm (`OUT/eval/train|models/<preset>/`), every arm answers the
same prompts (`OUT/eval/answers/<preset>.parquet`), and every arm is judged against the `random`
preset's arm (the baseline, added when not named) in both orders (`OUT/eval/results.json`).
`compare.json` and `compare.html` put one row per method: the winning rate against random (per
set and pooled, with its interval), the scoring cost, the mean answer length of the selection
(the confound the literature warns about) and the pairwise overlap of the selections.

Re-running the same command resumes: finished runs, arms, answers and judgements are skipped
(markers in `OUT/_stages/`, keyed by fingerprints of what each step depends on).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from engine.config import PRESETS, JobSpec, parse_job
from engine.runtime.rundir import RunDir, fingerprint, write_json_atomic

BASELINE = "random"


class CompareError(ValueError):
    """A compare request that cannot run; raised before any work starts."""


@dataclass(frozen=True)
class ComparePlan:
    presets: tuple[str, ...]  # the baseline first
    jobs: dict[str, JobSpec]  # preset -> its scoring job (no eval block)
    eval_job: JobSpec  # carries the shared train / generate / judge_pairwise blocks
    out: Path


def plan_compare(data: dict[str, Any], presets: list[str], out: str | Path) -> ComparePlan:
    """Validate every preset's job before any work: the job file's settings with `select.preset`
    set to each preset in turn (the random baseline added when not named)."""
    names = list(dict.fromkeys(p.strip() for p in presets if p.strip()))
    unknown = [p for p in names if p not in PRESETS]
    if unknown:
        raise CompareError(f"--presets: unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    if BASELINE in names:
        names.remove(BASELINE)
    if not names:
        raise CompareError("--presets: name at least one preset to compare with random")
    select = dict(data.get("select") or {})
    for key in ("preset", "score"):
        if select.get(key) is not None:
            raise CompareError(
                f"select.{key}: compare sets each preset's own ranking; remove select.{key} "
                "from the job file"
            )
    if select.get("budget") is None:
        raise CompareError("select.budget: compare needs a budget (the arms' size)")
    base = {k: v for k, v in data.items() if k not in ("eval", "out")}
    jobs = {
        preset: parse_job({**base, "select": {**select, "preset": preset}})
        for preset in (BASELINE, *names)
    }
    # The evaluation blocks are validated once, with a two-arm eval so that they are checked.
    eval_job = parse_job({**base, "select": select, "eval": {}})
    return ComparePlan((BASELINE, *names), jobs, eval_job, Path(out))


def _selection_hash(run: RunDir) -> str:
    """The selected ids of a run, as one hash (an arm's identity)."""
    import pyarrow.parquet as pq

    table = pq.read_table(run.scores, columns=["id", "selected"])
    ids = sorted(
        i for i, s in zip(table["id"].to_pylist(), table["selected"].to_pylist(), strict=True) if s
    )
    return fingerprint(ids)


class _Steps:
    """The evaluation steps of a compare, each skipped when its marker (the pipeline's own marker
    files, `OUT/_stages/compare_<step>.json`) carries the same key and its outputs exist."""

    def __init__(self, run: RunDir, progress: Any, log: Callable[[str], None], force: bool):
        self.run, self.progress, self.log, self.force = run, progress, log, force
        self.seconds: dict[str, float] = {}

    def run_step(self, name: str, key: str, outputs: list[Path], work: Callable[[Any], Any]) -> Any:
        """`work(progress factory)`'s info, or the info of the complete step it skips."""
        marker = None if self.force else self.run.completed(f"compare_{name}", key, outputs)
        if marker is None:
            with self.progress.stage(name):
                started = time.perf_counter()
                info = work(self.progress.factory(name))
                marker = {"seconds": round(time.perf_counter() - started, 3), "info": info}
            self.run.mark_done(f"compare_{name}", key, marker)
        else:
            self.log(f"[dim]{name}: already complete, skipped (--force redoes it)[/]")
        self.seconds[name] = marker["seconds"]
        return marker["info"]


def run_compare(
    plan: ComparePlan,
    console: Console | None = None,
    verbose: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Run every preset, train and evaluate every arm, judge against random; returns (and
    writes) compare.json's content. One compare at a time per OUT (its lock, as a run's)."""
    from engine.runtime.lock import run_lock

    console = console or Console(stderr=True)
    Path(plan.out).mkdir(parents=True, exist_ok=True)
    with run_lock(plan.out, "winnow compare", console.print):
        return _run_compare(plan, console, verbose, force)


def _run_compare(plan: ComparePlan, console: Console, verbose: bool, force: bool) -> dict[str, Any]:
    from engine.evaluation.arms import arm_rows
    from engine.evaluation.compare_table import MethodInputs, build_compare, render_compare_html
    from engine.evaluation.eval_sets import load_eval_prompts
    from engine.evaluation.generation import generate_answers
    from engine.evaluation.pairwise import judge_cache_key, judge_pairs
    from engine.evaluation.training import train_arms
    from engine.manifest import Manifest
    from engine.pipeline import JobRunner
    from engine.runtime.console import StageProgress, configure_logging
    from engine.runtime.ray_cluster import ensure_ray
    from engine.stages.train import recipe_fingerprint, train_template

    out = RunDir(plan.out)
    job = plan.eval_job
    timings: dict[str, Any] = {"runs": {}}
    log: Callable[[str], None] = console.print
    # Every prompt set is read before any work starts (a missing set fails now, not in an hour).
    prompts = load_eval_prompts(job.stages.generate.prompts, job.stages.generate.per_set)

    manifests: dict[str, Manifest] = {}
    for preset in plan.presets:
        console.print(f"[bold]compare:[/] scoring run for preset [bold]{preset}[/]")
        started = time.perf_counter()
        runner = JobRunner(plan.jobs[preset], out.root / "runs" / preset, console, verbose)
        manifests[preset] = runner.execute(force=force, command=f"winnow compare ({preset})")
        timings["runs"][preset] = round(time.perf_counter() - started, 3)

    runs = {p: RunDir(out.root / "runs" / p) for p in plan.presets}
    template = train_template(job)
    seed = job.stages.train.seed if job.stages.train.seed is not None else job.seed
    recipe = recipe_fingerprint(job)
    arms_key = {p: _selection_hash(runs[p]) for p in plan.presets}
    evaluation = out.evaluation
    configure_logging(out.logs, verbose)
    ensure_ray(job.ray, logs=out.logs, verbose=verbose)

    with StageProgress(console, enabled=not verbose) as progress:
        steps = _Steps(out, progress, log, force)
        key = fingerprint(recipe, arms_key)
        models = evaluation / "models"
        trained = steps.run_step(
            "train",
            key,
            [models / p for p in plan.presets],
            lambda bar: train_arms(
                {p: arm_rows(runs[p], "selected") for p in plan.presets},
                job.stages.train,
                template=template,
                seed=seed,
                fingerprint=recipe,
                out=evaluation,
                log=log,
                progress=bar,
            ),
        )
        gen_key = fingerprint(key, job.stages.generate.settings(), template)
        answers = {p: evaluation / "answers" / f"{p}.parquet" for p in plan.presets}
        generated = steps.run_step(
            "generate",
            gen_key,
            list(answers.values()),
            lambda bar: generate_answers(
                {p: str(models / p) for p in plan.presets},
                prompts,
                job.stages.generate,
                template=template,
                out=evaluation / "answers",
                log=log,
                progress=bar,
            ),
        )
        pairs = [(p, BASELINE) for p in plan.presets if p != BASELINE]
        judge_spec = job.stages.judge_pairwise
        results_file = evaluation / "results.json"
        steps.run_step(
            "judge_pairwise",
            fingerprint(gen_key, judge_spec.settings(), pairs),
            [results_file],
            lambda bar: judge_pairs(
                pairs,
                answers,
                judge_spec,
                out=evaluation,
                cache_key=judge_cache_key(judge_spec),
                log=log,
                progress=bar,
            )["judging"],
        )
        results = json.loads(results_file.read_text(encoding="utf-8"))
    timings.update(steps.seconds)

    methods = {
        p: MethodInputs(
            run=runs[p].root,
            manifest=manifests[p],
            results=results["pairs"].get(f"{p}_vs_{BASELINE}"),
        )
        for p in plan.presets
    }
    compare = build_compare(methods, baseline=BASELINE)
    compare["timings_s"] = timings
    compare["arms"] = {"train": trained, "generate": generated}
    compare["prompts"] = len(prompts)
    write_json_atomic(out.root / "compare.json", compare)
    html = render_compare_html(compare)
    (out.root / "compare.html").write_text(html, encoding="utf-8")
    return compare
