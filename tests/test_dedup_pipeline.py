"""End to end with the default duplicate removal on: MinHash on Spark, embeddings on Ray, FAISS at
selection, then diversity selectors, quotas and languages, on real rows with planted duplicates."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from engine.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("spark", "ray_local")]
runner = CliRunner()


def _near_copy(row: dict, rng: random.Random) -> dict:
    """The same row with a few words dropped and the case of one word changed."""
    words = row["output"].split()
    for _ in range(max(1, len(words) // 40)):
        if len(words) > 30:
            words.pop(rng.randrange(len(words)))
    if words:
        i = rng.randrange(len(words))
        words[i] = words[i].upper()
    return {**row, "output": " ".join(words)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list) -> tuple[Path, dict]:
    """300 real Alpaca rows with long answers, 10 near copies and 10 reworded questions."""
    rng = random.Random(7)
    rows = [r for r in alpaca_rows if len(r["output"].split()) >= 60][:300]
    near = [_near_copy(rows[i], rng) for i in range(10)]
    # The same question reworded, answered differently: MinHash over the whole conversation
    # misses these, the instruction embeddings (the default `stages.embed.text`) do not.
    semantic = [
        {
            **rows[i],
            "instruction": rows[i]["instruction"].rstrip(".?!") + ", please.",
            "output": rows[100 + i]["output"],
        }
        for i in range(20, 30)
    ]
    path = tmp_path_factory.mktemp("data") / "planted.jsonl"
    all_rows = rows + near + semantic
    path.write_text("\n".join(json.dumps(r) for r in all_rows), encoding="utf-8")
    return path, {"near": list(range(300, 310)), "semantic": list(range(310, 320))}


def _run(
    tmp: Path, path: Path, *extra: str, config: str | None = None
) -> tuple[dict, pd.DataFrame]:
    args = ["select", str(path), "--out", str(tmp / "out"), *extra]
    if config is not None:
        (tmp / "job.yaml").write_text(config, encoding="utf-8")
        args += ["--config", str(tmp / "job.yaml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    counts = manifest["counts"]
    total = counts["quarantined"] + sum(counts["rejected"].values()) + counts["selected"]
    assert total == counts["input"]
    return manifest, pd.read_parquet(tmp / "out" / "scores.parquet")


def test_default_job_removes_near_and_semantic_duplicates(tmp_path: Path, planted: tuple) -> None:
    path, where = planted
    manifest, scores = _run(tmp_path, path, "--budget", "100")
    assert manifest["skipped_stages"] == []
    assert set(manifest["signals"]) == {"minhash", "embed"}
    assert manifest["signals"]["embed"]["rows"] == manifest["ingest"]["unique"]
    assert "embedding" not in scores.columns  # vectors stay in their sidecar
    rows = scores.set_index("row")
    for planted_row, original_row in zip(where["near"], range(10), strict=True):
        pair = rows.loc[[planted_row, original_row]]
        # One of the pair is removed as the other's near duplicate (the longer answer is kept).
        assert (pair["reason"] == "near_duplicate").sum() == 1, pair[["reason", "dup_of"]]
        is_loser = pair["reason"].fillna("") == "near_duplicate"
        assert pair[is_loser].iloc[0]["dup_of"] == pair[~is_loser].iloc[0]["id"]
    semantic_hits = rows.loc[where["semantic"] + list(range(20, 30)), "reason"]
    assert (semantic_hits == "semantic_duplicate").sum() >= 8
    assert manifest["counts"]["selected"] == 100
    assert manifest["selection"]["dedup"]["removed"]["near_duplicate"] >= 10
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "near_duplicate" in page and "semantic_duplicate" in page

    # Switching duplicate removal off re-runs selection only; the sidecars are reused.
    manifest, scores = _run(tmp_path, path, "--budget", "100", "--dedup", "none")
    assert not scores["reason"].isin(["near_duplicate", "semantic_duplicate"]).any()
    assert manifest["skipped_stages"] == ["ingest"]


@pytest.mark.parametrize("preset", ["deita", "kcenter", "facility_location"])
def test_diversity_selectors_with_quotas_by_source(
    tmp_path: Path, planted: tuple, dolly_rows: list, preset: str
) -> None:
    path, _ = planted
    dolly = tmp_path / "dolly.json"
    dolly.write_text(json.dumps(dolly_rows[:120]), encoding="utf-8")
    config = (
        f"select: {{preset: {preset}, budget: 40, quota: {{by: source, mode: capped, cap: 15}}"
        + (", score: assistant_chars" if preset == "deita" else "")
        + "}\n"
    )
    (tmp_path / "job.yaml").write_text(config, encoding="utf-8")
    args = ["select", str(path), str(dolly), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--config", str(tmp_path / "job.yaml")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    per_source = scores[scores["selected"]].groupby("source").size()
    assert per_source.max() <= 15  # capped
    assert manifest["counts"]["selected"] == per_source.sum() == 30  # two sources x cap 15
    assert manifest["selection"]["selector"] == preset
    groups = manifest["selection"]["quota"]["groups"]
    assert sum(g["selected"] for g in groups.values()) == 30
