"""The job `winnow train-eval RUN_DIR` runs: the run's own job (from its manifest) plus an
`eval:` block, so every scoring stage is found complete and skipped and only the evaluation
stages run (their fingerprints chain on the run's export, as in one `winnow run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import JobSpec, parse_job
from engine.manifest import Manifest

# The blocks an evaluation config may set: changing anything else would re-score the run.
EVAL_STAGE_BLOCKS = ("train", "generate", "judge_pairwise")


class EvalJobError(ValueError):
    """A run directory or evaluation config that train-eval cannot use."""


def eval_job_for_run(run_dir: str | Path, extra: dict[str, Any]) -> JobSpec:
    """The run's job with `extra`'s `eval:` block (default `{}`: selected vs random) and its
    `stages.train|generate|judge_pairwise` blocks; any other key is refused by name."""
    manifest_path = Path(run_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise EvalJobError(f"{run_dir}: no manifest.json; run `winnow run` or `select` first")
    if not isinstance(extra, dict):
        raise EvalJobError("the evaluation config is a mapping with `eval:` and `stages:`")
    unknown = sorted(set(extra) - {"eval", "stages"})
    if unknown:
        raise EvalJobError(
            f"{unknown[0]}: an evaluation config holds `eval:` and `stages:` "
            f"({', '.join(EVAL_STAGE_BLOCKS)}) only; change the run's own job to re-score"
        )
    stages = extra.get("stages") or {}
    if not isinstance(stages, dict):
        raise EvalJobError("stages: a mapping of stage blocks")
    other = sorted(set(stages) - set(EVAL_STAGE_BLOCKS))
    if other:
        raise EvalJobError(
            f"stages.{other[0]}: train-eval changes only {', '.join(EVAL_STAGE_BLOCKS)}"
        )
    data = Manifest.read(manifest_path).config
    data["stages"] = {**(data.get("stages") or {}), **stages}
    data["eval"] = extra.get("eval") or {}
    data["out"] = str(Path(run_dir))
    return parse_job(data)
