"""Answers of each evaluation arm to the evaluation prompts: a Ray Data actor pool per arm.

Every arm (a model folder: a trained arm's merged model, or the untrained base model) answers
the same prompts with the same settings: greedy decoding, up to `max_new_tokens`, through the
generator backend the spec names (engine.backends.generator: transformers or vLLM). The prompt is
rendered with the template the arms were trained with (`render`): `chat` hands the backend the
user message (the tokenizer's chat template applies), `alpaca` and `plain` hand it the text
engine.signals.lm.render_prompt builds for training as a `RawPrompt` (no chat template, no
special tokens: tokenised exactly as engine.evaluation.sft tokenises the training prompts).

The prompts go to one Parquet input (longest first, so a Ray batch holds prompts of similar
length and little padding), stream through the arm's actor pool
(engine.stages.actor_scoring.stream_actor_pool: placement check, repartition so every actor
gets work) and come back keyed by their row, so `answers/<arm>.parquet` holds one row per
prompt in the prompts' order, the same in every arm. An arm's file carries a key of its model,
prompts, template and settings in its Parquet metadata: a re-run (a killed stage, `winnow
compare` sharing an arm) keeps a file whose key matches instead of generating again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.evaluation.eval_sets import EvalPrompt, load_eval_prompts
from engine.runtime.rundir import RunDir, atomic_path, fingerprint

if TYPE_CHECKING:
    from engine.backends.base import Prompt
    from engine.stages.contract import StageContext
    from engine.stages.generate import GenerateSpec

ANSWER_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("set", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("answer_tokens", pa.int64()),
    ]
)
# What the actors return: the input row each answer belongs to.
_REPLY_SCHEMA = pa.schema(
    [("row", pa.int64()), ("answer", pa.string()), ("answer_tokens", pa.int64())]
)
KEY_METADATA = b"winnow_answers_key"
TEMPLATES = ("alpaca", "plain", "chat")

Log = Callable[[str], None]
Progress = Callable[[str, int | None], Callable[[int], None]]


def render(text: str, template: str) -> Prompt:
    """The prompt an arm trained with `template` is asked: the chat messages for `chat`, else
    the training template's text before the answer as a `RawPrompt`."""
    from engine.backends.base import RawPrompt
    from engine.signals.lm import render_prompt

    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    messages = [{"role": "user", "content": text}]
    if template == "chat":
        return messages
    # alpaca / plain never touch the tokenizer. No special tokens: engine.evaluation.sft
    # tokenises the training prompts without them (as engine.signals.lm does), so a tokenizer
    # that adds a BOS (Llama, Mistral) must not add one here either.
    text = render_prompt(None, messages, template)  # type: ignore[arg-type]
    return RawPrompt(text, special_tokens=False)


class GenerationActor:
    """One generator backend per actor: batches of (row, prompt) in, (row, answer, tokens) out."""

    def __init__(self, model_path: str, template: str, backend: dict[str, Any]) -> None:
        from engine.backends import generator

        self.template = template
        self.generator = generator(model_path=model_path, **backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = [render(text, self.template) for text in batch["prompt"].to_pylist()]
        replies = self.generator.generate_counted(prompts)
        return pa.table(
            {
                "row": batch["row"],
                "answer": [text for text, _ in replies],
                "answer_tokens": [count for _, count in replies],
            },
            schema=_REPLY_SCHEMA,
        )

    def __del__(self) -> None:
        # vLLM leaves shared memory behind unless its engine is shut down (backend close)
        backend = getattr(self, "generator", None)
        if backend is not None:
            backend.close()


def backend_args(spec: GenerateSpec) -> dict[str, Any]:
    """What engine.backends.generator needs besides the model (threads: the CPUs an actor holds;
    Ray sets one thread per actor otherwise, and more than the cores is far slower here)."""
    res = spec.resources
    return {
        "backend": spec.backend,
        "dtype": spec.dtype,
        "max_length": spec.max_length,
        "max_new_tokens": spec.max_new_tokens,
        "max_batch_prompts": res.max_batch_prompts,
        "trust_remote_code": spec.trust_remote_code,
        "enforce_eager": res.enforce_eager,
        "num_threads": res.threads(),
        "use_gpu": res.num_gpus > 0,
    }


def model_identity(model_path: str) -> Any:
    """What names a model folder's weights in an answers key: a trained arm's training record
    (`winnow_train.json`: fingerprint and rows hash), else the folder and its weight files' sizes
    and times (a hub name: itself)."""
    folder = Path(model_path)
    record = folder / "winnow_train.json"
    if record.is_file():
        data = json.loads(record.read_text(encoding="utf-8"))
        return {"trained": {k: data.get(k) for k in ("fingerprint", "rows_sha", "arm")}}
    if not folder.is_dir():
        return model_path
    weights = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin", ".json")
    )
    return {"folder": str(folder.resolve()), "files": weights}


