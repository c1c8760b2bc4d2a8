"""The stage contract, checked for every registered stage by iterating the registry.

A resources-only change (CPUs, GPUs, pool size, batch sizes, endpoint) must leave every stage's
fingerprint alone, so a re-run skips it; a change to any settings field must change that stage's
fingerprint and those of every stage downstream, so they re-run. A new stage is covered the day
it is registered: the fields come from its own `settings` and `resources` models.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ValidationError

from engine.config import JobSpec, parse_job
from engine.pipeline import JobRunner, stage_fingerprints
from engine.stages.contract import ConfigDeprecationWarning, Resources, Stage, StageSpec
from engine.stages.registry import STAGES, enabled_stages


def _job(extra_signals: list[str] | None = None, **overrides: Any) -> JobSpec:
    data: dict[str, Any] = {
        "inputs": [{"path": "data.jsonl"}],
        "signals": extra_signals or [],
        "select": {"budget": 10},
        # The reward model has no built-in: a job that enables it names one.
        "stages": {"rm": {"model": "example/reward-model"}},
    }
    data.update(overrides)
    return parse_job(data)


def _enabling(stage: Stage) -> list[str]:
    if stage.signal is None:
        return []
    return [f"{stage.signal}.alpagasus"] if stage.name == "judge" else [stage.signal]


def _job_enabling(stage: Stage) -> JobSpec:
    """A job that runs `stage` (the evaluation stages need an `eval:` block)."""
    return _job(_enabling(stage), **({"eval": {}} if stage.when is not None else {}))


def _downstream(job: JobSpec, name: str) -> list[str]:
    """`name` and every enabled stage that reads, directly or not, from it."""
    changed: list[Stage] = []
    for stage in enabled_stages(job):
        if stage.name == name or any(stage.reads_from(c) for c in changed):
            changed.append(stage)
    return [s.name for s in changed]


def _candidates(annotation: Any, current: Any) -> list[Any]:
    """Valid-looking values other than `current` for a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _candidates(args[0], current)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out: list[Any] = []
        for arg in args:
            if arg is type(None):
                if current is not None:
                    out.append(None)
            else:
                out.extend(_candidates(arg, current))
        return out
    if origin is Literal:
        return [a for a in args if a != current]
    if annotation is bool:
        return [not current]
    if annotation is int:
        return [(current or 0) + 7, 1, 64]
    if annotation is float:
        return [0.5 if current != 0.5 else 0.25, 2.0]
    if annotation is str:
        return [f"{current or ''}x", "alternative"]
    if origin is list:
        return [["en"], [1, 3]]
    return []


def _changed(model: type[BaseModel], data: dict[str, Any], name: str) -> dict[str, Any] | None:
    """`data` with field `name` set to another valid value, or None if none validates."""
    field = model.model_fields[name]
    for value in _candidates(field.annotation, data.get(name)):
        trial = {**data, name: value}
        try:
            model.model_validate(trial)
        except ValidationError:
            continue
        return trial
    return None


def _settings_fields(stage: Stage) -> list[str]:
    assert stage.spec is not None
    return sorted(
        name
        for name in stage.spec.settings_fields()
        if not isinstance(stage.spec.model_fields[name].annotation, type)
        or not issubclass(stage.spec.model_fields[name].annotation, BaseModel)
    )


