"""Train stage: fine-tune one base model on each evaluation arm with one recipe (Ray Train).

Runs only when the job has an `eval:` block. Each arm (`selected`, `random`, optionally `full`)
gets the same base model, template, seed and recipe, so the arms differ only in their rows.
The work is in engine.evaluation.training: a `TorchTrainer` whose workers run the Hugging Face
`Trainer` (LoRA through peft by default), checkpoints under `eval/train/<arm>/`, resume from the
last one, and the merged model saved as a plain folder under `eval/models/<arm>/`.

Settings change the trained weights; resources (workers, CPUs/GPUs per worker, micro-batch,
checkpoint frequency) do not: `batch_size` is the global batch per optimizer step, and the
gradient-accumulation steps follow from it, the workers and the micro-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from engine.runtime.rundir import fingerprint
from engine.stages.contract import Resources, Settings, Stage, StageContext, StageSpec, Strict

if TYPE_CHECKING:
    from engine.config import JobSpec

Dtype = Literal["auto", "float32", "bfloat16"]


class LoraSettings(Strict):
    """LoRA (peft): the adapter is merged into the base weights after training."""

    r: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names (Llama-style by default) or all-linear",
    )


class TrainSettings(Settings):
    """One recipe for every arm."""

    base_model: str = "builtin:smollm2-135m"
    revision: str | None = None
    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    template: Literal["alpaca", "plain", "chat"] | None = Field(
        default=None,
        description="prompt template for training and generation; null = stages.lm.template "
        "(the LM signal's)",
    )
    max_length: Annotated[int, Field(ge=16)] = Field(
        default=512, description="tokens per training sequence (longer rows are truncated)"
    )
    seed: int | None = Field(default=None, description="null = the job's seed")
    max_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="optimizer steps; when set, epochs does not apply"
    )
    epochs: Annotated[float, Field(gt=0)] = 3.0
    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    batch_size: Annotated[int, Field(ge=1)] = Field(
        default=8, description="rows per optimizer step, over all workers"
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.1, description="rows of each arm held out for its eval loss"
    )
    eval_max_rows: Annotated[int, Field(ge=0)] = 64
    eval_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="eval loss every N steps; null = about 5 times per run"
    )
    dtype: Dtype = Field(
        default="auto", description="auto: bf16 on a GPU that supports it, else fp32"
    )
    trust_remote_code: bool = False


class TrainResources(Resources):
    """How the fine-tune is placed (never what it computes)."""

    num_workers: Annotated[int, Field(ge=1)] = Field(
        default=1, description="Ray Train workers (data parallel: gloo on CPU, NCCL on GPUs)"
    )
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0
    micro_batch_size: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="rows per worker per forward pass; null = batch_size / num_workers",
    )
    num_threads: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="torch threads per worker; null = cpus_per_worker"
    )
    save_steps: Annotated[int, Field(ge=1)] = Field(
        default=50, description="checkpoint every N steps (a killed training resumes there)"
    )
    start_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=600.0, description="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (busy machines)"
    )


class TrainSpec(TrainSettings, StageSpec):
    stage_name = "train"
    resources: TrainResources = Field(default_factory=TrainResources)

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainSpec:
        res = self.resources
        micro = res.micro_batch_size or max(1, self.batch_size // res.num_workers)
        if self.batch_size % (micro * res.num_workers):
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of "
                f"resources.num_workers {res.num_workers} x micro_batch_size {micro}: the "
                "global batch must split evenly into gradient-accumulation steps"
            )
        return self

    def gradient_accumulation(self) -> int:
        res = self.resources
        micro = res.micro_batch_size or max(1, self.batch_size // res.num_workers)
        return self.batch_size // (micro * res.num_workers)

    def micro_batch(self) -> int:
        res = self.resources
        return res.micro_batch_size or max(1, self.batch_size // res.num_workers)


def has_eval(job: JobSpec) -> bool:
    return job.eval is not None


def train_template(job: JobSpec) -> str:
    """The template the arms are trained and prompted with: the LM signal's unless set."""
    return job.stages.train.template or job.stages.lm.template


def train_settings(job: JobSpec) -> dict[str, Any]:
    """Everything that changes the trained weights: the recipe (with the template and seed it
    resolves to) and the arms."""
    block = job.stages.train
    return {
        **block.settings(),
        "resolved_template": train_template(job),
        "resolved_seed": block.seed if block.seed is not None else job.seed,
        "arms": list(job.eval.trained_arms()) if job.eval else [],
    }


def recipe_fingerprint(job: JobSpec) -> str:
    """What changes a trained arm besides its rows (which `winnow_train.json` hashes apart): the
    recipe and the base model, not the list of arms, so adding `full` retrains nothing else."""
    settings = {k: v for k, v in train_settings(job).items() if k != "arms"}
    return fingerprint("train-recipe", STAGE.version, STAGE.model_identity(job), settings)


def run_train(ctx: StageContext) -> dict[str, Any]:
    from engine.evaluation.training import run_train_stage

    return run_train_stage(ctx)


STAGE = Stage(
    name="train",
    version=1,
    engine="ray",
    reads=("selected.jsonl", "random_baseline.jsonl", "scores.parquet", "records"),
    writes=("eval/models",),
    run=run_train,
    spec=TrainSpec,
    settings_of=train_settings,
    model_of=lambda block: block.base_model,
    when=has_eval,
    description="fine-tune the base model on each evaluation arm (Ray Train, LoRA by default)",
)