def answers_key(
    model_path: str, prompts: Sequence[EvalPrompt], spec: GenerateSpec, template: str
) -> str:
    """Everything an arm's answers depend on (resources do not change greedy answers)."""
    settings = {k: getattr(spec, k) for k in ("backend", "max_new_tokens", "max_length", "dtype")}
    listed = [[p.set, p.prompt_id, p.text] for p in prompts]
    return fingerprint("answers", model_identity(model_path), template, settings, listed)


def _input_table(prompts: Sequence[EvalPrompt]) -> pa.Table:
    """(row, prompt), longest prompt first: similar lengths share a Ray batch (less padding,
    and the slow rows start early)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].text))
    return pa.table(
        {
            "row": pa.array(order, pa.int64()),
            "prompt": pa.array([prompts[i].text for i in order], pa.string()),
        }
    )


def _complete(path: Path, key: str, rows: int) -> bool:
    """An answers file written for this key with every prompt."""
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
        return meta.get(KEY_METADATA) == key.encode() and pq.read_metadata(path).num_rows == rows
    except (OSError, pa.ArrowInvalid):
        return False


def _collect(folder: Path, prompts: Sequence[EvalPrompt], key: str) -> pa.Table:
    """The actors' replies in prompt order, checked: every row answered exactly once."""
    files = sorted(folder.glob("*.parquet"))
    replies = (
        pa.concat_tables([pq.read_table(f) for f in files])
        if files
        else _REPLY_SCHEMA.empty_table()
    )
    rows = replies["row"].to_pylist()
    if sorted(rows) != list(range(len(prompts))):
        raise RuntimeError(
            f"generate: {len(prompts)} prompts but {len(rows)} answers "
            f"({len(set(rows))} distinct): answers were lost or given twice"
        )
    position = {row: k for k, row in enumerate(rows)}
    replies = replies.take(pa.array([position[i] for i in range(len(prompts))], pa.int64()))
    table = pa.table(
        {
            "prompt_id": [p.prompt_id for p in prompts],
            "set": [p.set for p in prompts],
            "prompt": [p.text for p in prompts],
            "answer": replies["answer"],
            "answer_tokens": replies["answer_tokens"],
        },
        schema=ANSWER_SCHEMA,
    )
    return table.replace_schema_metadata({KEY_METADATA: key.encode()})


def answer_info(table: pa.Table, seconds: float) -> dict[str, Any]:
    """An arm's figures for the manifest: prompts, mean answer tokens, empty answers, speed."""
    tokens = table["answer_tokens"].to_pylist()
    answers = table["answer"].to_pylist()
    total = sum(tokens)
    return {
        "prompts": len(tokens),
        "answer_tokens": total,
        "mean_answer_tokens": round(total / len(tokens), 2) if tokens else 0.0,
        "empty_answers": sum(not a.strip() for a in answers),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }


