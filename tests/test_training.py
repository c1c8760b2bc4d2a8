"""The train stage end to end on a real local Ray: Ray Train workers running the HF Trainer
with LoRA on the built-in SmolLM2-135M, the merged model folder, loss curves, skip on re-run,
data-parallel workers, and resume after a SIGKILL of the whole training process group."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from engine.config import parse_job
from engine.evaluation.arms import arm_rows
from engine.runtime.rundir import RunDir
from tests.support.stages import run_stage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NO_DEDUP = {"near": {"enabled": False}, "semantic": {"enabled": False}}
RECIPE = {
    "max_steps": 3,
    "batch_size": 4,
    "max_length": 128,
    "learning_rate": 1e-3,
    "eval_fraction": 0.25,
    "eval_steps": 3,
    "resources": {"save_steps": 3},
}


def _job(data: Path, **extra: Any) -> Any:
    return parse_job(
        {
            "inputs": [{"path": str(data)}],
            "select": {"preset": "random", "budget": 12, "dedup": NO_DEDUP},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def selected_run(
    tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict], spark: Any, ray_local: Any
) -> tuple[Path, Path]:
    """A real tiny winnow run (40 rows, no signals, 12 selected) to train from."""
    from rich.console import Console

    from engine.pipeline import JobRunner

    folder = tmp_path_factory.mktemp("train-run")
    data = folder / "alpaca40.json"
    data.write_text(json.dumps(alpaca_rows[:40]), encoding="utf-8")
    out = folder / "out"
    JobRunner(_job(data), out, console=Console(file=open(os.devnull, "w"))).execute()  # noqa: SIM115
    return data, out


def _weights(folder: str, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as handle:
        return handle.get_tensor(name)


def test_stage_trains_each_arm_merges_and_skips_on_rerun(
    selected_run: tuple[Path, Path], ray_local: Any
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.models import resolve_model

    data, out = selected_run
    # One trained arm (test_compare.py trains two through `winnow compare`); both arms' rows.
    job = _job(
        data,
        eval={"arms": ["selected"], "base_model": True, "baseline": "base"},
        stages={"train": RECIPE},
    )
    run = RunDir(out)
    scores = pd.read_parquet(run.scores)
    for arm, column in (("selected", "selected"), ("random", "random_baseline")):
        rows = arm_rows(run, arm)
        assert [i for i, _ in rows] == sorted(scores.loc[scores[column], "id"])
    info = run_stage("train", job, run)
    assert set(info["arms"]) == {"selected"}
    assert not (run.evaluation / "train" / "random").exists()

    base = resolve_model("builtin:smollm2-135m")
    name = "model.layers.0.self_attn.q_proj.weight"
    for arm in ("selected",):
        loss = json.loads((run.evaluation / "train" / arm / "loss.json").read_text())
        assert loss["arm"] == arm and loss["steps"] == 3 and loss["rows"] == 12
        assert loss["train_rows"] == 9 and loss["eval_rows"] == 3
        assert [step for step, _ in loss["train"]] == [1, 2, 3]
        assert [step for step, _ in loss["eval"]] == [3]
        assert all(math.isfinite(v) and v > 0 for _, v in loss["train"] + loss["eval"])
        assert loss["resumed_from_step"] is None and loss["dtype"] == "float32"
        summary = info["arms"][arm]
        assert summary["final_train_loss"] == loss["train"][-1][1]
        assert summary["skipped"] is False
        model_dir = Path(summary["model_dir"])
        assert model_dir == run.evaluation / "models" / arm
        stamp = json.loads((model_dir / "winnow_train.json").read_text())
        assert stamp["arm"] == arm
        # The merged LoRA changed the adapted projections; untouched weights stay the base's.
        assert not torch.equal(_weights(str(model_dir), name), _weights(base, name))
        mlp = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(_weights(str(model_dir), mlp), _weights(base, mlp))
    assert not list(run.evaluation.joinpath("models").glob(".*"))  # no staging folder left

    # The `full` arm is the pool both were drawn from: the selection's eligible rows.
    full = {i for i, _ in arm_rows(run, "full")}
    manifest = json.loads(run.manifest.read_text())
    assert len(full) == manifest["selection"]["eligible"] > 12
    assert full >= set(scores.loc[scores["selected"] | scores["random_baseline"], "id"])

    # The merged folder is a plain model: transformers loads it without peft and generates.
    tokenizer = AutoTokenizer.from_pretrained(info["arms"]["selected"]["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(info["arms"]["selected"]["model_dir"])
    assert not hasattr(model, "peft_config")
    prompt = tokenizer("### Instruction:\nName a colour.\n\n### Response:\n", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    # A re-run with the same recipe and rows keeps both models and does not train again.
    model_file = run.evaluation / "models" / "selected" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    again = run_stage("train", job, run)
    assert again["arms"]["selected"]["skipped"]
    assert (
        again["arms"]["selected"]["final_eval_loss"] == info["arms"]["selected"]["final_eval_loss"]
    )
    assert model_file.stat().st_mtime_ns == before


def test_train_eval_runs_the_loop_on_a_finished_run(
    selected_run: tuple[Path, Path], ray_local: Any
) -> None:
    """`winnow train-eval RUN` on the run trained above: every scoring stage and `train` (same
    recipe, same rows) are found complete; generate and judge_pairwise run; the manifest and
    the report carry the evaluation."""
    import yaml
    from typer.testing import CliRunner

    from engine.cli import app

    _, out = selected_run
    config = out.parent / "eval.yaml"
    stages = {
        "train": RECIPE,
        "generate": {"per_set": 1, "max_new_tokens": 8, "resources": {"batch_size": 8}},
        "judge_pairwise": {"scoring": "expected", "max_length": 1536},
    }
    # The arm trained above, judged against the untrained base model.
    evaluation = {"arms": ["selected"], "base_model": True, "baseline": "base"}
    config.write_text(yaml.safe_dump({"eval": evaluation, "stages": stages}), encoding="utf-8")
    result = CliRunner().invoke(app, ["train-eval", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["evaluation"]) == {"train", "generate", "judge_pairwise"}
    assert {"ingest", "select", "export"} <= set(manifest["skipped_stages"])
    arms = manifest["evaluation"]["train"]["arms"]
    assert set(arms) == {"selected"} and arms["selected"]["skipped"]
    assert "generate" not in manifest["skipped_stages"]
    results = json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    pooled = results["pairs"]["selected_vs_base"]["pooled"]
    assert pooled["wins"] + pooled["ties"] + pooled["losses"] == 5 and pooled["unparsed"] == 0
    report = (out / "report.html").read_text(encoding="utf-8")
    assert '<section id="evaluation">' in report and "smoke test" in report


RESUME_SCRIPT = """
import json, sys
from pathlib import Path
from engine.config import RaySpec
from engine.runtime.ray_cluster import ensure_ray
from engine.stages.train import TrainSpec
from engine.evaluation.training import train_arms

