"""The quiet console: one progress bar per stage, and library logs routed to the run's `logs/`.

`StageProgress` wraps a rich `Progress`: each stage gets one bar (rows done / total, rate, elapsed,
ETA) that stays on screen, finished, when the stage ends. A stage reports through
`factory(name)(description, total)`, which returns `advance(n)`; a second call starts a new
sub-step on the same bar. When the console is not a terminal (CI logs) no live bars are drawn:
one plain line per stage says what it did. With `enabled=False` (`--verbose`: library logs are
live on the terminal) it prints one plain line when a stage starts and one when it ends.

`configure_logging(logs, verbose)` sends the Python loggers of Ray, Spark's py4j bridge and the
model libraries to `logs/winnow.log` (Ray's also to `logs/ray.log`) instead of the terminal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int | None], Advance]

__all__ = [
    "RAY_LOGGERS",
    "ROUTED_LOGGERS",
    "Advance",
    "ProgressFactory",
    "StageProgress",
    "configure_logging",
]

MB = 1_000_000
SPARK_POLL_S = 0.5


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else _clock(seconds)


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / MB:,.1f} MB"
    return f"{int(value):,} {unit}"


def _rate(per_second: float | None, unit: str) -> str:
    if not per_second:
        return ""
    if unit == "bytes":
        return f"{per_second / MB:,.1f} MB/s"
    if per_second < 0.1:  # slow work (a training step, a long judgement): time per item
        return f"{1 / per_second:,.1f} s/{unit.removesuffix('s')}"
    return f"{per_second:,.1f} {unit}/s" if per_second < 100 else f"{per_second:,.0f} {unit}/s"


def unit_of(description: str) -> str:
    """What a sub-step counts, from its description: bytes while framing, optimizer steps while
    training ("train <arm>"), rows otherwise."""
    if description.startswith("framing"):
        return "bytes"
    if description.startswith("train "):
        return "steps"
    return "rows"


@dataclass
class _Stage:
    """What one stage has reported: the current sub-step, and totals over all sub-steps."""

    name: str
    started: float
    task: TaskID | None = None
    step: int = 0  # bumped by every factory call; stale advance callbacks are ignored
    description: str | None = None
    unit: str = "rows"
    total: int | None = None
    completed: int = 0
    step_started: float = 0.0
    last_advance: float | None = None  # the current sub-step's latest advance
    settled: bool = False  # the current sub-step reached its total
    done: dict[str, float] = field(default_factory=dict)  # unit -> amount over all sub-steps
    busy: dict[str, float] = field(default_factory=dict)  # unit -> seconds spent on it
    ended: float | None = None
    failed: bool = False

    def close_step(self) -> None:
        """Count the sub-step's time, up to its last advance, towards the rate of its unit."""
        if self.last_advance is not None and self.unit != "tasks":
            seconds = self.last_advance - self.step_started
            self.busy[self.unit] = self.busy.get(self.unit, 0.0) + seconds
        self.last_advance = None

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def summary(self) -> tuple[str, str]:
        """The stage's count ("9,000 rows", "3.2 MB") and its rate; empty when it reported none."""
        counts, rate = [], ""
        for unit in ("rows", "bytes", "steps"):
            amount, seconds = self.done.get(unit, 0), self.busy.get(unit, 0.0)
            if amount:
                counts.append(_amount(amount, unit))
                if not rate and seconds >= 0.5:
                    rate = _rate(amount / seconds, unit)
        # Spark tasks are shown live only: short Spark stages finish between two polls, so a
        # total of the tasks seen would be wrong.
        return ", ".join(counts), rate

    def final_line(self) -> str:
        if self.failed:
            return f"[red]{escape(self.name)}: failed after {_duration(self.elapsed)}[/]"
        count, rate = self.summary()
        text = f"[green]{escape(self.name)}[/]: {count or 'done'} in {_duration(self.elapsed)}"
        return text + (f" ({rate})" if rate else "")


