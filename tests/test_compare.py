"""`winnow compare` end to end on a tiny pool: a preset and random, each selection fine-tuned
(Ray Train, LoRA), answering the same prompts, judged against random; then a re-run of compare
that finds every step complete. (`winnow train-eval`: tests/test_training.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from engine.cli import app


def _job(tmp_path: Path, alpaca_rows: list[dict]) -> Path:
    rows = tmp_path / "alpaca.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows[:40]), encoding="utf-8")
    job = {
        "inputs": [{"path": str(rows)}],
        "seed": 0,
        "select": {"budget": 8, "dedup": {"semantic": {"enabled": False}}},
        "stages": {
            "train": {
                "max_steps": 2,
                "batch_size": 4,
                "max_length": 96,
                "eval_max_rows": 2,
                "resources": {"num_workers": 1, "cpus_per_worker": 1, "save_steps": 2},
            },
            "generate": {
                "per_set": 1,
                "max_new_tokens": 8,
                "resources": {"num_cpus": 1, "batch_size": 8, "max_batch_prompts": 8},
            },
            "judge_pairwise": {
                "scoring": "expected",
                "max_length": 1536,
                "resources": {"num_cpus": 1, "batch_size": 16, "max_batch_prompts": 8},
            },
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


@pytest.mark.slow
def test_compare_two_presets_against_random(tmp_path: Path, alpaca_rows: list[dict]) -> None:
    job = _job(tmp_path, alpaca_rows)
    out = tmp_path / "cmp"
    runner = CliRunner()
    result = runner.invoke(app, ["compare", str(job), "--presets", "longest", "--out", str(out)])
    assert result.exit_code == 0, result.output
    compare = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert compare["baseline"] == "random"
    assert set(compare["methods"]) == {"random", "longest"}
    assert compare["prompts"] == 5  # one prompt of each standard set
    longest = compare["methods"]["longest"]
    assert longest["rows"] == compare["methods"]["random"]["rows"] == 8
    rate = longest["winning_rate"]
    counts = rate["pooled"]
    assert counts["wins"] + counts["ties"] + counts["losses"] + counts["unparsed"] == 5
    assert counts["unparsed"] == 0  # expected scoring reads every judgement
    assert 0 <= counts["rate"] <= 2 and math.isfinite(counts["rate"])
    # Longest answers first: the length confound is in the table.
    assert longest["mean_answer_chars"] > compare["methods"]["random"]["mean_answer_chars"]
    overlap = compare["overlap"]
    assert overlap["longest"]["longest"] == 1.0
    assert overlap["longest"]["random"] == overlap["random"]["longest"] < 1.0
    html = (out / "compare.html").read_text(encoding="utf-8")
    assert "longest" in html and "<script" not in html.lower()
    assert "smoke test" in html  # the built-in model judged by itself
    for arm in ("random", "longest"):
        assert (out / "eval" / "models" / arm / "config.json").is_file()
        answers = out / "eval" / "answers" / f"{arm}.parquet"
        assert answers.is_file()
    assert (out / "eval" / "judgements" / "longest_vs_random.parquet").is_file()
    assert not (out / ".winnow.lock").exists()  # held while it ran, released at the end

    # Again: every scoring run and every evaluation step is found complete.
    again = runner.invoke(app, ["compare", str(job), "--presets", "longest", "--out", str(out)])
    assert again.exit_code == 0, again.output
    for step in ("train", "generate", "judge_pairwise"):
        assert f"{step}: already complete" in again.output
    assert (
        json.loads((out / "compare.json").read_text())["methods"]["longest"]["winning_rate"] == rate
    )
