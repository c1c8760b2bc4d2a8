"""Generate stage: each trained arm's greedy answers to the evaluation prompts (Ray Data actors).

Runs only when the job has an `eval:` block. The prompts are the five standard sets of the
data-selection literature (Vicuna, Koala, WizardLM, Self-Instruct, LIMA; 1,030 prompts) unless
`prompts` names other JSONL files; every arm is prompted with the template it was trained with
(engine.stages.train.train_template), greedy, up to `max_new_tokens`. The work is in
engine.evaluation.generation; answers land in `eval/answers/<arm>.parquet`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from engine.stages.contract import ActorResources, Settings, Stage, StageContext, StageSpec
from engine.stages.train import has_eval, train_template

if TYPE_CHECKING:
    from engine.config import JobSpec


class GenerateSettings(Settings):
    prompts: list[str] | None = Field(
        default=None,
        description="JSONL files (or folders of them) of evaluation prompts; null = the five "
        "standard sets ($WINNOW_EVAL_SETS, else shared/data/eval beside the checkout)",
    )
    per_set: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="the first N prompts of each set (smoke runs); null = all"
    )
    backend: Literal["transformers", "vllm"] = "transformers"
    max_new_tokens: Annotated[int, Field(ge=1)] = 256
    max_length: Annotated[int, Field(ge=16)] = Field(
        default=1024, description="prompt tokens; a longer prompt gets an empty answer"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


class GenerateResources(ActorResources):
    batch_size: Annotated[int, Field(ge=1)] = 64
    max_batch_prompts: Annotated[int, Field(ge=1)] = Field(
        default=16, description="transformers: prompts per forward pass"
    )
    enforce_eager: bool = Field(default=True, description="vLLM: skip graph compilation")


class GenerateSpec(GenerateSettings, StageSpec):
    stage_name = "generate"
    resources: GenerateResources = Field(default_factory=GenerateResources)


def generate_settings(job: JobSpec) -> dict[str, Any]:
    """The generation settings, the template the arms are prompted with, and whether the
    untrained base model answers too."""
    return {
        **job.stages.generate.settings(),
        "template": train_template(job),
        "arms": list(job.eval.answering_arms()) if job.eval else [],
    }


def run_generate(ctx: StageContext) -> dict[str, Any]:
    from engine.evaluation.generation import run_generate_stage

    return run_generate_stage(ctx)


STAGE = Stage(
    name="generate",
    version=1,
    engine="ray",
    reads=("eval/models",),
    writes=("eval/answers",),
    run=run_generate,
    spec=GenerateSpec,
    settings_of=generate_settings,
    when=has_eval,
    description="each arm's greedy answers to the evaluation prompts (Ray Data actor pool)",
)
