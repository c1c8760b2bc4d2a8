"""Pairwise judge stage: each evaluation prompt's two answers judged in both orders.

Runs only when the job has an `eval:` block. Every arm other than the baseline is compared with
the baseline (`eval.baseline`, `random` by default): for each prompt the judge sees the two
answers once in each order. `prompt: cherry` is the review prompt of the Cherry LLM /
AlpaGasus evaluation (two 1-10 scores on the first line); `fastchat` is FastChat's pairwise
verdict prompt ([[A]], [[B]], [[C]]). Corpus and answer text is fenced like the rating judges'
unless `fenced: false` (the papers' exact prompt). Each judgement is cached by (question, first
answer, second answer, judge fingerprint); an unreadable verdict is counted as unparsed, never
as a tie. The work is in engine.evaluation.pairwise; results land in `eval/judgements/` and
`eval/results.json` (winning rate per set and pooled, its bootstrap interval, FastChat's and
AlpacaEval's rates beside it).

`scoring: parse` (the default) is the papers' method: the judge writes its reply and the first
line is parsed. `scoring: expected` is Winnow's extension for small local judges that never
write a parseable first line (the built-in 135M model does not): with the `cherry` prompt, each
of the two scores is the probability-weighted mean of the values 1-10 under the judge's
next-token distribution, Assistant 1's at the first reply position, Assistant 2's after Assistant
1's most likely score and a space (engine.evaluation.pairwise, `expected_scale_score`). It needs
the judge's tokenizer (backend transformers or vllm, not openai) and a prompt whose scores lead
the reply (cherry, not fastchat, whose verdict follows an explanation). The scores are
continuous, so the winning rate's tie rule (equal scores in an order) almost never fires: a
smoke-test device for small judges, not the papers' measurement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from engine.stages.contract import (
    ActorResources,
    CacheSpec,
    Settings,
    Stage,
    StageContext,
    StageSpec,
)
from engine.stages.judge import EndpointResources, OpenAISettings
from engine.stages.train import has_eval

if TYPE_CHECKING:
    from engine.config import JobSpec


class PairwiseJudgeSettings(Settings):
    model: str = "builtin:smollm2-135m"
    revision: str | None = None
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    prompt: Literal["cherry", "fastchat"] = Field(
        default="cherry",
        description="cherry: Cherry LLM / AlpaGasus review prompt (two scores 1-10); "
        "fastchat: FastChat's pairwise verdict prompt ([[A]]/[[B]]/[[C]])",
    )
    fenced: bool = Field(
        default=True,
        description="fence the question and answers as data (false: the paper's exact prompt)",
    )
    scoring: Literal["parse", "expected"] = Field(
        default="parse",
        description="parse: generate the review and parse its first line (the papers); "
        "expected: the two cherry scores as expected values over the judge's next-token "
        "distributions (Winnow's extension for small local judges; transformers or vllm)",
    )
    max_new_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="null: 32 for cherry (scores on the first line), 512 fastchat"
    )
    max_length: Annotated[int, Field(ge=64)] = 4096
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 2000
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    trust_remote_code: bool = False
    openai: OpenAISettings = Field(default_factory=OpenAISettings)

    @model_validator(mode="after")
    def _expected_needs_scores_first_and_a_tokenizer(self) -> PairwiseJudgeSettings:
        if self.scoring != "expected":
            return self
        if self.prompt == "fastchat":
            raise ValueError(
                "stages.judge_pairwise.scoring: expected reads the two scores that open the "
                "cherry prompt's reply; fastchat's verdict ([[A]]/[[B]]/[[C]]) comes after an "
                "explanation the judge must write first: use prompt: cherry, or scoring: parse"
            )
        if self.backend == "openai":
            raise ValueError(
                "stages.judge_pairwise.scoring: expected feeds the judge raw token prefixes "
                "through its own tokenizer; the openai backend speaks chat: use backend "
                "transformers or vllm, or scoring: parse"
            )
        return self


class PairwiseJudgeResources(ActorResources):
    batch_size: Annotated[int, Field(ge=1)] = 32
    max_batch_prompts: Annotated[int, Field(ge=1)] = Field(
        default=8, description="transformers: prompts per forward pass"
    )
    enforce_eager: bool = Field(default=True, description="vLLM: skip graph compilation")
    endpoint: EndpointResources = Field(default_factory=EndpointResources)


class PairwiseJudgeSpec(PairwiseJudgeSettings, StageSpec):
    stage_name = "judge_pairwise"
    resources: PairwiseJudgeResources = Field(default_factory=PairwiseJudgeResources)
    cache: CacheSpec = Field(default_factory=CacheSpec)


def pairwise_settings(job: JobSpec) -> dict[str, Any]:
    return {
        **job.stages.judge_pairwise.settings(),
        "pairs": [list(p) for p in job.eval.judged_pairs()] if job.eval else [],
    }


def run_judge_pairwise(ctx: StageContext) -> dict[str, Any]:
    from engine.evaluation.pairwise import run_judge_pairwise_stage

    return run_judge_pairwise_stage(ctx)


STAGE = Stage(
    name="judge_pairwise",
    version=1,
    engine="ray",
    reads=("eval/answers",),
    writes=("eval/results.json",),
    run=run_judge_pairwise,
    spec=PairwiseJudgeSpec,
    settings_of=pairwise_settings,
    model_of=lambda block: block.model,
    when=has_eval,
    description="each prompt's answers judged in both orders; winning rates per set and pooled",
)
