"""Embeddings on a real Ray actor pool with the built-in MiniLM: unit vectors, equal to a direct
sentence-transformers encode, cached across runs, and the `text` option picks what is embedded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.config import parse_job
from engine.models import resolve_embedding_model
from engine.runtime.rundir import RunDir
from engine.signals.embed import record_text
from tests.support.stages import run_stage

ROWS = 60


def _ingested_run(
    tmp_path: Path, rows: list[dict], spark, cache_dir: str | None = None, **embed
) -> tuple[object, RunDir]:
    """A run directory holding `records/` from the real ingest stage, plus the job to embed it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    job = parse_job(
        {
            "inputs": [{"path": str(path)}],
            "signals": ["embed"],
            "stages": {
                "embed": {
                    "resources": {"batch_size": 16, "num_cpus": 1},
                    "cache": {"dir": cache_dir},
                    **embed,
                }
            },
        }
    )
    run = RunDir(tmp_path / "run")
    run_stage("ingest", job, run, spark)
    return job, run


def _sidecar(run: RunDir) -> pd.DataFrame:
    return pd.read_parquet(run.signal("embed")).set_index("id")


def _records(run: RunDir) -> pd.DataFrame:
    records = pd.read_parquet(run.records, columns=["id", "dup_of", "conversation"])
    return records[records["dup_of"].isna()].set_index("id")


def test_record_text_choices() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Hello again."},
    ]
    assert record_text(conversation, "instruction") == "Hi?"
    assert record_text(conversation, "response") == "Hello."
    assert record_text(conversation, "conversation") == (
        "system: Be brief.\nuser: Hi?\nassistant: Hello.\nuser: Again?\nassistant: Hello again."
    )
    assert record_text(conversation[:2], "response") == ""
    with pytest.raises(ValueError, match="unknown text choice"):
        record_text(conversation, "title")


def test_resolve_embedding_model(tmp_path: Path) -> None:
    builtin = Path(resolve_embedding_model("builtin:all-minilm-l6-v2", None))
    assert builtin.name == "model" and (builtin / "modules.json").is_file()
    assert resolve_embedding_model(str(tmp_path), "ignored") == str(tmp_path)  # local path as is
    with pytest.raises(ValueError, match="unknown built-in embedding model"):
        resolve_embedding_model("builtin:nope", None)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_embeddings_match_direct_encode_and_cache(
    tmp_path: Path, alpaca_rows: list[dict], spark
) -> None:
    from sentence_transformers import SentenceTransformer

    rows = [*alpaca_rows[:ROWS], {"instruction": "Say nothing at all.", "input": "", "output": ""}]
    cache = tmp_path / "cache"
    job, run = _ingested_run(tmp_path / "a", rows, spark, cache_dir=str(cache), text="response")
    info = run_stage("embed", job, run)
    assert (info["rows"], info["cache_hits"], info["cache_misses"]) == (ROWS + 1, 0, ROWS + 1)
    assert info["dim"] == 384
    vectors = _sidecar(run)
    matrix = np.stack(vectors["embedding"].to_numpy())
    assert matrix.shape == (ROWS + 1, 384) and matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)

    # The Ray hand-off changes nothing: same vectors as encoding the same texts directly.
    records = _records(run).loc[vectors.index]
    texts = [record_text(c, "response") for c in records["conversation"]]
    assert "" in texts  # the row without a response still got a vector
    model = SentenceTransformer(resolve_embedding_model("builtin:all-minilm-l6-v2", None))
    direct = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    cosines = np.sum(matrix * direct, axis=1)
    assert cosines.min() > 0.9999, cosines.min()

    # A second run over the same rows reads the cache and scores nothing.
    job2, run2 = _ingested_run(tmp_path / "b", rows, spark, cache_dir=str(cache), text="response")
    again = run_stage("embed", job2, run2)
    assert (again["cache_hits"], again["cache_misses"]) == (ROWS + 1, 0)
    assert again["fingerprint"] == info["fingerprint"]
    cached = np.stack(_sidecar(run2).loc[vectors.index, "embedding"].to_numpy())
    np.testing.assert_array_equal(cached, matrix)

    # Another text choice is another fingerprint and other vectors (instruction != response).
    job3, run3 = _ingested_run(
        tmp_path / "c", rows, spark, cache_dir=str(cache), text="instruction"
    )
    other = run_stage("embed", job3, run3)
    assert other["fingerprint"] != info["fingerprint"] and other["cache_misses"] == ROWS + 1
    instruction = np.stack(_sidecar(run3).loc[vectors.index, "embedding"].to_numpy())
    assert np.median(np.sum(instruction * matrix, axis=1)) < 0.95
    texts = [record_text(c, "instruction") for c in records["conversation"]]
    direct = model.encode(texts[:5], normalize_embeddings=True, convert_to_numpy=True)
    assert np.sum(instruction[:5] * direct, axis=1).min() > 0.9999