def generate_answers(
    models: Mapping[str, str],
    prompts: Sequence[EvalPrompt],
    spec: GenerateSpec,
    *,
    template: str,
    out: Path,
    log: Log,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Each arm's (arm -> model folder) greedy answers to `prompts`, written to
    `out/<arm>.parquet` (ANSWER_SCHEMA, the prompts' order); per arm its `answer_info` plus the
    model and whether the file was reused. Ray must be running (the executor starts it)."""
    from engine.stages.actor_scoring import ActorPool, stream_actor_pool

    if not prompts:
        raise ValueError("generate: no evaluation prompts")
    ids = Counter((p.set, p.prompt_id) for p in prompts)
    twice = [f"{s}/{i}" for (s, i), n in ids.items() if n > 1]
    if twice:
        raise ValueError(f"generate: prompt ids given twice: {', '.join(twice[:5])}")
    render(prompts[0].text, template)  # an unknown template fails here, not in an actor
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    source = RunDir.reset_dir(work / "input")
    pq.write_table(_input_table(prompts), source / "input.parquet")
    results: dict[str, dict[str, Any]] = {}
    try:
        for arm, model_path in models.items():
            target = out / f"{arm}.parquet"
            key = answers_key(model_path, prompts, spec, template)
            advance = progress(f"generate {arm}", len(prompts))
            if _complete(target, key, len(prompts)):
                advance(len(prompts))
                info = answer_info(pq.read_table(target), 0.0)
                results[arm] = {**info, "seconds": None, "model": model_path, "reused": True}
                log(f"generate: {arm}: answers up to date ({target})")
                continue
            pool = ActorPool(
                name="generate",
                actor_cls=GenerationActor,
                constructor_kwargs={
                    "model_path": model_path,
                    "template": template,
                    "backend": backend_args(spec),
                },
                resources=spec.resources,
                parts={},
            )
            replies = RunDir.reset_dir(work / arm)
            started = time.perf_counter()
            stream_actor_pool(pool, source, replies, len(prompts), advance)
            seconds = time.perf_counter() - started
            table = _collect(replies, prompts, key)
            with atomic_path(target) as tmp:
                pq.write_table(table, tmp)
            info = answer_info(table, seconds)
            results[arm] = {**info, "model": model_path, "reused": False}
            log(
                f"generate: {arm}: {info['prompts']} prompts, mean {info['mean_answer_tokens']} "
                f"answer tokens, {info['empty_answers']} empty, {seconds:.1f} s "
                f"({info['tokens_per_s']} tokens/s)"
            )
    finally:
        RunDir.remove(work)
    return results


def arm_models(ctx: StageContext) -> dict[str, str]:
    """Each answering arm's model folder: `eval/models/<arm>` (the train stage's), and for
    `base` the train stage's base model, resolved as it was trained from."""
    from engine.models import resolve_model

    job = ctx.job
    if job.eval is None:
        raise ValueError("generate: the job has no eval: block")
    train = job.stages.train
    models: dict[str, str] = {}
    for arm in job.eval.answering_arms():
        if arm == "base":
            models[arm] = resolve_model(train.base_model, train.revision)
            continue
        folder = ctx.run.evaluation / "models" / arm
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"generate: no trained model for arm {arm!r} at {folder}: the train stage "
                "writes it (run the whole job, or `winnow train-eval`)"
            )
        models[arm] = str(folder)
    return models


def run_generate_stage(ctx: StageContext) -> dict[str, Any]:
    """The generate stage: the arms' models from the run, the spec's prompts, the run's
    template; writes `eval/answers/`. Returns the manifest's facts."""
    from engine.stages.train import train_template

    spec: GenerateSpec = ctx.spec
    template = train_template(ctx.job)
    models = arm_models(ctx)
    with ctx.phase("prompts"):
        prompts = load_eval_prompts(spec.prompts, spec.per_set)
    sets = Counter(p.set for p in prompts)
    ctx.log(
        f"generate: {len(prompts)} prompts ({', '.join(f'{s} {n}' for s, n in sets.items())}), "
        f"arms {', '.join(models)}, template {template}, {spec.backend}"
    )
    with ctx.phase("generate"):
        arms = generate_answers(
            models,
            prompts,
            spec,
            template=template,
            out=ctx.run.evaluation / "answers",
            log=ctx.log,
            progress=ctx.progress,
        )
    return {
        "template": template,
        "backend": spec.backend,
        "max_new_tokens": spec.max_new_tokens,
        "prompts": len(prompts),
        "sets": dict(sets),
        "arms": arms,
    }
