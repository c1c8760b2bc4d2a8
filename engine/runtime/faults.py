"""A fault-injection hook: SIGKILL the whole run at a chosen moment of a chosen stage.

Why it exists: Winnow promises that a run killed at any moment (an OOM killer, a preempted node,
`kill -9`) resumes from where it was and ends with the same outputs as an uninterrupted run
(markers written after data, outputs promoted atomically). This hook lets the chaos tests
(tests/test_fault_kill.py) prove that for every stage of the registry, and lets an operator
rehearse a failure on a real cluster the same way:

    WINNOW_FAULT=kill:<stage>:<point> winnow run job.yaml

Points: `start` (the stage begins; Ray is up for a Ray stage), `progress` (the stage's first
progress tick that moved past 0 items: mid-stage, some work done), `before_marker` (all of the
stage's data written, its marker not yet). The kill is `os.killpg(os.getpgrp(), SIGKILL)`: the
driver and everything in its process group die at once, with no cleanup, as on a lost node.
Unset (the normal case), every call here is a no-op.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV = "WINNOW_FAULT"
POINTS = ("start", "progress", "before_marker")

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int | None], Advance]


def parse_fault(value: str | None) -> tuple[str, str] | None:
    """`kill:<stage>:<point>` -> (stage, point); None when unset or empty. A malformed value
    raises, so a rehearsal with a typo fails loudly instead of running without its fault."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 3 or parts[0] != "kill" or not parts[1] or parts[2] not in POINTS:
        raise ValueError(
            f"{ENV}={value!r}: expected kill:<stage>:<point> with point one of {', '.join(POINTS)}"
        )
    return parts[1], parts[2]


def fault_point(stage: str, point: str) -> None:
    """Kill the process group now if $WINNOW_FAULT names this stage and point."""
    if parse_fault(os.environ.get(ENV)) == (stage, point):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def with_fault(stage: str, factory: ProgressFactory) -> ProgressFactory:
    """`factory` whose advance callbacks fire the `progress` point once some items are done."""
    if parse_fault(os.environ.get(ENV)) != (stage, "progress"):
        return factory

    def wrapped(description: str, total: int | None) -> Advance:
        advance = factory(description, total)

        def tick(n: int) -> None:
            advance(n)
            if n > 0:
                fault_point(stage, "progress")

        return tick

    return wrapped