class _CountColumn(ProgressColumn):
    """'done / total unit' while running; the stage's count once finished."""

    def render(self, task: Task) -> Text:
        if "summary" in task.fields:
            return Text(task.fields["summary"], style="progress.download")
        unit = task.fields.get("unit", "rows")
        if task.total is None:
            text = _amount(task.completed, unit) if task.completed else ""
        elif unit == "bytes":
            text = f"{task.completed / MB:,.1f} / {task.total / MB:,.1f} MB"
        else:
            text = f"{int(task.completed):,} / {int(task.total):,} {unit}"
        return Text(text, style="progress.download")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        if "final_rate" in task.fields:
            return Text(task.fields["final_rate"], style="progress.data.speed")
        return Text(_rate(task.speed, task.fields.get("unit", "rows")), style="progress.data.speed")


class _ElapsedColumn(ProgressColumn):
    """The whole stage's time, not the current sub-step's."""

    def render(self, task: Task) -> Text:
        started = task.fields.get("stage_started")
        if started is None:
            return Text("")
        end = task.fields.get("stage_ended") or time.monotonic()
        return Text(_clock(end - started), style="progress.elapsed")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        if "summary" in task.fields or task.total is None:
            return Text("")
        remaining = task.time_remaining
        if remaining is None:
            return Text("eta -:--", style="progress.remaining")
        return Text(f"eta {_clock(remaining)}", style="progress.remaining")


