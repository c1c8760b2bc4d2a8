"""`winnow`: select, run and validate. Flags only fill in the job spec (engine.config)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from engine.config import ConfigError, JobSpec, PresetName, load_job, parse_job
from engine.readers.sources import SourceError
from engine.stages.contract import ConfigDeprecationWarning

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

T = TypeVar("T")

EXIT_CONFIG = 2
EXIT_INPUT = 3
EXIT_LOCKED = 4  # another run holds the run directory (engine.runtime.lock)
# 5: a cluster cannot be reached (engine.cli_cluster). 6: the disk (or a file-size limit) filled
# up while a run wrote its outputs (engine.runtime.disk_full).
EXIT_DISK_FULL = 6
# 7: a worker (Spark task attempts used up, a Ray actor or node) died for good; the completed
# stages are kept and the same command resumes (engine.runtime.worker_lost).
EXIT_WORKER_LOST = 7


def parse_budget(text: str | None) -> int | float | None:
    """'500' is a row count, '0.1' (or '1.0') a fraction of the eligible rows."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a row count nor a fraction") from None


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def _read_job(read: Callable[[], T]) -> T:
    """`read()` (load_job, parse_job, or anything built from job specs), printing each
    ConfigDeprecationWarning it raises as a yellow "deprecated:" line before any work starts
    (even when the spec is then refused); any other warning is re-issued as usual."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConfigDeprecationWarning)
            return read()
    finally:
        for item in caught:
            if issubclass(item.category, ConfigDeprecationWarning):
                console.print(f"[yellow]deprecated:[/] {escape(str(item.message))}")
            else:
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="show Spark's, Ray's and the model libraries' logs live instead of progress bars "
        "(they go to logs/ in the run directory otherwise)",
    ),
]


def _execute(job: JobSpec, out: str | None, force: bool, verbose: bool = False) -> None:
    from engine.pipeline import JobRunner, python_command
    from engine.runtime.disk_full import disk_full_message, log_traceback, public_outputs
    from engine.runtime.lock import LockHeld
    from engine.runtime.worker_lost import worker_lost_message
    from engine.stages.actor_scoring import PlacementError
    from engine.stages.ingest import EmptyInputError

    # A log line that cannot be written (a full disk) must not print a traceback per line: the
    # failed output write itself is reported once, below.
    logging.raiseExceptions = False
    target = out or job.out
    if target is None:
        _fail("no output directory: pass --out DIR or set `out:` in the job spec", EXIT_CONFIG)
    before = public_outputs(target)
    runner = None
    try:
        runner = JobRunner(job, target, console, verbose=verbose)
        manifest = runner.execute(force=force, command=python_command())
    except (SourceError, EmptyInputError) as exc:
        _fail(str(exc), EXIT_INPUT)
    except PlacementError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except LockHeld as exc:
        _fail(str(exc), EXIT_LOCKED)
    except Exception as exc:  # a full disk or a dead worker is an outcome, not a crash to trace
        code, message = EXIT_DISK_FULL, disk_full_message(exc, target, before)
        if message is None:
            stage = runner.current_stage if runner is not None else None
            code, message = EXIT_WORKER_LOST, worker_lost_message(exc, stage)
            if message is None:
                raise
            log_traceback(target, exc)
        # One unwrapped line (rich would wrap it at 80 columns on a pipe), no markup.
        console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    counts = manifest.counts
    console.print(
        f"[bold green]done:[/] {counts.input} input rows → {counts.selected} selected, "
        f"{counts.total_rejected} rejected, {counts.quarantined} quarantined"
    )
    report = manifest.outputs.report
    console.print(f"report: [bold]{escape(report)}[/]")
    if manifest.logs and Path(manifest.logs).is_dir():  # none with --verbose: logs were live
        console.print(f"[dim]logs: {escape(manifest.logs)}[/]")
    print(report)


@app.command()
def select(
    inputs: Annotated[list[str], typer.Argument(help="files, folders, builtin:sharegpt, hf:NAME")],
    out: Annotated[str | None, typer.Option("--out", help="run directory")] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="json|jsonl|parquet|hf and/or schema")
    ] = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="rows (500) or fraction (0.1)")
    ] = None,
    signals: Annotated[
        str | None,
        typer.Option(
            "--signals",
            help="extra signals, comma-separated: tokens, lm, embed, lang, rm, judge.alpagasus, "
            "judge.deita_quality, judge.deita_complexity, judge.<custom>",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--select",
            help="preset: " + "|".join(get_args(PresetName)),
        ),
    ] = None,
    dedup: Annotated[
        str | None,
        typer.Option(
            "--dedup", help="duplicate removal beyond exact: near,semantic (default) or none"
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="job spec YAML")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    force: Annotated[bool, typer.Option("--force", help="redo completed stages")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Read INPUTS, score every row, and keep a budgeted subset."""
    try:
        data: dict[str, Any] = (
            yaml.safe_load(config.read_text(encoding="utf-8")) or {} if config else {}
        )
        data["inputs"] = [{"path": item, "format": format} for item in inputs]
        select_spec = dict(data.get("select") or {})
        if budget is not None:
            select_spec["budget"] = parse_budget(budget)
        if preset is not None:
            select_spec["preset"] = preset
        if dedup is not None:
            chosen = {d.strip() for d in dedup.split(",") if d.strip()} - {"none"}
            unknown = chosen - {"near", "semantic"}
            if unknown:
                raise ConfigError(
                    f"--dedup: unknown kind {sorted(unknown)}; use near, semantic, none"
                )
            dedup_spec = dict(select_spec.get("dedup") or {})
            for kind in ("near", "semantic"):
                dedup_spec[kind] = {**(dedup_spec.get(kind) or {}), "enabled": kind in chosen}
            select_spec["dedup"] = dedup_spec
        data["select"] = select_spec
        if signals is not None:
            data["signals"] = [s.strip() for s in signals.split(",") if s.strip()]
        if seed is not None:
            data["seed"] = seed
        job = _read_job(lambda: parse_job(data))
    except ConfigError as exc:
        _fail(f"invalid configuration:\n{exc}", EXIT_CONFIG)
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read {config}: {exc}", EXIT_CONFIG)
    _execute(job, out, force, verbose)


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="job spec YAML")],
    out: Annotated[str | None, typer.Option("--out", help="overrides `out:`")] = None,
    force: Annotated[bool, typer.Option("--force", help="redo completed stages")] = False,
    full: Annotated[bool, typer.Option("--full", help="ignore `ingest.sample`")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Run a job spec."""
    try:
        job = _read_job(lambda: load_job(job_file))
    except ConfigError as exc:
        _fail(f"invalid job spec {job_file}:\n{exc}", EXIT_CONFIG)
    if full and job.ingest.sample is not None:
        job.ingest.sample = None
        console.print("[yellow]--full:[/] sampling disabled, the whole corpus is read")
    _execute(job, out, force, verbose)


@app.command()
def validate(job_file: Annotated[Path, typer.Argument(help="job spec YAML")]) -> None:
    """Check a job spec without running it."""
    try:
        job = _read_job(lambda: load_job(job_file))
    except ConfigError as exc:
        _fail(f"invalid job spec {job_file}:\n{exc}", EXIT_CONFIG)
    inputs = ", ".join(i.path for i in job.inputs)
    console.print(
        f"[green]ok:[/] {job_file}: inputs {inputs}; signals indicators"
        f"{''.join(',' + s for s in job.signals)}; preset {job.select.preset}"
    )


@app.command("train-eval")
def train_eval(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory (has manifest.json)")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML with `eval:` and/or `stages:` blocks (train, generate, judge_pairwise) "
            "merged into the run's job; default: `eval: {}` with default stages",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="redo the evaluation stages")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Fine-tune on a run's selection and on its random baseline, answer the evaluation
    prompts, judge the answers pairwise; the run's report gains an Evaluation section."""
    from engine.evaluation.jobs import EvalJobError, eval_job_for_run

    try:
        extra = yaml.safe_load(config.read_text(encoding="utf-8")) or {} if config else {}
        job = _read_job(lambda: eval_job_for_run(run_dir, extra))
    except (ConfigError, EvalJobError) as exc:
        _fail(f"invalid evaluation config:\n{exc}", EXIT_CONFIG)
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read {config}: {exc}", EXIT_CONFIG)
    if force:
        from engine.pipeline import JobRunner

        runner = JobRunner(job, run_dir, console, verbose=verbose)
        for name in ("train", "generate", "judge_pairwise"):
            runner.run.clear(name)
    _execute(job, str(run_dir), False, verbose)


@app.command()
def compare(
    job_file: Annotated[Path, typer.Argument(help="job spec YAML: inputs, budget, eval stages")],
    presets: Annotated[
        str,
        typer.Option(
            "--presets", help="comma-separated presets, e.g. longest,ifd,alpagasus (+ random)"
        ),
    ],
    out: Annotated[str | None, typer.Option("--out", help="overrides `out:`")] = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="rows (500) or fraction (0.1)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="redo every step")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Run several presets on the same pool and budget, fine-tune and evaluate each selection
    with one recipe, and judge each against random: compare.json and compare.html."""
    from engine.evaluation.compare import CompareError, plan_compare, run_compare

    try:
        data = yaml.safe_load(job_file.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{job_file}: a job spec is a mapping of keys")
        if budget is not None:
            data["select"] = {**(data.get("select") or {}), "budget": parse_budget(budget)}
        target = out or data.get("out")
        if target is None:
            raise ConfigError("no output directory: pass --out DIR or set `out:` in the job spec")
        plan = _read_job(lambda: plan_compare(data, presets.split(","), target))
    except (ConfigError, CompareError) as exc:
        _fail(f"invalid compare request:\n{exc}", EXIT_CONFIG)
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read {job_file}: {exc}", EXIT_CONFIG)
    from engine.runtime.lock import LockHeld

    try:
        result = run_compare(plan, console, verbose=verbose, force=force)
    except SourceError as exc:
        _fail(str(exc), EXIT_INPUT)
    except LockHeld as exc:
        _fail(str(exc), EXIT_LOCKED)
    for name, method in result["methods"].items():
        rate = method.get("winning_rate")
        if rate is None:
            console.print(f"  {name}: baseline ({method['rows']} rows)")
            continue
        low, high = rate.get("interval") or (None, None)
        pooled = rate["pooled"]
        counts = f"{pooled['wins']}/{pooled['ties']}/{pooled['losses']} W/T/L"
        if pooled.get("unparsed"):
            counts += f", {pooled['unparsed']} unparsed"
        shown = "n/a" if pooled.get("rate") is None else f"{pooled['rate']:.3f}"
        if low is not None and high is not None:
            shown += f" [{low:.3f}, {high:.3f}]"
        console.print(
            f"  {name}: winning rate vs {result['baseline']} {shown} ({counts}; "
            f"{method['rows']} rows)"
        )
    page = Path(plan.out) / "compare.html"
    console.print(f"compare: [bold]{escape(str(page))}[/]")
    print(page)


# Command groups in their own modules (engine/cli_*.py); imported last, they reuse the helpers
# above (console, _fail, _read_job, the exit codes).
from engine import cli_cache, cli_cluster, cli_k8s, cli_refresh  # noqa: E402

for _group in (cli_cache, cli_refresh, cli_cluster, cli_k8s):
    _group.register(app)
