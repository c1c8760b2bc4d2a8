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
    assert job.stages.tokens.trust_remote_code is False
    assert job.spark.master == "local[*]"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inputs": [{"path": "a"}], "selct": {}}, "selct: Extra inputs are not permitted"),
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
            {"inputs": [{"path": "a"}], "select": {"score": "tokens_chat"}},
            "select.score: unknown signal column 'tokens_chat'",
        ),
        (
            {
                "inputs": [{"path": "a"}],
                "select": {"filters": [{"reject_if": "tokens_chat > 9", "reason": "long"}]},
            },
            "select.filters[0].reject_if: unknown signal column 'tokens_chat'",
        ),
        (
            {"inputs": [{"path": "a"}], "stages": {"tokens": {"num_cpus": 0}}},
            "stages.tokens.num_cpus",
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
    assert job.signals == ["tokens"]


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


def test_budget_flag_parsing() -> None:
    assert parse_budget("500") == 500
    assert parse_budget("0.1") == 0.1
    assert parse_budget("1.0") == 1.0
    assert isinstance(parse_budget("1"), int)
