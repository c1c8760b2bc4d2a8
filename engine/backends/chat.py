"""Chat prompts as token ids, and the two bases of the chat models (judges and generators).

`render_chat` applies the tokenizer's chat template with the generation prompt appended, so both
engines see exactly the same prompt tokens. `score_token_ids` gives each scale token's id: the
tokenizer's encoding of the bare digit without a leading space ("4", not " 4"): chat templates
end the generation prompt with a newline, after which SentencePiece/BPE tokenizers emit the bare
digit; a token that does not encode to exactly one id is left out.

`TransformersChatModel` (the transformers judge and generator) and `VllmChatModel` (the vLLM
judge and generator) hold the tokenizer and the model, render the prompts and leave out a prompt
longer than `max_length` tokens (it is never run); the subclasses turn what the model returns
into judge replies or generated text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from engine.backends import hf
from engine.backends.vllm_engine import VllmBackend

T = TypeVar("T")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def score_token_ids(tokenizer: Any, score_tokens: Sequence[str]) -> dict[str, int]:
    """Each scale token's single id (bare digit, no leading space); multi-id tokens are left out."""
    ids: dict[str, int] = {}
    for token in score_tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) == 1:
            ids[token] = int(encoded[0])
    return ids


def eos_token_ids(tokenizer: Any, model_config: Any = None) -> set[int]:
    """The tokenizer's EOS id, plus those of the model's generation config when given (chat
    models often end a turn with a token the tokenizer does not call EOS)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(model_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(i) for i in extra)
    return ids


def render_prompts(
    tokenizer: Any, prompts: Sequence[list[dict[str, str]]], max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt (`render_chat`), and the indices of those to run: not empty and
    at most `max_length` tokens."""
    encoded = [render_chat(tokenizer, p) for p in prompts]
    return encoded, [i for i, ids in enumerate(encoded) if 0 < len(ids) <= max_length]


class TransformersChatModel(hf.TransformersBackend):
    """Base of the transformers judge and generator: a tokenizer and a CausalLM (`hf`), prompts
    run `max_batch_prompts` at a time, shortest first, left-padded with explicit position ids,
    greedy decoding with the KV cache. EOS ids: the tokenizer's, plus those of the model's
    generation config where `generation_eos` is set. A subclass sets `max_length`,
    `max_new_tokens` and `max_batch_prompts`, then calls this constructor."""

    name = "transformers"
    generation_eos = False
    max_length: int
    max_new_tokens: int
    max_batch_prompts: int

    def __init__(
        self,
        model_path: str,
        dtype: str,
        trust_remote_code: bool,
        num_threads: int | None,
        use_gpu: bool,
    ) -> None:
        self.tokenizer = hf.load_tokenizer(model_path, trust_remote_code)
        self._load_model(model_path, dtype, use_gpu, num_threads, trust_remote_code)
        self.pad_id = hf.pad_token_id(self.tokenizer)
        config = getattr(self.model, "generation_config", None) if self.generation_eos else None
        self.eos_ids = eos_token_ids(self.tokenizer, config)

    def _run_batches(
        self,
        prompts: Sequence[list[dict[str, str]]],
        run: Callable[[list[list[int]]], list[T]],
        empty: Callable[[], T],
    ) -> list[T]:
        """`run` on batches of the rendered prompts, shortest first, `max_batch_prompts` at a
        time; each result in its prompt's place (`empty()` for a prompt that is not run)."""
        import torch

        encoded, todo = render_prompts(self.tokenizer, prompts, self.max_length)
        results = [empty() for _ in prompts]
        order = sorted(todo, key=lambda i: len(encoded[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.max_batch_prompts):
                batch = order[start : start + self.max_batch_prompts]
                for i, result in zip(batch, run([encoded[i] for i in batch]), strict=True):
                    results[i] = result
        return results

    def _greedy(
        self,
        sequences: list[list[int]],
        generate: bool,
        scores: Callable[[Any], Any] = lambda logits: logits,
    ) -> tuple[Any, list[list[int]]]:
        """One forward pass over the left-padded batch: `scores` of the float32 next-token
        logits at the last position, and each prompt's greedy tokens: the argmax of those
        scores, then (when `generate`) up to `max_new_tokens - 1` more, a row stopping after its
        first EOS."""
        ids, mask, positions = hf.left_padded(sequences, self.pad_id, self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=generate
        )
        last = scores(out.logits[:, -1].float())
        first = last.argmax(-1)
        texts: list[list[int]] = [[int(t)] for t in first.tolist()]
        if generate and self.max_new_tokens > 1:
            texts = hf.greedy_continue(
                self.model,
                mask,
                positions,
                out.past_key_values,
                first,
                texts,
                self.max_new_tokens - 1,
                self.eos_ids,
            )
        return last, texts

    def _decode(self, token_ids: list[int]) -> str:
        """The text of generated tokens, without EOS and special tokens."""
        return self.tokenizer.decode(
            [t for t in token_ids if t not in self.eos_ids], skip_special_tokens=True
        )


class VllmChatModel(VllmBackend):
    """Base of the vLLM judge and generator: the tokenizer (prompts are rendered here, as the
    transformers chat models do) and one engine of `max_length + max_new_tokens` positions;
    every prompt goes to the engine in one `LLM.generate` call. A subclass sets `max_length` and
    `max_new_tokens`, then calls this constructor."""

    name = "vllm"
    max_length: int
    max_new_tokens: int

    def __init__(
        self,
        model_path: str,
        dtype: str,
        enforce_eager: bool,
        gpu_memory_utilization: float,
        trust_remote_code: bool,
        seed: int,
    ) -> None:
        self.tokenizer = hf.load_tokenizer(model_path, trust_remote_code)
        self._start_engine(
            model=model_path,
            dtype=dtype,
            max_model_len=self.max_length + self.max_new_tokens,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            seed=seed,
        )

    def _completions(
        self,
        prompts: Sequence[list[dict[str, str]]],
        params: Callable[[], Any],
        refused: Callable[[], bool] = lambda: False,
    ) -> dict[int, Any]:
        """The first completion of each prompt that is run, by the prompt's index, with the
        sampling parameters `params()`. When vLLM refuses them (TypeError, ValueError,
        NotImplementedError), `refused()` says whether to try once more with `params()` (which
        then asks for less); else the error propagates."""
        encoded, todo = render_prompts(self.tokenizer, prompts, self.max_length)
        if not todo:
            return {}
        inputs = [{"prompt_token_ids": encoded[i]} for i in todo]
        try:
            outputs = self.llm.generate(inputs, params(), use_tqdm=False)
        except (TypeError, ValueError, NotImplementedError):
            if not refused():
                raise
            outputs = self.llm.generate(inputs, params(), use_tqdm=False)
        if len(outputs) != len(todo):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(todo)} prompts")
        completions = {}
        for i, out in zip(todo, outputs, strict=True):
            if list(out.prompt_token_ids) != encoded[i]:
                raise RuntimeError(f"vLLM output {out.request_id} is not prompt {i}")
            completions[i] = out.outputs[0]
        return completions
