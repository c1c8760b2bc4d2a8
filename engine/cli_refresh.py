"""`winnow refresh JOB.yaml`: the nightly run into `OUT/<date-or-run-id>/`, with changes.json,
a "Changes since" report section and an `OUT/latest` pointer (engine.refresh)."""

# No `from __future__ import annotations`: typer reads the command's annotations at run time,
# and VerboseOption is a name local to register().
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

if TYPE_CHECKING:
    from engine.config import JobSpec

COMPACT_AT = 8  # compact a cache folder once a refresh leaves this many part files in it
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_name(on: str | None, run_id: str | None) -> str:
    """The night's folder name: --run-id, else --date (YYYY-MM-DD), else today's UTC date."""
    if on is not None and run_id is not None:
        raise ValueError("pass --date or --run-id, not both")
    if run_id is not None:
        if not RUN_NAME.fullmatch(run_id) or run_id in {"latest", "LATEST"}:
            raise ValueError(
                f"--run-id {run_id!r}: use letters, digits, '.', '_', '-' (not 'latest')"
            )
        return run_id
    if on is not None:
        try:
            return date.fromisoformat(on).isoformat()
        except ValueError:
            raise ValueError(f"--date {on!r} is not a date (YYYY-MM-DD)") from None
    return datetime.now(UTC).date().isoformat()


def cache_dirs(job: "JobSpec") -> dict[str, list[str]]:
    """Score-cache folder -> the fingerprints this job's stages keep there."""
    from engine.cache import default_score_cache
    from engine.stages.registry import enabled_stages

    found: dict[str, list[str]] = {}
    for stage in enabled_stages(job):
        spec = getattr(job.stages, stage.name, None)
        cache = getattr(spec, "cache", None)
        if cache is None or not cache.enabled:
            continue
        folder = str(cache.dir or default_score_cache())
        found.setdefault(folder, []).extend(stage.caches(job).values())
    return found


def summary_lines(data: dict[str, Any]) -> list[str]:
    """What the console says about the night's changes."""
    lines = []
    for name, stage in (data.get("model_stages") or {}).items():
        lines.append(
            f"{name}: {stage.get('cache_misses')} rows sent to the model, "
            f"{stage.get('cache_hits')} from the score cache"
        )
    if data.get("previous") is None:
        return ["first run of this job: nothing to compare with", *lines]
    rows, sel, drift = data["rows"], data["selection"], data["score_drift"]
    return [
        f"since {data['previous']}: {rows['added']} rows added, {rows['removed']} removed, "
        f"{rows['changed']} changed, {rows['unchanged']} unchanged",
        f"selection: {sel['entered']['rows']} entered, {sel['left']['rows']} left, "
        f"{sel['stayed']} stayed",
        f"score drift of the {drift['rows_compared']} rows in both runs: max |Δ| "
        f"{drift['max_abs_diff']:g}",
        *lines,
    ]


def register(app: typer.Typer) -> None:
    from engine.cli import (
        EXIT_CONFIG,
        EXIT_INPUT,
        EXIT_LOCKED,
        VerboseOption,
        _fail,
        _read_job,
        console,
    )

    @app.command()
    def refresh(
        job_file: Annotated[Path, typer.Argument(help="job spec YAML")],
        on: Annotated[
            str | None, typer.Option("--date", help="the night's folder: YYYY-MM-DD (today)")
        ] = None,
        run_id: Annotated[
            str | None, typer.Option("--run-id", help="the night's folder name instead")
        ] = None,
        out: Annotated[
            str | None, typer.Option("--out", help="overrides `out:` (holds every night)")
        ] = None,
        compact_cache: Annotated[
            bool,
            typer.Option(
                "--compact-cache/--no-compact-cache",
                help=f"merge a score-cache folder once it has {COMPACT_AT} part files",
            ),
        ] = True,
        force: Annotated[bool, typer.Option("--force", help="redo completed stages")] = False,
        verbose: VerboseOption = False,
    ) -> None:
        """Nightly run: OUT/<date>/ plus changes.json and a report section on what changed
        since the previous night; OUT/latest points at it. Only rows not in the score cache
        (new or edited) reach a model; dedup and selection run over the whole corpus."""
        from engine import cache_admin
        from engine.config import ConfigError, load_job
        from engine.pipeline import JobRunner, python_command
        from engine.readers.sources import SourceError
        from engine.refresh import read_latest, set_latest, summary_path, write_changes
        from engine.runtime.lock import LockHeld, run_lock
        from engine.runtime.rundir import RunDir
        from engine.stages.actor_scoring import PlacementError
        from engine.stages.ingest import EmptyInputError
        from engine.stages.report import run_report

        try:
            job = _read_job(lambda: load_job(job_file))
            name = run_name(on, run_id)
        except ConfigError as exc:
            _fail(f"invalid job spec {job_file}:\n{exc}", EXIT_CONFIG)
        except ValueError as exc:
            _fail(escape(str(exc)), EXIT_CONFIG)
        base = out or job.out
        if base is None:
            _fail("no output directory: pass --out DIR or set `out:` in the job spec", EXIT_CONFIG)
        base_dir = Path(base)
        command = python_command()
        try:
            # One refresh per OUT at a time (each night's run also locks its own folder).
            with run_lock(base_dir, command, console.print):
                current = base_dir / name
                previous = read_latest(base_dir)
                if previous is not None and previous.resolve() == current.resolve():
                    previous = summary_path(current)  # a re-run of the same night
                manifest = JobRunner(job, current, console, verbose=verbose).execute(
                    force=force, command=command
                )
                data = write_changes(previous, current)
                run_report(RunDir(current), manifest)  # again, now with the Changes section
                set_latest(base_dir, name)
                if compact_cache:
                    for folder, fps in cache_dirs(job).items():
                        for r in cache_admin.compact(folder, fps, COMPACT_AT):
                            if r.files_after < r.files_before:
                                console.print(
                                    f"[dim]score cache {r.fingerprint}: {r.files_before} → "
                                    f"{r.files_after} files[/]"
                                )
        except LockHeld as exc:
            _fail(escape(str(exc)), EXIT_LOCKED)
        except (SourceError, EmptyInputError) as exc:
            _fail(escape(str(exc)), EXIT_INPUT)
        except PlacementError as exc:
            _fail(escape(str(exc)), EXIT_CONFIG)
        for line in summary_lines(data):
            console.print(escape(line))
        console.print(f"report: [bold]{escape(manifest.outputs.report)}[/]")
        console.print(f"latest: {escape(str(base_dir / 'latest'))} → {escape(name)}")
        print(current)
