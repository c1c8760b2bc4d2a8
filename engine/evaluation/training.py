"""Fine-tune one base model on each evaluation arm with one recipe (Ray Train + HF Trainer).

Per arm, under an `eval/` folder `out`:
  train/<arm>/data/{train,eval}.parquet  the tokenised arm (engine.evaluation.sft), written by
      the driver and read by every worker inside the training function (not a Ray Dataset: on
      a 2-CPU machine two 1-CPU workers would starve Ray Data's read tasks)
  train/<arm>/run/     Ray Train's storage for the run named <arm>: its checkpoints (every
      `resources.save_steps` steps and at the end) and the checkpoint manager's snapshot
  train/<arm>/hf/      each worker's Hugging Face output folder (scratch; removed when done)
  train/<arm>/loss.json, models/<arm>/ (merged model + winnow_train.json): see design notes
      in engine.stages.train.

Resume: Ray Train 2.60 (v2) restores a run from the snapshot `checkpoint_manager_snapshot.json`
in `<storage_path>/<name>/` when a trainer is built with the same `RunConfig(name,
storage_path)` (ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py,
`_maybe_load_state_from_storage`); inside the workers `ray.train.get_checkpoint()` then returns
the latest reported checkpoint, and the HF Trainer continues from it
(`trainer.train(resume_from_checkpoint=...)`: weights, optimizer, scheduler, RNG and data
position), so a killed training finishes with the same number of steps. A run folder left by a
different recipe or different rows (`train/<arm>/winnow_run.json`) is wiped first, so nothing
resumes across recipes.

Completion: `models/<arm>/` is written to a temporary folder beside it and renamed into place
with its `winnow_train.json` (fingerprint, rows hash) inside, so a half-saved model is never
taken as done; an arm whose folder carries the same fingerprint and rows hash (and whose
loss.json exists) is not retrained.

Global batch: `spec.batch_size` examples per optimizer step = micro-batch x workers x
gradient-accumulation steps (the spec's validator guarantees the split). HF averages the loss
over the label tokens of all devices (`average_tokens_across_devices`), so the update does not
depend on how the batch is split.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.evaluation.sft import Conversation, encode_rows, rows_sha, split_rows
from engine.runtime.rundir import write_json_atomic

if TYPE_CHECKING:
    from engine.stages.contract import StageContext
    from engine.stages.train import TrainSpec

Log = Callable[[str], None]
Progress = Callable[[str, int | None], Callable[[int], None]]
Rows = Sequence[tuple[str, Conversation]]

MODEL_STAMP = "winnow_train.json"
RUN_STAMP = "winnow_run.json"
RUN_NAME = "run"  # Ray Train's run name under train/<arm>/ (RunConfig(name, storage_path))
PROGRESS_FILE = "progress.json"  # rank 0's latest optimizer step, for the driver's bar


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def model_complete(model_dir: Path, fingerprint: str, sha: str) -> bool:
    """A merged model folder that was saved whole for this recipe and these rows."""
    stamp = model_dir / MODEL_STAMP
    if not stamp.is_file():
        return False
    data = json.loads(stamp.read_text(encoding="utf-8"))
    return data.get("fingerprint") == fingerprint and data.get("rows_sha") == sha


def total_steps(spec: TrainSpec, train_examples: int) -> int:
    """Optimizer steps: `max_steps`, else `epochs` passes over the training examples."""
    if spec.max_steps is not None:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * math.ceil(train_examples / spec.batch_size)))


def _write_examples(path: Path, examples: Sequence[Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.runtime.rundir import atomic_path

    table = pa.table(
        {
            "input_ids": pa.array([e.input_ids for e in examples], pa.list_(pa.int32())),
            "labels": pa.array([e.labels for e in examples], pa.list_(pa.int32())),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _prepare_run_folder(train_dir: Path, fingerprint: str, sha: str) -> None:
    """Keep a run folder only if it belongs to this recipe and these rows (so a resume never
    continues another recipe's checkpoint)."""
    stamp = train_dir / RUN_STAMP
    wanted = {"fingerprint": fingerprint, "rows_sha": sha}
    if train_dir.exists():
        try:
            same = json.loads(stamp.read_text(encoding="utf-8")) == wanted
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, wanted)


def _curve(history: Sequence[Mapping[str, Any]], key: str) -> list[list[float]]:
    """[[step, value], ...] from an HF log history, one point per step (the last wins)."""
    points: dict[int, float] = {}
    for entry in history:
        if key in entry and "step" in entry:
            points[int(entry["step"])] = float(entry[key])
    return [[step, points[step]] for step in sorted(points)]


