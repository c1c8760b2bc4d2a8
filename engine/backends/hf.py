"""Shared Hugging Face (transformers / torch) loading for every transformers-based backend.

Device: CUDA only when the caller asks for it (`use_gpu`, i.e. the stage's `num_gpus > 0`) AND
torch sees a GPU; otherwise the CPU, even on a machine with GPUs (a CPU-only actor must not take
a GPU it was not given). dtype: "auto" is bfloat16 where the hardware computes it natively (CUDA
with bf16, else float16 on CUDA; a CPU with AVX512-BF16 or AMX), else float32 (emulated bf16 on
an AVX2 CPU is several times slower than float32).

`TransformersBackend` is the base of the backends that hold a CausalLM (the scorer, the judge and
the generator): it loads the model that way and frees it on `close()`.

Also here: the left-padded batches with explicit position ids and the greedy decoding loop that
the transformers judge and generator share (a padded prompt gets the same positions as alone, so
batched results equal unbatched ones up to float rounding).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from engine.backends.base import Closable

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX), not by emulation."""
    try:
        import torch.cpu

        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_device(use_gpu: bool) -> Any:
    """`torch.device("cuda")` when `use_gpu` and torch sees a GPU, else the CPU."""
    import torch

    if use_gpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("a GPU was asked for but torch sees none: running on the CPU")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: Any) -> Any:
    """The torch dtype for a backend `dtype` setting; "auto" picks bfloat16 where it is native
    (CUDA with bf16, or a CPU with AVX512-BF16/AMX), else float32 (float16 on a CUDA GPU
    without bf16)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return getattr(torch, dtype)


def set_threads(num_threads: int | None) -> None:
    """Size torch's intra-op thread pool to the cores the actor holds (None: leave it):
    over-subscription is the big slowdown on small machines."""
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_causal_lm(path: str, dtype: Any, device: Any, trust_remote_code: bool = False) -> Any:
    """A CausalLM in `dtype` (a torch dtype, see `resolve_dtype`) on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def free_memory(device: Any = None) -> None:
    """After dropping a model: collect it, and give its CUDA memory back to the driver."""
    gc.collect()
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.empty_cache()


class TransformersBackend(Closable):
    """Base of the backends that hold a transformers CausalLM: `_load_model` sizes torch's
    threads, picks the device and dtype and loads the model (`self.device`, `self.dtype`,
    `self.model`); `_release` drops the attributes named in `_held` and frees their memory."""

    _held: tuple[str, ...] = ("model",)

    def _load_model(
        self,
        model_path: str,
        dtype: str,
        use_gpu: bool,
        num_threads: int | None,
        trust_remote_code: bool,
    ) -> None:
        set_threads(num_threads)
        self.device = resolve_device(use_gpu)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_causal_lm(model_path, self.dtype, self.device, trust_remote_code)

    def _release(self) -> None:
        for attr in self._held:
            if hasattr(self, attr):
                delattr(self, attr)
        free_memory(getattr(self, "device", None))


# ---- batched chat prompts ------------------------------------------------------------------


def pad_token_id(tokenizer: Any) -> int:
    """The id left-padding uses: the tokenizer's pad token, else its EOS, else 0 (masked out
    either way)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def left_padded(sequences: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    """(input ids, attention mask, position ids) of left-padded prompts: each prompt's real
    tokens get positions 0 .. len-1, as they would alone."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[b, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def greedy_continue(
    model: Any,
    mask: Any,
    positions: Any,
    past: Any,
    first: Any,
    texts: list[list[int]],
    steps: int,
    eos_ids: set[int],
) -> list[list[int]]:
    """Greedy decoding of up to `steps` more tokens with the KV cache `past` of a left-padded
    batch whose first generated tokens are `first` (already in `texts`); a row stops after its
    first EOS (kept in its list). Returns `texts`, extended in place."""
    import torch

    device = first.device
    done = torch.tensor([t[-1] in eos_ids for t in texts], device=device)
    token, pos = first[:, None], positions[:, -1:] + 1
    for _ in range(steps):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        token = out.logits[:, -1].float().argmax(-1, keepdim=True)
        pos = pos + 1
        for b, t in enumerate(token[:, 0].tolist()):
            if not bool(done[b]):
                texts[b].append(int(t))
                if int(t) in eos_ids:
                    done[b] = True
    return texts