def _resource_paths(model: type[Resources], prefix: tuple[str, ...] = ()) -> list[tuple]:
    paths: list[tuple] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Resources):
            paths += _resource_paths(annotation, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_resources_never_change_a_fingerprint(stage: Stage) -> None:
    job = _job_enabling(stage)
    assert stage in enabled_stages(job)
    before = stage_fingerprints(job)
    resources = stage.resources(job)
    if resources is None:
        assert stage.spec is None or "resources" not in stage.spec.model_fields
        return
    block = job.model_dump(mode="json")
    for path in _resource_paths(type(resources)):
        data = json.loads(json.dumps(block))
        target = data["stages"][stage.name]["resources"]
        model: type[BaseModel] = type(resources)
        for key in path[:-1]:
            target = target[key]
            model = model.model_fields[key].annotation  # type: ignore[assignment]
        valid = None
        for value in _candidates(model.model_fields[path[-1]].annotation, target.get(path[-1])):
            target[path[-1]] = value
            try:  # valid for the resources model and for the job (e.g. train's batch split)
                valid = JobSpec.model_validate(data)
                model.model_validate(target)
            except ValidationError:
                valid = None
                continue
            break
        assert valid is not None, f"no other valid value for resources {path}"
        after = stage_fingerprints(valid)
        assert after == before, f"{stage.name}: resources.{'.'.join(path)} changed a fingerprint"


@pytest.mark.parametrize("stage", [s for s in STAGES if s.spec is not None], ids=lambda s: s.name)
def test_every_setting_changes_its_stage_and_everything_downstream(stage: Stage) -> None:
    job = _job_enabling(stage)
    before = stage_fingerprints(job)
    order = list(before)
    spec_model = stage.spec
    assert spec_model is not None and issubclass(spec_model, StageSpec)
    checked = 0
    for name in _settings_fields(stage):
        data = job.model_dump(mode="json")
        block = data["stages"][stage.name]
        changed = _changed(spec_model, block, name)
        if changed is None:
            continue
        data["stages"][stage.name] = changed
        after = stage_fingerprints(JobSpec.model_validate(data))
        downstream = _downstream(job, stage.name)
        last = ["select", "export"] if stage.when is None else ["judge_pairwise"]
        assert downstream[-len(last) :] == last
        for other in order:
            if other in downstream:
                assert after[other] != before[other], f"{stage.name}.{name} left {other} alone"
            else:
                assert after[other] == before[other], f"{stage.name}.{name} changed {other}"
        checked += 1
    assert checked >= 1, f"{stage.name}: no settings field could be varied"


def test_stages_with_settings_elsewhere_re_run_downstream() -> None:
    """Ingest (inputs, ingest block, seed), minhash (select.dedup.near) and select."""
    base = _job(["minhash"])
    before = stage_fingerprints(base)
    cases = {
        "ingest": {"ingest": {"shard_rows": 5000}},
        "minhash": {"select": {"budget": 10, "dedup": {"near": {"threshold": 0.8}}}},
        "select": {"select": {"budget": 11}},
    }
    for name, override in cases.items():
        after = stage_fingerprints(_job(["minhash"], **override))
        downstream = _downstream(base, name)
        assert {s for s in before if after[s] != before[s]} == set(downstream), name


def test_old_resource_keys_still_read_with_a_warning() -> None:
    with pytest.warns(ConfigDeprecationWarning) as caught:
        job = _job(["lm"], stages={"lm": {"num_cpus": 0.5, "batch_size": 8, "cache": False}})
    messages = " | ".join(str(w.message) for w in caught)
    assert "stages.lm.num_cpus -> stages.lm.resources.num_cpus" in messages
    assert "stages.lm.batch_size -> stages.lm.resources.batch_size" in messages
    assert "stages.lm.cache -> stages.lm.cache.enabled" in messages
    assert job.stages.lm.resources.num_cpus == 0.5
    assert job.stages.lm.resources.batch_size == 8
    assert job.stages.lm.cache.enabled is False
    assert job.stages.rm.model is None  # stages replaced wholesale: rm is off, so no model needed
    with pytest.warns(
        ConfigDeprecationWarning, match=r"openai\.base_url -> stages\.judge\.resources"
    ):
        job = _job(
            ["judge.alpagasus"],
            stages={"judge": {"openai": {"base_url": "http://127.0.0.1:9/v1", "logprobs": False}}},
        )
    assert job.stages.judge.resources.endpoint.base_url == "http://127.0.0.1:9/v1"
    assert job.stages.judge.openai.logprobs is False


def test_shipped_job_files_use_the_new_layout(recwarn: pytest.WarningsRecorder) -> None:
    from engine.config import load_job

    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("jobs/*.yaml"), *root.glob("cluster/*.yaml")]:
        if "cluster" in path.name and "job" not in path.name:
            continue
        load_job(path)
    assert not [w for w in recwarn if "moved" in str(w.message)]