def _save_merged(
    checkpoint_dir: Path,
    base_model: str,
    spec: TrainSpec,
    dtype: str,
    model_dir: Path,
    stamp: dict[str, str],
) -> None:
    """Merge the LoRA adapter (or take the full weights) and save model + tokenizer as a plain
    folder, atomically: a temporary folder beside `model_dir`, renamed into place."""
    from transformers.utils import logging as hf_logging

    # The console shows the stage's bar only: no loading/writing bars from transformers.
    was_disabled = not hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        _merge_and_save(checkpoint_dir, base_model, spec, dtype, model_dir, stamp)
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def _merge_and_save(
    checkpoint_dir: Path,
    base_model: str,
    spec: TrainSpec,
    dtype: str,
    model_dir: Path,
    stamp: dict[str, str],
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = spec.trust_remote_code
    if spec.method == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            base_model, dtype=torch.float32, trust_remote_code=trust
        )
        model = PeftModel.from_pretrained(base, str(checkpoint_dir)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint_dir), dtype=torch.float32, trust_remote_code=trust
        )
    model = model.to(getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".{model_dir.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / MODEL_STAMP, stamp)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_arms(
    arms: Mapping[str, Rows],
    spec: TrainSpec,
    *,
    template: str,
    seed: int,
    fingerprint: str,
    out: Path,
    log: Log,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Fine-tune `spec.base_model` on each arm's rows; per arm its loss.json content plus
    `model_dir` (and `skipped: true` when an earlier run had already trained it). Writes
    out/train/<arm>/ and out/models/<arm>/. Ray must be initialised."""
    from transformers import AutoTokenizer

    from engine.models import resolve_model

    out = Path(out).resolve()  # Ray Train wants an absolute storage path
    base_model = resolve_model(spec.base_model, spec.revision)
    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=spec.trust_remote_code)
    results = {}
    for arm, rows in arms.items():
        results[arm] = _train_arm(
            arm, rows, spec, tokenizer, base_model, template, seed, fingerprint, out, log, progress
        )
    return results


def _train_arm(
    arm: str,
    rows: Rows,
    spec: TrainSpec,
    tokenizer: Any,
    base_model: str,
    template: str,
    seed: int,
    fingerprint: str,
    out: Path,
    log: Log,
    progress: Progress,
) -> dict[str, Any]:
    sha = rows_sha(rows)
    train_dir, model_dir = out / "train" / arm, out / "models" / arm
    loss_path = train_dir / "loss.json"
    if model_complete(model_dir, fingerprint, sha) and loss_path.is_file():
        log(f"train: arm {arm} already trained with this recipe and rows; kept {model_dir}")
        done = json.loads(loss_path.read_text(encoding="utf-8"))
        return {**done, "model_dir": str(model_dir), "skipped": True}
    if not rows:
        raise ValueError(f"train: arm {arm} has no rows")
    started = time.perf_counter()
    _prepare_run_folder(train_dir, fingerprint, sha)

    ids = [row_id for row_id, _ in rows]
    train_pos, eval_pos = split_rows(ids, spec.eval_fraction, spec.eval_max_rows, seed)
    conversations = [conversation for _, conversation in rows]
    train_set = encode_rows(
        tokenizer, [conversations[i] for i in train_pos], template, spec.max_length
    )
    eval_set = encode_rows(
        tokenizer, [conversations[i] for i in eval_pos], template, spec.max_length
    )
    if not train_set.examples:
        raise ValueError(
            f"train: arm {arm} has no training example left (every row lacks a scorable "
            "assistant turn, or max_length cuts every answer away)"
        )
    data = train_dir / "data"
    _write_examples(data / "train.parquet", train_set.examples)
    _write_examples(data / "eval.parquet", eval_set.examples)
    steps = total_steps(spec, len(train_set.examples))
    log(
        f"train: arm {arm}: {len(rows)} rows ({len(train_pos)} train, {len(eval_pos)} eval), "
        f"{len(train_set.examples)} examples, {steps} steps of {spec.batch_size}"
    )
    advance = progress(f"train {arm}", steps)
    with _StepWatch(train_dir / PROGRESS_FILE, advance, steps):
        metrics = _fit(
            arm=arm,
            spec=spec,
            base_model=base_model,
            seed=seed,
            steps=steps,
            train_dir=train_dir,
            has_eval=bool(eval_set.examples),
        )
    history = metrics["log_history"]
    checkpoint = metrics["checkpoint_dir"]
    _save_merged(
        Path(checkpoint),
        base_model,
        spec,
        metrics["dtype"],
        model_dir,
        {"fingerprint": fingerprint, "rows_sha": sha, "arm": arm},
    )
    result = {
        "arm": arm,
        "train": _curve(history, "loss"),
        "eval": _curve(history, "eval_loss"),
        "steps": int(metrics["global_step"]),
        "rows": len(rows),
        "train_rows": len(train_pos),
        "eval_rows": len(eval_pos),
        "train_examples": len(train_set.examples),
        "eval_examples": len(eval_set.examples),
        "dropped_rows": train_set.dropped + eval_set.dropped,
        "truncated_examples": train_set.truncated + eval_set.truncated,
        "dtype": metrics["dtype"],
        "epochs": metrics["epoch"],
        "seconds": round(time.perf_counter() - started, 3),
        "resumed_from_step": metrics["resumed_from_step"],
    }
    write_json_atomic(loss_path, result)
    shutil.rmtree(train_dir / "hf", ignore_errors=True)
    return {**result, "model_dir": str(model_dir)}


class _StepWatch:
    """Advances the stage's bar by optimizer steps while the workers train: rank 0 writes its
    global step to `progress.json` after every step (`_StepFile`), a driver thread reads it.
    A resumed run starts from its checkpoint's step; the bar ends at `steps` either way."""

    def __init__(self, path: Path, advance: Callable[[int], None], steps: int) -> None:
        import threading

        self.path, self.advance, self.steps = path, advance, steps
        self.shown = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="train-steps")
        path.unlink(missing_ok=True)

    def _update(self) -> None:
        try:
            step = int(json.loads(self.path.read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        step = min(step, self.steps)
        if step > self.shown:
            self.advance(step - self.shown)
            self.shown = step

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._update()

    def __enter__(self) -> _StepWatch:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None and self.shown < self.steps:
            self.advance(self.steps - self.shown)


def _fit(
    *,
    arm: str,
    spec: TrainSpec,
    base_model: str,
    seed: int,
    steps: int,
    train_dir: Path,
    has_eval: bool,
) -> dict[str, Any]:
    """One Ray Train run (name RUN_NAME, storage train/<arm>/): resumes from the run's last
    checkpoint when the folder holds one. Returns rank 0's return value (log history, steps,
    resumed_from_step, dtype) plus the path of the last checkpoint."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = spec.resources
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(res.start_timeout_s)
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    config = {
        "arm": arm,
        "model": base_model,
        "method": spec.method,
        "lora": spec.lora.model_dump(mode="json"),
        "trust_remote_code": spec.trust_remote_code,
        "train_file": str(train_dir / "data" / "train.parquet"),
        "eval_file": str(train_dir / "data" / "eval.parquet") if has_eval else None,
        "work_dir": str(train_dir / "hf"),
        "progress_file": str(train_dir / PROGRESS_FILE),
        "steps": steps,
        "micro_batch": spec.micro_batch(),
        "accumulation": spec.gradient_accumulation(),
        "learning_rate": spec.learning_rate,
        "lr_scheduler": spec.lr_scheduler,
        "warmup_steps": round(spec.warmup_ratio * steps),
        "weight_decay": spec.weight_decay,
        "eval_steps": spec.eval_steps or max(1, steps // 5),
        "save_steps": res.save_steps,
        "seed": seed,
        "dtype": spec.dtype,
        "num_threads": res.num_threads or max(1, int(res.cpus_per_worker)),
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(train_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train: arm {arm} finished without a checkpoint")
    # The run's storage is this machine's disk (a run directory), so the path is local.
    hf_checkpoint = Path(result.checkpoint.path) / "checkpoint"
    return {**result.return_value, "checkpoint_dir": str(hf_checkpoint)}


def run_train_stage(ctx: StageContext) -> dict[str, Any]:
    """The `train` stage: every trained arm of the job's `eval:` block, from this run's
    selection, into `eval/train/` and `eval/models/`."""
    from engine.evaluation.arms import arm_rows
    from engine.stages.train import recipe_fingerprint, train_template

    job = ctx.job
    spec = ctx.spec
    if job.eval is None:
        return {"arms": {}}
    arms = {arm: arm_rows(ctx.run, arm) for arm in job.eval.trained_arms()}
    seed = spec.seed if spec.seed is not None else job.seed
    with ctx.phase("train"):
        results = train_arms(
            arms,
            spec,
            template=train_template(job),
            seed=seed,
            fingerprint=recipe_fingerprint(job),
            out=ctx.run.evaluation,
            log=ctx.log,
            progress=ctx.progress,
        )
    return {"arms": {arm: summary(info) for arm, info in results.items()}}


def summary(info: Mapping[str, Any]) -> dict[str, Any]:
    """An arm's line in the stage info / manifest: sizes, time, final losses, where the model is."""

    def last(curve: Sequence[Sequence[float]]) -> float | None:
        return curve[-1][1] if curve else None

    return {
        "rows": info["rows"],
        "train_rows": info["train_rows"],
        "eval_rows": info["eval_rows"],
        "steps": info["steps"],
        "seconds": info["seconds"],
        "final_train_loss": last(info["train"]),
        "final_eval_loss": last(info["eval"]),
        "resumed_from_step": info["resumed_from_step"],
        "skipped": bool(info.get("skipped", False)),
        "model_dir": info["model_dir"],
    }


# ---------------------------------------------------------------------------------------------
# Worker side (runs inside each Ray Train worker)
# ---------------------------------------------------------------------------------------------


def _read_examples(path: str) -> list[dict[str, list[int]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [
        {"input_ids": i, "labels": lab}
        for i, lab in zip(table["input_ids"].to_pylist(), table["labels"].to_pylist(), strict=True)
    ]


def _worker_dtype(requested: str) -> str:
    """auto: bf16 on a GPU that supports it, else fp32 (CPU training runs in fp32)."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _step_file(path: str) -> Any:
    """A TrainerCallback that writes the global step to `path` after every optimizer step
    (atomically: the driver never reads half a file)."""
    from transformers import TrainerCallback

    class StepFile(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            write_json_atomic(Path(path), {"step": int(state.global_step)})

    return StepFile()


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The training function of every Ray Train worker: HF Trainer (+ LoRA), checkpoints
    reported to Ray Train by RayTrainReportCallback, resumed from `ray.train.get_checkpoint()`.
    Every worker reports equally often (once per save, through the callback), as Ray Train
    requires."""
    import functools

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from engine.evaluation.sft import collate

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(int(config["num_threads"]))
    rank = ray.train.get_context().get_world_rank()
    dtype = _worker_dtype(config["dtype"])
    train_set = _read_examples(config["train_file"])
    eval_set = _read_examples(config["eval_file"]) if config["eval_file"] else None

    # fp32 master weights; bf16 runs under autocast (args.bf16), which trains stably.
    model = AutoModelForCausalLM.from_pretrained(
        config["model"], dtype=torch.float32, trust_remote_code=config["trust_remote_code"]
    )
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    if config["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                target_modules=lora["target_modules"],
                task_type="CAUSAL_LM",
            ),
        )
    args = TrainingArguments(
        # One folder per rank: each rank's RayTrainReportCallback then uploads only its own
        # files (rank 0 the weights and optimizer, the others their RNG state).
        output_dir=os.path.join(config["work_dir"], f"rank{rank}"),
        per_device_train_batch_size=config["micro_batch"],
        per_device_eval_batch_size=config["micro_batch"],
        gradient_accumulation_steps=config["accumulation"],
        max_steps=config["steps"],
        learning_rate=config["learning_rate"],
        lr_scheduler_type=config["lr_scheduler"],
        warmup_steps=config["warmup_steps"],
        weight_decay=config["weight_decay"],
        logging_steps=1,
        eval_strategy="steps" if eval_set else "no",
        eval_steps=config["eval_steps"],
        save_strategy="steps",
        save_steps=config["save_steps"],
        save_total_limit=1,
        seed=config["seed"],
        data_seed=config["seed"],
        bf16=dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # LoRA freezes most parameters
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=functools.partial(collate, pad=int(pad)),
        callbacks=[
            RayTrainReportCallback(),
            *([_step_file(config["progress_file"])] if rank == 0 else []),
        ],
    )
    trainer = prepare_trainer(trainer)
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            hf_checkpoint = os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME)
            state_file = os.path.join(hf_checkpoint, "trainer_state.json")
            with open(state_file, encoding="utf-8") as f:
                resumed_from = int(json.load(f)["global_step"])
            if resumed_from >= config["steps"]:
                # Killed after the last checkpoint, before the driver finished. HF's loop
                # checks max_steps only after a step, so resuming here would train one step
                # more than asked (measured: 3 of max_steps 2): take the checkpoint as is.
                from transformers import TrainerState

                trainer._load_from_checkpoint(hf_checkpoint)
                trainer.state = TrainerState.load_from_json(state_file)
            else:
                trainer.train(resume_from_checkpoint=hf_checkpoint)
    else:
        trainer.train()
    state = trainer.state
    evaluated = any(
        "eval_loss" in e and e.get("step") == state.global_step for e in state.log_history
    )
    if eval_set and not evaluated:
        trainer.evaluate()  # the curve always ends at the last step
    # Returned, not reported: Ray Train hands rank 0's return value to the driver
    # (Result.return_value), while Result.metrics holds the last *checkpoint's* metrics.
    return {
        "log_history": list(state.log_history),
        "global_step": int(state.global_step),
        "epoch": float(state.epoch or 0.0),
        "resumed_from_step": resumed_from,
        "dtype": dtype,
    }
