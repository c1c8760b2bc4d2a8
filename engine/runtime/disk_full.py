"""A full disk (or a file-size limit) while a run writes: recognised, named, reported once.

A run that fills its disk is an expected outcome on a shared cluster volume, not a crash to
trace: the CLI names the output it was writing and says what state the run directory is left in
(outputs are replaced atomically, one at a time, so either the previous completed state or a
consistent mix that the next run finishes). The same errors arrive as an OSError in the driver,
or as text from a JVM (a Py4J/Spark exception wrapping an executor's IOException) or a Ray task.
"""

from __future__ import annotations

import errno
import os
import re
import traceback
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# How the same errors read when they come back as text: from a JVM (a Py4J/Spark exception that
# wraps an executor's IOException), from a Ray task, or from pyarrow's own OSError messages.
DISK_FULL_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "File too large": errno.EFBIG,
    "Disk quota exceeded": errno.EDQUOT,
}
_PATH_IN_TEXT = re.compile(r"(?:file:)?(/[^\s'\"(),;]+)")


def disk_full_error(exc: BaseException, out: str | Path) -> tuple[str, str] | None:
    """(path, strerror) when `exc` (or an exception it was raised from or during) means the disk
    or a file-size limit filled up, else None. The path is the output being written: the
    target of the innermost `atomic_path` temp file the failing code held (not the temp file),
    else the OSError's filename, else a path under `out` named in the message, else `out`."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        text = str(current)
        if code not in DISK_FULL_ERRNOS:
            code = next((c for t, c in DISK_FULL_TEXTS.items() if t in text), None)
        if code is not None:
            return _written_path(current, text, out), os.strerror(code)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


# Locals that name the file a writer writes to (pyarrow's `write_table(table, where)`, ...).
_PATH_LOCALS = frozenset({"where", "path", "target", "file", "filename"})
# The temp file `atomic_path` writes to, `.<name>.<random>.tmp` beside the output `<name>`
# (`.spill`: the unsorted lines export writes before `<name>`, engine.stages.export).
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.(?:tmp|spill)$")


def _atomic_target(value: object) -> str | None:
    """The output a local variable is the `atomic_path` temp file (or open handle) of."""
    name = getattr(value, "name", value) if not isinstance(value, (str, Path)) else value
    if not isinstance(name, (str, Path)):
        return None
    path = Path(name)
    match = _ATOMIC_TMP.match(path.name)
    return str(path.with_name(match.group("name"))) if match else None


def _written_path(exc: BaseException, text: str, out: str | Path) -> str:
    # contextlib gives the error back its own traceback, without atomic_path's frame, so the
    # output is found from the writer's frames: the innermost one holding an atomic temp file.
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    root = Path(out).resolve()
    for frame in reversed(frames):
        for name, value in frame.f_locals.items():
            target = _atomic_target(value)
            if target is not None:
                return target
            # A direct write (pyarrow's `write_table(table, where)`, an open(path)) under `out`.
            if name in _PATH_LOCALS and isinstance(value, (str, Path)):
                path = Path(value).resolve()
                if path.is_relative_to(root) and path != root:
                    return str(path)
    if isinstance(exc, OSError) and exc.filename:
        return _atomic_target(exc.filename) or str(exc.filename)
    for match in _PATH_IN_TEXT.finditer(text):
        if match.group(1).startswith(str(root)):
            return match.group(1)
    return str(out)


PUBLIC_OUTPUTS = (
    "selected.jsonl",
    "random_baseline.jsonl",
    "scores.parquet",
    "quarantine.jsonl",
    "manifest.json",
    "report.html",
)


def public_outputs(out: str | Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each public output: an atomic replace changes the inode."""
    found = {}
    for name in PUBLIC_OUTPUTS:
        try:
            stat = (Path(out) / name).stat()
        except OSError:
            continue
        found[name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def log_traceback(out: str | Path, exc: BaseException) -> None:
    """The traceback goes to the run's log, not the console; best effort (the disk is full)."""
    try:
        with open(Path(out) / "logs" / "winnow.log", "a", encoding="utf-8") as handle:
            handle.write("".join(traceback.format_exception(exc)))
    except OSError:
        pass


def disk_full_message(exc: BaseException, out: str | Path, before: dict) -> str | None:
    """The one line the CLI prints when `exc` is a full disk (None when it is not), saying
    which output was being written and what state `out` is left in; the traceback goes to
    the run's log. `before`: `public_outputs(out)` taken before the run started."""
    hit = disk_full_error(exc, out)
    if hit is None:
        return None
    log_traceback(out, exc)
    path, reason = hit
    # Outputs are replaced atomically, one by one: a stage that completed before the failure
    # (select, say, before export hit the limit) has replaced its own. Said, never hidden.
    after = public_outputs(out)
    replaced = sorted(name for name in after if after[name] != before.get(name))
    if "manifest.json" not in before:  # a first run: there is no earlier state to keep
        state = f"{out} holds no completed run yet: run the command again to finish"
    elif replaced:
        state = (
            f"stages that completed before it replaced {', '.join(replaced)} in {out}; "
            "the other outputs are the previous run's: run the command again to finish"
        )
    else:
        state = f"the previous completed state in {out} is unchanged"
    return f"winnow: out of disk space (or file-size limit) writing {path}: {reason}; {state}"
