"""Job specs are validated before any work starts, and errors name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app, parse_budget
from engine.config import ConfigError, load_job, parse_job

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_job_specs_are_valid() -> None:
    for path in sorted([*(REPO / "jobs").glob("*.yaml"), *(REPO / "cluster").glob("*.yaml")]):
        job = load_job(path)
        assert job.inputs, path


def test_defaults() -> None:
    job = parse_job({"inputs": [{"path": "x.json"}]})
    assert job.select.preset == "longest"
    assert job.select.ranking_score() == "assistant_chars"
    assert [f.reason for f in job.select.filters][:2] == ["empty_response", "refusal"]
    assert job.select.hygiene.enabled and job.select.hygiene.max_response_chars == 65_536
    assert job.stages.tokens.trust_remote_code is False
    assert job.spark.master == "local[*]"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inputs": [{"path": "a"}], "selct": {}}, "selct: Extra inputs are not permitted"),
        (
            {"inputs": [{"path": "a"}], "select": {"hygiene": {"max_respons_chars": 9}}},
            "select.hygiene.max_respons_chars: Extra inputs are not permitted",
        ),
        (
            {
                "inputs": [{"path": "a"}],
                "select": {"hygiene": {"response": {"min_compression_ratio": 2}}},
            },
            "select.hygiene.response.min_compression_ratio",
        ),
        ({"inputs": [{"path": "a", "fromat": "x"}]}, "inputs.0.fromat"),
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        ({"inputs": [{"path": "a"}], "select": {"budget": 0}}, "select.budget"),
        ({"inputs": [{"path": "a"}], "select": {"budget": 1.5}}, "select.budget"),
        ({"inputs": [{"path": "a"}], "signals": ["lm2"]}, "signals: unknown signal 'lm2'"),
        ({"inputs": [{"path": "a", "format": "csv"}]}, "inputs.0.format: unknown format 'csv'"),
        ({"inputs": [{"path": "a"}], "select": {"preset": "best"}}, "select.preset"),
        (
            {
                "inputs": [{"path": "a"}],
                "select": {"filters": [{"reject_if": "x >", "reason": "r"}]},
            },
            "select.filters.0.reject_if",
        ),
        (
            {"inputs": [{"path": "a"}], "select": {"score": "tokens_chats"}},
            "select.score: unknown signal column 'tokens_chats'",
        ),
        (
            {
                "inputs": [{"path": "a"}],
                "select": {"filters": [{"reject_if": "tokens_chat > 9", "reason": "long"}]},
            },
            "select.filters[0].reject_if: unknown signal column 'tokens_chat'",
        ),
        (
            {"inputs": [{"path": "a"}], "stages": {"tokens": {"resources": {"num_cpus": 0}}}},
            "stages.tokens.resources.num_cpus",
        ),
        (
            {
                "inputs": [{"path": "a"}],
                "select": {"filters": [{"reject_if": 'turns > "abc"', "reason": "r"}]},
            },
            "select.filters[0].reject_if: turns is compared with a number",
        ),
        (
            {
                "inputs": [{"path": "a"}],
                "select": {"filters": [{"reject_if": "refusal > 0", "reason": "r"}]},
            },
            "select.filters[0].reject_if: refusal is compared with true or false",
        ),
        (
            {
                "inputs": [{"path": "a"}],
                "select": {"filters": [{"reject_if": "turns > 9", "reason": "below_budget"}]},
            },
            "select.filters.0.reason: reason 'below_budget' is reserved",
        ),
    ],
)
def test_bad_specs_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_job(data)
    assert message in str(info.value)


def test_model_signal_columns_become_available_when_enabled() -> None:
    job = parse_job(
        {
            "inputs": [{"path": "a"}],
            "signals": ["tokens", "indicators", "tokens"],
            "select": {"score": "tokens_assistant"},
        }
    )
    # Duplicate removal is on by default and brings the signals it needs.
    assert job.signals == ["tokens", "embed", "minhash"]
    assert job.signal_stages() == ["minhash", "tokens", "embed"]


def test_presets_and_scores_switch_on_what_they_need() -> None:
    off = {"near": {"enabled": False}, "semantic": {"enabled": False}}
    job = parse_job({"inputs": [{"path": "a"}], "select": {"preset": "ifd", "dedup": off}})
    assert job.signals == ["lm"]
    job = parse_job({"inputs": [{"path": "a"}], "select": {"preset": "alpagasus", "dedup": off}})
    assert job.signals == ["judge.alpagasus"]
    assert job.signal_stages() == ["judge"]
    job = parse_job({"inputs": [{"path": "a"}], "select": {"preset": "deita", "dedup": off}})
    assert job.signals == ["judge.deita_quality", "judge.deita_complexity", "embed"]
    assert job.select.selector() == "deita"
    # A score the user names brings its signal; kcenter needs only embeddings.
    job = parse_job(
        {"inputs": [{"path": "a"}], "select": {"preset": "deita", "score": "ifd", "dedup": off}}
    )
    assert job.signals == ["lm", "embed"]
    job = parse_job({"inputs": [{"path": "a"}], "select": {"preset": "kcenter", "dedup": off}})
    assert job.signals == ["embed"] and job.select.ranking_score() is None
    quota = {"by": "lang", "mode": "min_share", "min_share": 0.1}
    job = parse_job({"inputs": [{"path": "a"}], "select": {"quota": quota, "dedup": off}})
    assert job.signals == ["lang"]


@pytest.mark.parametrize(
    ("select", "message"),
    [
        ({"quota": {"by": "lang", "mode": "capped"}}, "select.quota: mode capped needs cap"),
        ({"quota": {"by": "lang", "mode": "min_share"}}, "needs min_share"),
        ({"quota": {"by": "shard"}}, "select.quota.by"),
        ({"dedup": {"near": {"num_perm": 100, "bands": 16}}}, "bands (16) must divide"),
        ({"dedup": {"semantic": {"threshold": 1.5}}}, "select.dedup.semantic.threshold"),
        ({"dedup": {"keep_by": "nothing"}}, "select.dedup.keep_by: unknown signal column"),
        ({"normalize": {"columns": ["lang"]}}, "select.normalize.columns[0]"),
        ({"normalize": {"columns": ["ifd"]}}, "select.normalize.columns[0]"),
        ({"languages": {"allow": ["English"]}}, "select.languages.allow.0"),
        ({"filters": [{"reject_if": "lang > 3", "reason": "x"}]}, "lang is not a number"),
    ],
)
def test_selection_settings_are_checked(select: dict, message: str) -> None:
    data = {"inputs": [{"path": "a"}], "signals": ["lang"], "select": select}
    with pytest.raises(ConfigError) as info:
        parse_job(data)
    assert message in str(info.value)


def test_judge_signals_and_custom_judges() -> None:
    custom = {"helpful": {"template": "Rate {instruction} / {response}", "scale": [1, 10]}}
    job = parse_job(
        {
            "inputs": [{"path": "a"}],
            "signals": ["judge.helpful", "judge.alpagasus"],
            "stages": {"judge": {"custom": custom}},
            "select": {"score": "judge_helpful", "dedup": {"semantic": {"enabled": False}}},
        }
    )
    assert job.signal_stages() == ["minhash", "judge"]
    with pytest.raises(ConfigError, match=r"unknown signal 'judge\.nope'"):
        parse_job({"inputs": [{"path": "a"}], "signals": ["judge.nope"]})
    with pytest.raises(ConfigError, match=r"must contain \{response\}"):
        parse_job(
            {
                "inputs": [{"path": "a"}],
                "stages": {"judge": {"custom": {"x": {"template": "{instruction}"}}}},
            }
        )
    with pytest.raises(ConfigError, match="shadow a built-in judge"):
        parse_job(
            {
                "inputs": [{"path": "a"}],
                "stages": {
                    "judge": {"custom": {"alpagasus": {"template": "{instruction}{response}"}}}
                },
            }
        )


def test_validate_command(tmp_path: Path) -> None:
    good = _spec(tmp_path, "inputs: [{path: data.json}]\nselect: {budget: 0.2}\n")
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output

    bad = _spec(tmp_path, "inputs: [{path: data.json}]\nselect: {budget: -3, prest: x}\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "select.budget" in result.output and "select.prest" in result.output

    not_yaml = _spec(tmp_path, "inputs: [\n")
    result = runner.invoke(app, ["validate", str(not_yaml)])
    assert result.exit_code == 2 and "invalid YAML" in result.output


def test_select_flags_are_validated_before_work(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["select", "missing.json", "--out", str(tmp_path / "o"), "--signals", "nope"]
    )
    assert result.exit_code == 2 and "unknown signal 'nope'" in result.output
    assert not (tmp_path / "o").exists()
    result = runner.invoke(app, ["select", "missing.json", "--dedup", "near,fuzzy"])
    assert result.exit_code == 2 and "--dedup: unknown kind ['fuzzy']" in result.output


def test_budget_flag_parsing() -> None:
    assert parse_budget("500") == 500
    assert parse_budget("0.1") == 0.1
    assert parse_budget("1.0") == 1.0
    assert isinstance(parse_budget("1"), int)
