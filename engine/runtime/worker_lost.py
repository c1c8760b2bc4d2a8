"""A worker that died for good: named in one line, not a page of Java or Ray traceback.

Spark retries a task whose Python worker died (`local[N,4]`, or a cluster's
`spark.task.maxFailures`) and Ray restarts a dead actor, so a single death is survived. A worker
that dies on every attempt (the OOM killer on a task too big for its memory, a node that keeps
getting preempted) still ends the run: the CLI then says which stage lost what, and that the
stages completed before it are kept, so the same command resumes. The traceback goes to the
run's log.
"""

from __future__ import annotations

import re

# Ray's exceptions for a process or node that went away, by class name (so this module does
# not import Ray): an actor, a task's worker, a node, or an object whose owner died.
RAY_DEATHS = {
    "ActorDiedError": "a Ray actor died",
    "RayActorError": "a Ray actor died",
    "ActorUnavailableError": "a Ray actor became unreachable",
    "WorkerCrashedError": "a Ray worker process died",
    "NodeDiedError": "a Ray node died",
    "LocalRayletDiedError": "the local Ray node died",
    "OwnerDiedError": "the Ray worker that owned a result died",
    "ObjectLostError": "a Ray result was lost with its node",
}
# How Spark reports a Python worker's death once a task has used up its attempts.
_SPARK_CRASH = re.compile(r"Python worker exited unexpectedly \(crashed\)")
_SPARK_ATTEMPTS = re.compile(r"Task \S+ in stage \S+ failed (\d+) times")
_SPARK_EXECUTOR = re.compile(r"ExecutorLostFailure[^\n]*|Executor heartbeat timed out[^\n]*")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: set[int] = set()
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return found


def worker_lost(exc: BaseException) -> str | None:
    """What died, in a few words ("a Spark Python worker crashed, on all 4 attempts of a
    task"), when `exc` (or one it was raised from) is a worker or node death; else None."""
    for current in _chain(exc):
        for cls in type(current).__mro__:
            if cls.__name__ in RAY_DEATHS:
                return RAY_DEATHS[cls.__name__]
        text = str(current)
        attempts = _SPARK_ATTEMPTS.search(text)
        tries = ""
        if attempts and attempts.group(1) == "1":
            tries = ", and tasks are not retried (spark.task.maxFailures 1 or a local[N,1] master)"
        elif attempts:
            tries = f", on all {attempts.group(1)} attempts of a task"
        if _SPARK_CRASH.search(text):
            return f"a Spark Python worker crashed{tries}"
        executor = _SPARK_EXECUTOR.search(text)
        if executor:
            return f"a Spark executor was lost{tries} ({executor.group(0).strip()[:160]})"
    return None


def worker_lost_message(exc: BaseException, stage: str | None) -> str | None:
    """The CLI's line for a run ended by a worker's death, or None when `exc` is not one."""
    what = worker_lost(exc)
    if what is None:
        return None
    where = f"{stage}: " if stage else ""
    return (
        f"winnow: {where}{what}; the stages completed before it are kept: run the same command "
        "again to resume (the traceback is in the run's logs/winnow.log)"
    )