def test_unknown_resource_key_names_its_path() -> None:
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"stages\.embed\.resources\.num_cpu"):
        _job(["embed"], stages={"embed": {"resources": {"num_cpu": 2}}})


def test_registry_is_consistent() -> None:
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    core = [s.name for s in STAGES if s.when is None]
    assert core[0] == "ingest" and core[-2:] == ["select", "export"]
    # The evaluation loop runs after export, in this order.
    assert names[len(core) :] == ["train", "generate", "judge_pairwise"]
    for position, stage in enumerate(STAGES):
        # Every stage reads only what an earlier stage writes (or the inputs).
        for path in stage.reads:
            if path == "inputs":
                continue
            assert any(stage.reads_from(s) for s in STAGES[:position]), (stage.name, path)
        assert stage.engine in ("spark", "ray", "driver")
        if stage.engine == "ray":
            assert stage.spec is not None and "resources" in stage.spec.model_fields


@pytest.mark.slow
def test_real_run_skips_on_resources_and_reruns_downstream_on_settings(
    tmp_path: Path, alpaca_rows: list[dict]
) -> None:
    """A real run (Spark and Ray stages), then the executor's plan for each kind of change."""
    cache = tmp_path / "cache"
    alpaca_jsonl = tmp_path / "alpaca.jsonl"
    alpaca_jsonl.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows[:60]))

    def job(**stages: Any) -> JobSpec:
        blocks = {
            "tokens": {"resources": {"num_cpus": 0.5, "batch_size": 64}},
            "embed": {
                "resources": {"num_cpus": 0.5, "batch_size": 64},
                "cache": {"dir": str(cache)},
            },
        }
        for name, block in stages.items():
            blocks[name] = {**blocks.get(name, {}), **block}
        return parse_job(
            {
                "inputs": [{"path": str(alpaca_jsonl)}],
                "signals": ["tokens", "lang"],
                "select": {"budget": 10},
                "stages": blocks,
            }
        )

    out = tmp_path / "run"
    first = JobRunner(job(), out).execute()
    ran = [s.name for s in enabled_stages(job())]
    assert ran == ["ingest", "lang", "minhash", "tokens", "embed", "select", "export"]
    assert first.skipped_stages == []

    resources_only = job(
        tokens={"resources": {"num_cpus": 0.25, "batch_size": 7, "concurrency": 1}},
        embed={"resources": {"num_cpus": 0.25, "batch_size": 5}, "cache": {"enabled": False}},
    )
    assert not any(p.runs for p in JobRunner(resources_only, out).plan())
    again = JobRunner(resources_only, out).execute()
    assert again.skipped_stages == ran

    for name, block in {
        "lang": {"min_chars": 20},
        "tokens": {"trust_remote_code": True},
        "embed": {"text": "conversation"},
    }.items():
        changed_job = job(**{name: block})
        plan = JobRunner(changed_job, out).plan()
        # Exactly the changed stage and the stages that read from it (select, export).
        assert [p.stage.name for p in plan if p.runs] == [name, "select", "export"], name
        assert _downstream(changed_job, name) == [name, "select", "export"]

    changed = JobRunner(job(embed={"text": "conversation"}), out).execute()
    assert changed.skipped_stages == ["ingest", "lang", "minhash", "tokens"]
    assert all(p.runs for p in JobRunner(job(), out).plan(force=True))


def test_validate_prints_the_moved_keys_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    old = tmp_path / "old.yaml"
    old.write_text(
        "inputs: [{path: data.jsonl}]\nsignals: [lm]\n"
        "stages: {lm: {num_cpus: 0.5, cache_dir: /tmp/scores}}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["validate", str(old)])
    assert result.exit_code == 0, result.output
    assert "deprecated: stages.lm.num_cpus -> stages.lm.resources.num_cpus" in result.output
    assert "stages.lm.cache_dir -> stages.lm.cache.dir" in result.output
