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


def test_reference_text_choices_are_byte_identical() -> None:
    """mods, superfiltering and deita texts, on records made by the real ingest conversion."""
    from engine.records import to_canonical
    from engine.signals.embed import VICUNA_V11_SYSTEM

    with_input = to_canonical(
        {"instruction": "Sum the numbers.", "input": "3, 4", "output": "7"}, "alpaca"
    ).conversation
    without = to_canonical(
        {"instruction": "Name a colour.", "input": "", "output": "Blue."}, "alpaca"
    ).conversation
    # MoDS run.py: d["instruction"] alone.
    assert record_text(with_input, "mods") == "Sum the numbers."
    assert record_text(with_input, "instruction") == "Sum the numbers.\n\n3, 4"
    # Superfiltering do_fla.py (emb_type whole): instruction + '\n' + input + '\n' + output.
    assert record_text(with_input, "superfiltering") == "Sum the numbers.\n3, 4\n7"
    assert record_text(without, "superfiltering") == "Name a colour.\n\nBlue."
    # DEITA vicuna_v1.1 (ADD_COLON_TWO): system + " ", "USER: q ", "ASSISTANT: a</s>".
    assert VICUNA_V11_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions."
    )
    assert record_text(without, "deita") == (
        f"{VICUNA_V11_SYSTEM} USER: Name a colour. ASSISTANT: Blue.</s>"
    )
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Welcome."},  # the reference drops a first non-user turn
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": ""},  # an empty message is "ROLE:" with no separator
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert record_text(multi, "deita") == (
        f"{VICUNA_V11_SYSTEM} USER: Hi? ASSISTANT:USER: Again? ASSISTANT: Hello.</s>"
    )
    assert record_text(multi, "mods") == "Hi?"
    assert record_text(multi, "superfiltering") == "Hi?\n\nWelcome."


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from engine.models import resolve_model

    return resolve_model("builtin:smollm2-135m")


def test_causal_lm_embedder_is_deitas_last_token_hidden_state(
    alpaca_rows: list[dict], smollm2_path: str
) -> None:
    """The backend, batched and padded, against DEITA's computation one text at a time: the
    tokenizer's own call, `hidden_states[-1]` at the last token, then L2-normalised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.backends import embedder
    from engine.records import to_canonical

    texts = [
        record_text(to_canonical(row, "alpaca").conversation, "deita") for row in alpaca_rows[:6]
    ]
    texts.append("")  # no token at all: still a vector
    with embedder(
        smollm2_path,
        backend="causal_lm",
        dtype="float32",
        use_gpu=False,
        num_threads=1,
        max_seq_length=None,
        batch_size=4,
        trust_remote_code=False,
    ) as model:
        got = model.embed(texts)
        assert model.max_length == 2048 and model.dim == 576
        short = type(model)(smollm2_path, dtype="float32", num_threads=1, max_seq_length=16)
        truncated = short.embed(texts[:2])
    assert got.shape == (7, 576) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    lm = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()

    def reference(text: str, max_length: int = 2048) -> np.ndarray:
        ids = tokenizer(text, return_tensors="pt", max_length=max_length, truncation=True)
        with torch.no_grad():
            hidden = lm(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
        vector = hidden.numpy().astype(np.float64)
        return vector / np.linalg.norm(vector)

    for i, text in enumerate(texts[:6]):
        assert float(got[i] @ reference(text)) > 0.9999, i
    for i, text in enumerate(texts[:2]):
        assert float(truncated[i] @ reference(text, 16)) > 0.9999, i
    assert float(truncated[0] @ got[0]) < 0.99  # truncation really changed what is embedded
    assert np.isfinite(got[6]).all()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_causal_lm_backend_through_the_stage(
    tmp_path: Path, alpaca_rows: list[dict], spark, smollm2_path: str
) -> None:
    """`backend: causal_lm` (default model: the built-in SmolLM2) on the Ray pool equals the
    backend called directly on the same DEITA texts; its fingerprint differs from MiniLM's."""
    from engine.backends.clm_embedder import CausalLMEmbedder

    rows = alpaca_rows[:10]
    job, run = _ingested_run(
        tmp_path, rows, spark, backend="causal_lm", text="deita", dtype="float32"
    )
    assert job.stages.embed.model_name() == "builtin:smollm2-135m"
    info = run_stage("embed", job, run)
    assert info["dim"] == 576 and info["rows"] == 10
    vectors = _sidecar(run)
    matrix = np.stack(vectors["embedding"].to_numpy())
    records = _records(run).loc[vectors.index]
    texts = [record_text(c, "deita") for c in records["conversation"]]
    assert all(t.endswith("</s>") for t in texts)
    with CausalLMEmbedder(smollm2_path, dtype="float32", num_threads=1) as direct:
        expected = direct.embed(texts)
    assert np.sum(matrix * expected, axis=1).min() > 0.9999
    minilm, _ = _ingested_run(tmp_path / "minilm", rows, spark, text="deita")
    from engine.stages.registry import STAGES

    stage = next(s for s in STAGES if s.name == "embed")
    assert stage.fingerprint(minilm) != stage.fingerprint(job)