class StageProgress:
    """One bar per stage; see the module docstring.

    with StageProgress(console, enabled=not verbose) as progress:
        with progress.stage("lm"):
            advance = progress.factory("lm")("lm", 9000)
            advance(256)
    """

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        # Live bars only on a real terminal; a file or a CI log gets one plain line per stage.
        self.live = enabled and console.is_terminal and not console.is_dumb_terminal
        self._lock = threading.RLock()
        self._stages: dict[str, _Stage] = {}
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                _CountColumn(),
                _RateColumn(),
                _ElapsedColumn(),
                _EtaColumn(),
                console=console,
                redirect_stdout=False,  # stdout carries the report path only
                redirect_stderr=True,
                refresh_per_second=4,
            )

    @property
    def bars(self) -> Progress | None:
        """The rich Progress behind the live bars (None without live bars)."""
        return self._progress

    def __enter__(self) -> StageProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            for state in list(self._stages.values()):
                if state.ended is None:
                    self._finish(state, failed=exc_type is not None)
        if self._progress is not None:
            self._progress.stop()

    # -- stages ---------------------------------------------------------------------------------

    @contextmanager
    def stage(self, name: str, spark: Any = None) -> Iterator[None]:
        """One bar for the block; finished (kept on screen) when the block ends.

        `spark`: a SparkSession, or a zero-argument callable returning one or None (a getter,
        so that the session is not started just to watch it); while the block runs, Spark's
        status tracker is polled and the active Spark stage's tasks shown on the bar.
        """
        state = self._start(name)
        poller = None
        if spark is not None and self._progress is not None:  # live bars only
            poller = _SparkPoller(spark, lambda stages: self._spark_update(state, stages))
            poller.start()
        failed = True
        try:
            yield
            failed = False
        finally:
            if poller is not None:
                poller.stop()
            with self._lock:
                self._finish(state, failed=failed)

    def factory(self, name: str) -> ProgressFactory:
        """`factory(name)(description, total)` starts a sub-step of stage `name` on its bar and
        returns `advance(n)`. Totals are rows, bytes when the description starts with
        "framing", optimizer steps when it starts with "train " (`unit_of`)."""

        def progress(description: str, total: int | None) -> Advance:
            with self._lock:
                state = self._stages.get(name)
                if state is None or state.ended is not None:
                    state = self._start(name)
                step = self._new_step(state, description, total)

            def advance(n: int) -> None:
                if not n:
                    return
                with self._lock:
                    if state.step != step or state.ended is not None:
                        return
                    state.completed += n
                    state.last_advance = time.monotonic()
                    state.done[state.unit] = state.done.get(state.unit, 0) + n
                    if self._progress is None or state.task is None:
                        return
                    reached = state.total is not None and state.completed >= state.total
                    if reached and not state.settled:
                        state.settled = True
                        self._settle(state)
                    else:
                        self._progress.update(state.task, completed=state.completed)

            return advance

        return progress

    # -- internals ------------------------------------------------------------------------------

    def _label(self, state: _Stage) -> str:
        if state.description and state.description != state.name:
            return f"[bold]{escape(state.name)}[/] · {escape(state.description)}"
        return f"[bold]{escape(state.name)}[/]"

    def _start(self, name: str) -> _Stage:
        with self._lock:
            state = _Stage(name=name, started=time.monotonic())
            self._stages[name] = state
            if self._progress is not None:
                state.task = self._progress.add_task(
                    self._label(state), total=None, unit="rows", stage_started=state.started
                )
            elif not self.enabled:
                self.console.print(f"[bold]{escape(name)}[/]: started")
            return state

    def _new_step(self, state: _Stage, description: str, total: int | None) -> int:
        now = time.monotonic()
        state.close_step()
        state.step += 1
        state.settled = False
        state.description = description
        state.unit = unit_of(description)
        state.total = total
        state.completed = 0
        state.step_started = now
        self._show_step(state)
        return state.step

    def _show_step(self, state: _Stage) -> None:
        if self._progress is None or state.task is None:
            return
        if state.total is None:  # reset() keeps the old total when given None
            for task in self._progress.tasks:
                if task.id == state.task:
                    task.total = None
        self._progress.reset(  # reset() replaces the fields: give them all
            state.task,
            total=state.total,
            completed=0,
            description=self._label(state),
            unit=state.unit,
            stage_started=state.started,
        )

    def _settle(self, state: _Stage) -> None:
        """A sub-step reached its total while the stage goes on: its bar pulses (indeterminate,
        no ETA) with the sub-step's amount, until the next sub-step or the stage's end."""
        assert self._progress is not None and state.task is not None
        for task in self._progress.tasks:
            if task.id == state.task:
                task.total = None
        self._progress.reset(
            state.task,
            completed=state.completed,
            description=f"{self._label(state)} ✓",
            unit=state.unit,
            stage_started=state.started,
        )

    def _spark_update(self, state: _Stage, stages: dict[int, tuple[int, int]]) -> None:
        """`stages`: the active Spark stages, id -> (tasks done, tasks)."""
        with self._lock:
            if state.ended is not None or not stages:
                return
            done = sum(d for d, _ in stages.values())
            total = sum(t for _, t in stages.values())
            ids = ", ".join(str(i) for i in sorted(stages))
            description = f"Spark stage {ids}"
            if state.unit != "tasks" or state.description != description:
                state.close_step()
                state.step += 1
                state.settled = False
                state.description, state.unit, state.total = description, "tasks", total
                state.step_started = time.monotonic()
                self._show_step(state)
            state.completed, state.total = done, total
            if self._progress is not None and state.task is not None:
                self._progress.update(state.task, completed=done, total=total)

    def _finish(self, state: _Stage, failed: bool) -> None:
        now = time.monotonic()
        state.close_step()
        state.ended, state.failed = now, failed
        if self._progress is not None and state.task is not None:
            count, rate = state.summary()
            label = escape(state.name)
            if failed:
                description, count, rate = f"[red]✗ {label}[/]", "failed", ""
            else:
                description = f"[green]✓ {label}[/]"
            finished_total = state.total if failed else max(state.completed, state.total or 0, 1)
            self._progress.update(
                state.task,
                description=description,
                total=finished_total,
                completed=state.completed if failed else finished_total,
                summary=count,
                final_rate=rate,
                stage_ended=now,
            )
            self._progress.stop_task(state.task)
        else:
            self.console.print(state.final_line())


