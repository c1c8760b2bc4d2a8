"""Connect to Ray: a local Ray by default, a cluster address by config."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import RaySpec


def ensure_ray(spec: RaySpec) -> None:
    """Initialise Ray once per process; later calls reuse the running instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
    if spec.address is not None:
        ray.init(address=spec.address, **kwargs)
    else:
        ray.init(num_cpus=spec.num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
