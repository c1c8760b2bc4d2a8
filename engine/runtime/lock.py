"""The run-directory lock: one writer per run directory (two runs or two refreshes never mix).

`<run>/.winnow.lock` holds who writes there: pid, host, the process's start time, when the lock
was taken and the command. It is created atomically and complete (written to a temp file, then
hard-linked into place: the link fails if a lock exists, like O_EXCL, and a reader never sees
half a lock). A second writer is refused with a message naming the holder.

A lock is stale only when it is provably dead: same host, and the pid is gone, a zombie, or now
belongs to another process (its start time differs from the one recorded — pids are reused).
A lock from another host is never assumed stale (its pid means nothing here): the message says
how to remove it by hand. A stale lock is named in the log and taken over under a short-lived
guard file, after re-reading it, so two processes that both saw it stale cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

LOCK_NAME = ".winnow.lock"
GUARD_SUFFIX = ".takeover"
GUARD_MAX_AGE_S = 60.0  # a takeover guard lives for milliseconds; older means its owner died
START_TOLERANCE_S = 1.0  # psutil start times are rounded to clock ticks


class LockHeld(RuntimeError):
    """Another live process (or one on another host) holds the run directory's lock."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder."""

    pid: int
    host: str
    since: str  # ISO time the lock was taken (UTC)
    command: str | None
    process_start: float | None  # psutil create_time of the holder: detects a reused pid
    token: str  # unique per acquisition: release removes only its own lock

    def describe(self) -> str:
        command = f", command: {self.command}" if self.command else ""
        return f"pid {self.pid} on host {self.host} since {self.since}{command}"

    @classmethod
    def parse(cls, text: str) -> LockInfo:
        data = json.loads(text)
        return cls(
            pid=int(data["pid"]),
            host=str(data["host"]),
            since=str(data["since"]),
            command=data.get("command"),
            process_start=data.get("process_start"),
            token=str(data["token"]),
        )


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def holder_alive(info: LockInfo) -> bool:
    """Whether the (same-host) holder still runs: pid exists, is not a zombie, and started when
    the lock says (a different start time means the pid was reused by another process)."""
    try:
        process = psutil.Process(info.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's live process: never assume dead
    if info.process_start is None:
        return True
    return abs(started - info.process_start) <= START_TOLERANCE_S


def _link_new(path: Path, text: str) -> bool:
    """Create `path` with `text` atomically; False if it already exists."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def _read(path: Path) -> tuple[str, LockInfo | None] | None:
    """(text, parsed info or None if unreadable); None when there is no lock file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return text, LockInfo.parse(text)
    except (ValueError, KeyError, TypeError):
        return text, None


class RunLock:
    """The lock of one run directory; use as a context manager (released on any exit)."""

    def __init__(
        self,
        root: str | Path,
        command: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.command = command
        self.log = log or (lambda message: None)
        self.info: LockInfo | None = None

    def _mine(self) -> LockInfo:
        pid = os.getpid()
        return LockInfo(
            pid=pid,
            host=socket.gethostname(),
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            command=self.command,
            process_start=_process_start(pid),
            token=uuid.uuid4().hex,
        )

    def acquire(self) -> LockInfo:
        """Take the lock or raise LockHeld naming the holder; takes over a provably dead one."""
        self.root.mkdir(parents=True, exist_ok=True)
        mine = self._mine()
        text = json.dumps(asdict(mine), indent=2) + "\n"
        for _ in range(50):  # only lost takeover races loop; each pass is a few syscalls
            if _link_new(self.path, text):
                self.info = mine
                return mine
            found = _read(self.path)
            if found is None:
                continue  # released between our link and our read: try again
            raw, holder = found
            if holder is None:
                raise LockHeld(
                    f"{self.root} is locked by an unreadable lock file {self.path} "
                    f"({raw[:80]!r}); if no run is writing there, remove it: rm {self.path}"
                )
            if holder.host != mine.host:
                raise LockHeld(
                    f"{self.root} is locked by {holder.describe()}: another host, so Winnow "
                    "cannot tell whether it still runs; if it does not, remove the lock: "
                    f"rm {self.path}"
                )
            if holder.pid == mine.pid and holder.process_start == mine.process_start:
                raise LockHeld(f"{self.root} is already locked by this process ({holder.since})")
            if holder_alive(holder):
                raise LockHeld(
                    f"{self.root} is in use by another run: {holder.describe()}; wait for it "
                    f"to finish (or stop it) — the lock is {self.path}"
                )
            if self._take_over(raw, holder, text):
                self.info = mine
                return mine
        raise LockHeld(f"{self.root}: could not take the lock {self.path} (contended)")

    def _take_over(self, raw: str, stale: LockInfo, text: str) -> bool:
        """Replace the stale lock `raw` with ours, under a guard, only if it is still `raw`."""
        guard = self.path.with_name(self.path.name + GUARD_SUFFIX)
        if not _link_new(guard, text):
            with suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > GUARD_MAX_AGE_S:
                    guard.unlink()  # its owner died mid-takeover
            time.sleep(0.05)
            return False
        try:
            found = _read(self.path)
            if found is None or found[0] != raw:
                return False  # someone else already took it over: start again
            self.log(
                f"[yellow]stale lock:[/] {self.path} was held by {stale.describe()}, which is "
                "no longer running; taking it over"
            )
            # Atomic: readers see the stale lock or ours, never no lock at all.
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f"{LOCK_NAME}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
            return True
        finally:
            with suppress(FileNotFoundError):
                guard.unlink()

    def release(self) -> None:
        """Remove the lock if it is still ours (never someone else's)."""
        if self.info is None:
            return
        found = _read(self.path)
        if found is not None and found[1] is not None and found[1].token == self.info.token:
            with suppress(FileNotFoundError):
                self.path.unlink()
        self.info = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextmanager
def run_lock(
    root: str | Path, command: str | None = None, log: Callable[[str], None] | None = None
) -> Iterator[LockInfo]:
    """Hold `root`'s lock for the block (released on exceptions too)."""
    lock = RunLock(root, command, log)
    info = lock.acquire()
    try:
        yield info
    finally:
        lock.release()


def read_lock(root: str | Path) -> LockInfo | None:
    """Who holds `root`'s lock now (None: nobody, or an unreadable file)."""
    found = _read(Path(root) / LOCK_NAME)
    return None if found is None else found[1]