class _SparkPoller:
    """Polls `sparkContext.statusTracker()` in a daemon thread while a Spark stage runs."""

    def __init__(self, spark: Any, report: Callable[[dict[int, tuple[int, int]]], None]) -> None:
        self._spark = spark
        self._report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="winnow-spark-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _session(self) -> Any:
        spark = self._spark
        if callable(spark) and not hasattr(spark, "sparkContext"):
            return spark()
        return spark

    def _run(self) -> None:
        while not self._stop.wait(SPARK_POLL_S):
            try:
                session = self._session()
                if session is None:
                    continue
                tracker = session.sparkContext.statusTracker()
                stages: dict[int, tuple[int, int]] = {}
                for stage_id in tracker.getActiveStageIds():
                    info = tracker.getStageInfo(stage_id)
                    if info is not None:
                        stages[stage_id] = (info.numCompletedTasks, info.numTasks)
            except Exception:  # a stopping session, a closed gateway: stop watching
                return
            if self._stop.is_set():
                return
            self._report(stages)


# -- logging --------------------------------------------------------------------------------------

RAY_LOGGERS = ("ray", "ray.data")
ROUTED_LOGGERS = (
    *RAY_LOGGERS,
    "py4j",
    "pyspark",
    "vllm",
    "transformers",
    "sentence_transformers",
    "datasets",
    "huggingface_hub",
    "urllib3",
    "httpx",
    "filelock",
    "py.warnings",
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class _Saved:
    removed: list[logging.Handler]  # terminal handlers taken off, given back by verbose
    propagate: bool
    leveled: bool = False  # its level was NOTSET and routing set INFO


_saved: dict[str, _Saved] = {}  # logger -> its state before routing
_files: dict[Path, logging.FileHandler] = {}
_routing_lock = threading.Lock()


def _file_handler(path: Path) -> logging.FileHandler:
    handler = _files.get(path)
    if handler is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)
        handler.setLevel(logging.INFO)
        handler.set_name(f"winnow:{path}")
        _files[path] = handler
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def _is_ours(handler: logging.Handler) -> bool:
    return any(handler is ours for ours in _files.values())


def _is_terminal_handler(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (stderr or stdout), not to a file of its own."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def configure_logging(logs: Path | None, verbose: bool = False) -> None:
    """Route library loggers to `logs/winnow.log` (Ray's also to `logs/ray.log`); idempotent.

    Quiet (`logs` given, not verbose): each logger in ROUTED_LOGGERS loses its terminal handlers
    (a library's own log files stay), gets the file handlers, stops propagating to the root
    logger, and logs INFO and up when it had no level; Python warnings go to the `py.warnings`
    logger, so to the file too. Verbose or no `logs`: every logger gets back what it had
    (today's behaviour). Call it once at the start of a run; `ensure_ray` and `spark_session`
    call it again, because Ray and Ray Data set their loggers up when they are imported.
    """
    with _routing_lock:
        if logs is None or verbose:
            _restore()
            return
        logs = Path(logs).absolute()
        everything = _file_handler(logs / "winnow.log")
        ray_only = _file_handler(logs / "ray.log")
        for name in ROUTED_LOGGERS:
            logger = logging.getLogger(name)
            saved = _saved.setdefault(name, _Saved([], logger.propagate))
            for handler in list(logger.handlers):
                if _is_ours(handler):
                    logger.removeHandler(handler)
                elif _is_terminal_handler(handler):
                    logger.removeHandler(handler)
                    saved.removed.append(handler)
            logger.addHandler(everything)
            if name in RAY_LOGGERS:
                logger.addHandler(ray_only)
            logger.propagate = False
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
                saved.leveled = True
        logging.captureWarnings(True)
        # An earlier run's files (another run directory in the same process) are closed.
        for path in [p for p in _files if p.parent != logs]:
            _files.pop(path).close()


def _restore() -> None:
    for name, saved in _saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if _is_ours(handler):
                logger.removeHandler(handler)
        for handler in saved.removed:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = saved.propagate
        if saved.leveled and logger.level == logging.INFO:
            logger.setLevel(logging.NOTSET)
    _saved.clear()
    logging.captureWarnings(False)
    for handler in _files.values():
        handler.close()
    _files.clear()