out = Path(sys.argv[1])
rows = [tuple(r) for r in json.loads((out.parent / "rows.json").read_text())]
ensure_ray(RaySpec(num_cpus=2), logs=out / "logs")
spec = TrainSpec.model_validate(json.loads((out.parent / "spec.json").read_text()))
result = train_arms({"ddp": rows}, spec, template="alpaca", seed=7, fingerprint="resume-test",
                    out=out, log=print, progress=lambda d, n: (lambda k: None))
print("RESULT " + json.dumps(result["ddp"]))
"""


def _last_checkpoint_step(run_folder: Path) -> int:
    steps = [
        json.loads(path.read_text())["global_step"]
        for path in run_folder.glob("checkpoint_*/checkpoint/trainer_state.json")
    ]
    return max(steps)


def test_two_workers_keep_the_global_batch_and_a_killed_training_resumes(
    tmp_path: Path, alpaca_rows: list[dict]
) -> None:
    """Two gloo workers (0.5 CPU each) train 16 rows; the run is killed with SIGKILL (its whole
    process group: driver, Ray and the workers) once a checkpoint is registered, and the same
    command then finishes the run from that checkpoint with the same total steps."""
    from engine.records import to_canonical

    canonical = [to_canonical(row, "alpaca") for row in alpaca_rows[100:116]]
    (tmp_path / "rows.json").write_text(json.dumps([[c.id, c.conversation] for c in canonical]))
    spec = {
        **RECIPE,
        "max_steps": 4,
        "eval_steps": 4,
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5, "save_steps": 2},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "eval"
    command = [sys.executable, str(script), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    snapshot = out / "train" / "ddp" / "run" / "checkpoint_manager_snapshot.json"

    first = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not snapshot.is_file():
        assert first.poll() is None, "the training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "models" / "ddp").exists()
    killed_at = _last_checkpoint_step(out / "train" / "ddp" / "run")
    assert 0 < killed_at < 4

    second = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.split("RESULT ", 1)[1])
    assert result["resumed_from_step"] == killed_at
    assert result["steps"] == 4
    # The curve holds every step: those before the kill come from the checkpoint's state.
    assert [step for step, _ in result["train"]] == [1, 2, 3, 4]
    # Global batch 4 = 2 workers x micro-batch 2: 12 training rows make 3 steps an epoch, so 4
    # steps are 4/3 epochs (workers that each read every row would have done 2/3).
    assert result["train_rows"] == 12
    assert result["epochs"] == pytest.approx(4 * 4 / result["train_examples"])
    assert (Path(result["model_dir"]) / "winnow_train.json").is_file()

    # Killed after the last checkpoint, before the merge: the next run takes that checkpoint
    # as it is (HF's loop would train a fifth step, as a CI run of the fault chain once did).
    assert _last_checkpoint_step(out / "train" / "ddp" / "run") == 4
    shutil.rmtree(out / "models" / "ddp")
    (out / "train" / "ddp" / "loss.json").unlink()
    third = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert third.returncode == 0, third.stderr[-3000:]
    again = json.loads(third.stdout.split("RESULT ", 1)[1])
    assert again["resumed_from_step"] == 4 and again["steps"] == 4
    assert again["train"] == result["train"] and again["eval"] == result["eval"]
    assert (Path(again["model_dir"]) / "winnow_train.json").is_file()
