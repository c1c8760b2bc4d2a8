"""The run-directory lock: one holder at a time, holders named, dead holders taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.runtime.lock import LOCK_NAME, LockHeld, RunLock, read_lock, run_lock

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The pid of a process that ran and exited (reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def _write_lock(root: Path, **fields) -> None:
    data = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": "2026-01-01T00:00:00+00:00",
        "command": "winnow run old.yaml",
        "process_start": None,
        "token": "t0",
        **fields,
    }
    (root / LOCK_NAME).write_text(json.dumps(data), encoding="utf-8")


def test_second_holder_refused_with_holder_named(tmp_path: Path) -> None:
    with run_lock(tmp_path, "winnow run job.yaml") as info:
        held = read_lock(tmp_path)
        assert held == info and held.pid == os.getpid()
        # Another process trying the same directory is refused and told who holds it.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from engine.runtime.lock import run_lock\n"
                "try:\n with run_lock(sys.argv[1], 'second'): pass\n"
                "except Exception as e: print(type(e).__name__, e); sys.exit(3)",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert probe.returncode == 3, probe.stderr
        assert probe.stdout.startswith("LockHeld")
        for part in (f"pid {os.getpid()}", socket.gethostname(), info.since, "winnow run job.yaml"):
            assert part in probe.stdout
        with pytest.raises(LockHeld, match="already locked by this process"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_released_on_exception(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), run_lock(tmp_path, "x"):
        assert (tmp_path / LOCK_NAME).is_file()
        1 / 0  # noqa: B018
    assert not (tmp_path / LOCK_NAME).exists()
    with run_lock(tmp_path):  # and can be taken again
        pass


def test_stale_lock_of_dead_process_taken_over_and_named(tmp_path: Path) -> None:
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    logged: list[str] = []
    with run_lock(tmp_path, "winnow refresh", logged.append) as info:
        assert read_lock(tmp_path).token == info.token
    assert len(logged) == 1 and f"pid {pid}" in logged[0] and "winnow run old.yaml" in logged[0]
    assert not list(tmp_path.glob(".winnow.lock*"))  # no guard or temp file left


def test_reused_pid_is_stale_but_live_holder_is_not(tmp_path: Path) -> None:
    # Our own live pid with a different start time: the pid was reused, the holder is dead.
    _write_lock(tmp_path, pid=os.getppid(), process_start=1.0)
    logged: list[str] = []
    with run_lock(tmp_path, log=logged.append):
        pass
    assert logged and "no longer running" in logged[0]
    # The same live pid with no recorded start time: never assumed dead.
    _write_lock(tmp_path, pid=os.getppid())
    with pytest.raises(LockHeld, match=f"pid {os.getppid()}"):
        RunLock(tmp_path).acquire()
    assert read_lock(tmp_path).token == "t0"  # the holder's lock is untouched


def test_other_host_and_unreadable_locks_refused_with_removal_hint(tmp_path: Path) -> None:
    _write_lock(tmp_path, pid=_dead_pid(), host="node-elsewhere")
    with pytest.raises(LockHeld, match="another host") as caught:
        RunLock(tmp_path).acquire()
    assert "node-elsewhere" in str(caught.value) and f"rm {tmp_path / LOCK_NAME}" in str(
        caught.value
    )
    (tmp_path / LOCK_NAME).write_text("{half", encoding="utf-8")
    with pytest.raises(LockHeld, match="unreadable"):
        RunLock(tmp_path).acquire()


def test_release_never_removes_someone_elses_lock(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    lock.acquire()
    _write_lock(tmp_path, token="other")  # e.g. removed by hand and re-taken by another run
    lock.release()
    assert read_lock(tmp_path).token == "other"


def test_concurrent_takeovers_of_one_stale_lock_have_one_winner(tmp_path: Path) -> None:
    _write_lock(tmp_path, pid=_dead_pid())
    code = (
        "import sys, time; from engine.runtime.lock import RunLock, LockHeld\n"
        "lock = RunLock(sys.argv[1])\n"
        "try: lock.acquire()\n"
        "except LockHeld: print('refused'); sys.exit(0)\n"
        "print('won'); sys.stdout.flush(); time.sleep(1.5); lock.release()\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["refused", "refused", "won"], outs
    time.sleep(0.1)
    assert not (tmp_path / LOCK_NAME).exists()
