"""The evaluation loop's configuration: the `eval:` block, the train stage's batch split, the job
`winnow train-eval` builds from a finished run, and `winnow compare`'s plan (all validated before
any work starts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import ConfigError, parse_job
from engine.evaluation.compare import BASELINE, CompareError, plan_compare
from engine.evaluation.jobs import EvalJobError, eval_job_for_run
from engine.pipeline import stage_fingerprints
from engine.stages.registry import enabled_stages
from engine.stages.train import train_template


def _data(**extra: Any) -> dict[str, Any]:
    return {"inputs": [{"path": "rows.jsonl"}], "select": {"budget": 8}, **extra}


def test_eval_block_switches_the_loop_on_after_export() -> None:
    plain = parse_job(_data())
    assert [s.name for s in enabled_stages(plain)][-1] == "export"
    job = parse_job(_data(eval={}))
    names = [s.name for s in enabled_stages(job)]
    assert names[-4:] == ["export", "train", "generate", "judge_pairwise"]
    assert job.eval is not None
    assert job.eval.judged_pairs() == (("selected", "random"),)
    # The scoring stages' fingerprints do not depend on the eval block: a run re-used by
    # train-eval skips all of them.
    before, after = stage_fingerprints(plain), stage_fingerprints(job)
    assert all(after[name] == fp for name, fp in before.items())


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"arms": ["selected", "selected"]}, "eval.arms"),
        ({"arms": ["selected"], "baseline": "random"}, "eval.baseline"),
        ({"baseline": "base"}, "eval.baseline"),
        ({"arms": ["selected"], "baseline": "selected"}, "eval.arms"),
        ({"arms": ["best"]}, "eval.arms"),
    ],
)
def test_eval_block_errors_name_the_field(block: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_job(_data(eval=block))


def test_base_model_and_full_arms() -> None:
    job = parse_job(
        _data(eval={"arms": ["selected", "full"], "baseline": "full", "base_model": True})
    )
    assert job.eval is not None
    assert job.eval.answering_arms() == ("selected", "full", "base")
    assert job.eval.judged_pairs() == (("selected", "full"), ("base", "full"))


def test_train_batch_split_and_template() -> None:
    job = parse_job(
        _data(
            eval={},
            stages={"train": {"batch_size": 8, "resources": {"num_workers": 2}}},
        )
    )
    spec = job.stages.train
    assert (spec.micro_batch(), spec.gradient_accumulation()) == (4, 1)
    job = parse_job(
        _data(stages={"train": {"batch_size": 8, "resources": {"micro_batch_size": 2}}})
    )
    assert job.stages.train.gradient_accumulation() == 4
    with pytest.raises(ConfigError, match=r"stages\.train.*batch_size 6 is not a multiple"):
        parse_job(_data(stages={"train": {"batch_size": 6, "resources": {"num_workers": 4}}}))
    # The template is the LM signal's unless the train block sets one.
    assert train_template(parse_job(_data(stages={"lm": {"template": "chat"}}))) == "chat"
    job = parse_job(_data(stages={"lm": {"template": "chat"}, "train": {"template": "plain"}}))
    assert train_template(job) == "plain"


def test_train_recipe_changes_train_and_what_follows_only() -> None:
    base = stage_fingerprints(parse_job(_data(eval={})))
    changed = stage_fingerprints(parse_job(_data(eval={}, stages={"train": {"max_steps": 3}})))
    assert {n for n in base if base[n] != changed[n]} == {"train", "generate", "judge_pairwise"}
    judge = stage_fingerprints(
        parse_job(_data(eval={}, stages={"judge_pairwise": {"prompt": "fastchat"}}))
    )
    assert {n for n in base if base[n] != judge[n]} == {"judge_pairwise"}


def _finished_run(tmp_path: Path, **extra: Any) -> Path:
    """A run directory whose manifest holds the job's config (what train-eval reads)."""
    from tests.test_manifest import _manifest

    job = parse_job(_data(**extra))
    manifest = _manifest()
    manifest.config = job.model_dump(mode="json")
    run = tmp_path / "run"
    manifest.write(run / "manifest.json")
    return run


def test_train_eval_job_is_the_run_job_plus_eval(tmp_path: Path) -> None:
    run = _finished_run(tmp_path, signals=["tokens"], stages={"lm": {"template": "plain"}})
    job = eval_job_for_run(run, {"stages": {"train": {"max_steps": 2}}})
    assert job.eval is not None and job.eval.arms == ["selected", "random"]
    assert job.stages.train.max_steps == 2
    assert train_template(job) == "plain"
    assert job.out == str(run)
    original = parse_job(json.loads((run / "manifest.json").read_text())["config"])
    before, after = stage_fingerprints(original), stage_fingerprints(job)
    assert all(after[name] == fp for name, fp in before.items())  # nothing is re-scored


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"select": {"budget": 3}}, "select: an evaluation config holds"),
        ({"stages": {"lm": {"max_length": 64}}}, "stages.lm: train-eval changes only"),
        ({"eval": {"arms": ["nope"]}}, "eval.arms"),
    ],
)
def test_train_eval_refuses_what_would_re_score(tmp_path: Path, extra: dict, message: str) -> None:
    run = _finished_run(tmp_path)
    with pytest.raises((EvalJobError, ConfigError), match=message.replace(".", r"\.")):
        eval_job_for_run(run, extra)


def test_train_eval_needs_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(EvalJobError, match=r"no manifest\.json"):
        eval_job_for_run(tmp_path, {})


def test_compare_plan_adds_random_and_validates_every_preset(tmp_path: Path) -> None:
    plan = plan_compare(_data(), ["ifd", "longest", "ifd"], tmp_path / "cmp")
    assert plan.presets == (BASELINE, "ifd", "longest")
    assert {p: j.select.preset for p, j in plan.jobs.items()} == {
        "random": "random",
        "ifd": "ifd",
        "longest": "longest",
    }
    assert "lm" in plan.jobs["ifd"].signals and "lm" not in plan.jobs["longest"].signals
    assert all(j.eval is None for j in plan.jobs.values())
    assert plan.eval_job.eval is not None


@pytest.mark.parametrize(
    ("data", "presets", "message"),
    [
        (_data(), ["best"], "unknown preset"),
        (_data(), ["random"], "at least one preset"),
        (_data(select={"budget": 8, "preset": "ifd"}), ["longest"], "select.preset"),
        (_data(select={"budget": 8, "score": "ifd"}), ["longest"], "select.score"),
        ({"inputs": [{"path": "rows.jsonl"}]}, ["longest"], "select.budget"),
    ],
)
def test_compare_plan_errors(tmp_path: Path, data: dict, presets: list, message: str) -> None:
    with pytest.raises(CompareError, match=message.replace(".", r"\.")):
        plan_compare(data, presets, tmp_path)


def test_compare_plan_reports_a_bad_stage_block(tmp_path: Path) -> None:
    data = _data(stages={"generate": {"max_new_tokens": 0}})
    with pytest.raises(ConfigError, match=r"stages\.generate\.max_new_tokens"):
        plan_compare(data, ["longest"], tmp_path)
