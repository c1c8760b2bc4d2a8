"""LM scoring on Ray: signals land in scores.parquet, the cache works across runs, an actor killed
mid-stage loses and duplicates nothing, and the IFD presets select by the scores."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from engine.config import parse_job
from engine.models import resolve_model
from engine.pipeline import JobRunner
from engine.records import to_canonical
from engine.signals.lm import plan_turns, record_signals

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("spark", "ray_local")]
NO_DEDUP = {"near": {"enabled": False}, "semantic": {"enabled": False}}

LM_COLUMNS = ("ifd", "ifd_ppl", "loss_cond", "loss_direct", "ppl_cond", "ppl_direct")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _job(path: Path, cache: Path, **select) -> object:
    return parse_job(
        {
            "inputs": [{"path": str(path)}],
            "signals": ["lm"],
            "select": {"budget": 10, "dedup": NO_DEDUP, **select},
            "stages": {
                "lm": {
                    "max_length": 64,
                    "resources": {"batch_size": 8, "num_cpus": 1},
                    "cache": {"dir": str(cache)},
                }
            },
        }
    )


def test_lm_signals_and_cache_across_runs(tmp_path: Path, alpaca_rows: list) -> None:
    cache = tmp_path / "cache"
    first = _write(tmp_path / "a.jsonl", alpaca_rows[:30])
    manifest = (
        JobRunner(_job(first, cache), tmp_path / "run1")
        .execute()
        .model_dump(mode="json", by_alias=True)
    )
    lm = manifest["signals"]["lm"]
    scores = pd.read_parquet(tmp_path / "run1" / "scores.parquet")
    eligible = scores[scores["reason"].isna() | (scores["reason"] == "below_budget")]
    for column in LM_COLUMNS:
        assert eligible[column].notna().all(), column
    assert (lm["cache_hits"], lm["cache_misses"]) == (0, 30)

    # The sidecar equals scoring the same rows directly (the Ray hand-off changes nothing).
    from engine.backends.transformers_lm import TransformersScorer

    model = resolve_model("builtin:smollm2-135m")
    scorer = TransformersScorer(model, dtype="auto")
    conversations = [to_canonical(r, "alpaca").conversation for r in alpaca_rows[:3]]
    plans = plan_turns(_tokenizer(model), conversations, "alpaca", 64)
    nll = scorer.token_nll([p.cond for p in plans] + [p.direct for p in plans])
    direct = record_signals(["a", "b", "c"], plans, nll[: len(plans)], nll[len(plans) :])
    got = scores.sort_values("row").head(3)
    np.testing.assert_allclose(got["ifd"], direct.column("ifd").to_pylist(), rtol=1e-4)

    # Same rows plus ten new ones, into a new run directory: only the new rows are scored.
    second = _write(tmp_path / "b.jsonl", alpaca_rows[:40])
    manifest = (
        JobRunner(_job(second, cache), tmp_path / "run2")
        .execute()
        .model_dump(mode="json", by_alias=True)
    )
    lm = manifest["signals"]["lm"]
    assert (lm["cache_hits"], lm["cache_misses"]) == (30, 10)
    again = pd.read_parquet(tmp_path / "run2" / "scores.parquet").set_index("row")
    before = scores.set_index("row")
    pd.testing.assert_series_equal(again.loc[before.index, "ifd"], before["ifd"])


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def test_ifd_preset_rejects_ifd_at_least_one_and_ranks(tmp_path: Path, alpaca_rows: list) -> None:
    path = _write(tmp_path / "a.jsonl", alpaca_rows[100:130])
    job = _job(path, tmp_path / "cache", preset="ifd")
    assert job.signals == ["lm"]
    JobRunner(job, tmp_path / "run").execute()
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert (scores.loc[scores["ifd"] >= 1, "reason"] == "ifd_not_below_1").all()
    kept = scores[scores["selected"]]
    assert (kept["ifd"] < 1).all() and len(kept) == min(10, (scores["ifd"] < 1).sum())
    losers = scores[scores["reason"] == "below_budget"]
    assert losers.empty or kept["ifd"].min() >= losers["ifd"].max()


def _kill_first_lm_actor(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first LM actor process once it has been alive for a few seconds (scoring)."""
    first_seen: dict[int, float] = {}
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "LMScoringActor" not in " ".join(proc.info["cmdline"] or []):
                continue
            pid = proc.info["pid"]
            if time.monotonic() - first_seen.setdefault(pid, time.monotonic()) > 4.0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
                return
        time.sleep(0.2)


def test_killed_actor_loses_and_duplicates_nothing(tmp_path: Path, alpaca_rows: list) -> None:
    path = _write(tmp_path / "a.jsonl", alpaca_rows[200:296])
    job = parse_job(
        {
            "inputs": [{"path": str(path)}],
            "signals": ["lm"],
            "select": {"dedup": NO_DEDUP},
            "stages": {
                "lm": {
                    "max_length": 64,
                    "resources": {"batch_size": 4},
                    "cache": {"enabled": False},
                }
            },
        }
    )
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_lm_actor, args=(stop, killed), daemon=True)
    killer.start()
    try:
        manifest = JobRunner(job, tmp_path / "run").execute().model_dump(mode="json", by_alias=True)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "no LM actor was found to kill"
    sidecar = pd.read_parquet(tmp_path / "run" / "signals" / "lm")
    assert sidecar["id"].is_unique and len(sidecar) == manifest["ingest"]["unique"]
    assert sidecar["ifd"].notna().sum() >= len(sidecar) - 2


def test_cherry_definition_end_to_end_matches_the_reference(
    tmp_path: Path, alpaca_rows: list
) -> None:
    """`definition: cherry` through a real run (Spark ingest keeps each row's input on its user
    turn, Ray scores it): the sidecar equals Cherry LLM's per-sample computation, rows with and
    without input alike, with the definition's max_length 512 and fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.support.ifd_reference import cherry_ifd

    rows = [r for r in alpaca_rows if r["input"]][:6] + [r for r in alpaca_rows if not r["input"]][
        :3
    ]
    path = _write(tmp_path / "a.jsonl", rows)
    job = parse_job(
        {
            "inputs": [{"path": str(path)}],
            "signals": ["lm"],
            "select": {"budget": 5, "dedup": NO_DEDUP},
            "stages": {
                "lm": {
                    "definition": "cherry",
                    "dtype": "float32",
                    "resources": {"batch_size": 8, "num_cpus": 1},
                    "cache": {"enabled": False},
                }
            },
        }
    )
    assert job.stages.lm.max_length == 512
    JobRunner(job, tmp_path / "run").execute()
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet").sort_values("row")
    model_path = resolve_model("builtin:smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = _tokenizer(model_path)
    for row, (_, got) in zip(rows, scores.iterrows(), strict=True):
        want = cherry_ifd(tokenizer, model, row, 512)
        assert want is not None
        for key in ("loss_cond", "loss_direct", "ifd"):
            assert abs(got[key] - want[key]) <= 1e-4 * abs(want[key]), (key, row)
