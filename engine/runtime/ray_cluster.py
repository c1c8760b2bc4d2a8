"""Connect to Ray: a local Ray by default, a cluster address by config.

Quiet (a `logs` folder and not verbose): Ray's driver-side Python logs ("Started a local Ray
instance", the token-authentication warning, Ray Data's execution messages) go to `logs/ray.log`
and `logs/winnow.log` (engine.runtime.console.configure_logging), Ray Data's progress bars are off
(the pipeline's own bar shows the stage), and workers' output stays in Ray's session folder
(`log_to_driver=False`; `logs/ray.log` names that folder). Verbose: worker output is streamed
to the terminal and Ray Data's progress display is on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import RaySpec


def ensure_ray(spec: RaySpec, logs: Path | None = None, verbose: bool = False) -> None:
    """Initialise Ray once per process; later calls reuse the running instance (and re-route
    the logs of this run)."""
    import ray
    import ray.data  # configures the `ray.data` logger on import: route after it

    from engine.runtime.console import LOG_FORMAT, configure_logging

    quiet = logs is not None and not verbose
    if logs is not None:
        configure_logging(logs, verbose)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict = {"include_dashboard": False, "log_to_driver": verbose}
        if quiet:
            kwargs["logging_format"] = LOG_FORMAT  # ray.init re-formats the `ray` handlers
        if spec.address is not None:
            ray.init(address=spec.address, **kwargs)
        else:
            ray.init(num_cpus=spec.num_cpus, **kwargs)
        if logs is not None:
            configure_logging(logs, verbose)
    if quiet:
        _name_session_logs()
    ctx = ray.data.DataContext.get_current()
    # Off: no progress manager at all, so neither bars nor the "Running Dataset" log blocks
    # that Ray Data writes instead of bars when stdout is not a terminal.
    ctx.enable_progress_bars = not quiet


def _name_session_logs() -> None:
    """Write where Ray keeps the workers' stdout/stderr into the run's ray.log."""
    try:
        import ray._private.worker as worker

        folder = worker._global_node.get_logs_dir_path()
    except Exception:  # a private attribute: best effort only
        return
    logging.getLogger("ray").info("Ray workers' output: %s (worker-*.out, worker-*.err)", folder)
