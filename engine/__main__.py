"""`python -m engine ...` is `winnow ...`: the entry point a cluster job uses, where the package is
importable from the job's working directory but no console script is installed.

As a Ray Jobs driver it first moves out of Ray's copy of the working directory: Ray 2.60
re-extracts that copy (rmtree, then unzip at the same path) when the driver's own `ray.init`
starts the job's first worker on the head node, which leaves the driver in a deleted current
directory (`os.getcwd()` fails; transformers calls it on import) and, for a moment, without the
files of modules it has not imported yet. The driver re-executes itself from a private copy;
the cluster's workers keep using Ray's copy, which is whole again by the time they start.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

_COPY_ENV = "WINNOW_DRIVER_COPY"
_RAY_WORKING_DIRS = "runtime_resources/working_dir_files/"


def _in_ray_working_dir() -> bool:
    """A Ray Jobs driver started in an uploaded working directory (and not yet moved)."""
    if _COPY_ENV in os.environ or "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return False
    try:
        return _RAY_WORKING_DIRS in Path.cwd().as_posix()
    except OSError:
        return False


def _relocate() -> None:
    """Copy the working directory aside and re-execute this command there (never returns)."""
    copy = Path(tempfile.mkdtemp(prefix="winnow-driver-"))
    shutil.copytree(Path.cwd(), copy, dirs_exist_ok=True, symlinks=True)
    os.environ[_COPY_ENV] = str(copy)
    os.chdir(copy)
    os.execv(sys.executable, [sys.executable, "-m", "engine", *sys.argv[1:]])


def main() -> None:
    if _in_ray_working_dir():
        _relocate()
    copy = os.environ.get(_COPY_ENV)
    if copy and Path.cwd() == Path(copy):
        atexit.register(shutil.rmtree, copy, ignore_errors=True)
    from engine.cli import app

    app(prog_name="winnow")


if __name__ == "__main__":
    main()
