"""Chat prompts as token ids, and the two bases of the chat models (judges and generators).

`render_chat` applies the tokenizer's chat template with the generation prompt appended, so both
engines see exactly the same prompt tokens; `render_prompt` also takes a `RawPrompt`, tokenised
with `tokenizer.encode(text)` and no template (DEITA's scorers). `score_token_ids` gives each
scale token's id as the token that follows a prompt: the bare digit ("4", not " 4"). Chat
templates end the generation prompt with a newline and DEITA's raw templates with a space; after
either, byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3) emit the digit as one token, and
SentencePiece tokenizers (Llama-2, Mistral) emit the digit piece "4" (their encoding of the
string "4" alone is two ids, "▁" and "4": the id that counts is the second, the ids DEITA's
scorers hard-code). A scale token without such an id is an error, never silently left out.

`TransformersChatModel` (the transformers judge and generator) and `VllmChatModel` (the vLLM
judge and generator) hold the tokenizer and the model, render the prompts and leave out a prompt
longer than `max_length` tokens (it is never run); the subclasses turn what the model returns
into judge replies or generated text.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from engine.backends import hf
from engine.backends.base import Prompt, RawPrompt
from engine.backends.vllm_engine import VllmBackend

T = TypeVar("T")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def render_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (`render_chat`), a
    `RawPrompt` through `tokenizer.encode` with the tokenizer's own special tokens, as DEITA's
    scorer code calls it (none when its `special_tokens` is False)."""
    if isinstance(prompt, RawPrompt):
        if not prompt.special_tokens:
            return [int(i) for i in tokenizer.encode(prompt.text, add_special_tokens=False)]
        return [int(i) for i in tokenizer.encode(prompt.text)]
    return render_chat(tokenizer, prompt)


# Contexts the scale token is looked up after: a chat template's generation prompt ends with a
# newline, DEITA's raw templates with ": ".
_SCORE_CONTEXTS = ("\n", "##Quality: ", "Score: ")


def score_token_id(tokenizer: Any, token: str) -> int | None:
    """The id the model emits for `token` right after a prompt, or None when there is none.

    The id is what encoding `context + token` adds to encoding `context`, for a newline and for
    ": " contexts; they must agree and be one id that decodes to `token`. Where they do not
    (a tokenizer that merges the digit into the context), the vocabulary's own entry for the
    bare string is taken when it decodes to `token`."""
    found: set[int] = set()
    for context in _SCORE_CONTEXTS:
        head = tokenizer.encode(context, add_special_tokens=False)
        full = tokenizer.encode(context + token, add_special_tokens=False)
        tail = full[len(head) :]
        if full[: len(head)] == head and len(tail) == 1:
            found.add(int(tail[0]))
    if len(found) != 1:
        vocab_id = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        found = {int(vocab_id)} if isinstance(vocab_id, int) and vocab_id != unk else set()
    if len(found) != 1:
        return None
    (token_id,) = found
    if tokenizer.decode([token_id]).strip() != token.strip():
        return None
    return token_id


def score_token_ids(tokenizer: Any, score_tokens: Sequence[str]) -> dict[str, int]:
    """Each scale token's id (`score_token_id`). Raises ValueError naming the tokens that have
    none: the expected value must never quietly lose a scale value (it would renormalise over
    the rest, or fall back to parsing text)."""
    ids: dict[str, int] = {}
    missing = []
    for token in score_tokens:
        token_id = score_token_id(tokenizer, token)
        if token_id is None:
            missing.append(token)
        else:
            ids[token] = token_id
    if missing:
        raise ValueError(
            f"the judge's tokenizer has no single token for the scale value(s) "
            f"{', '.join(map(repr, missing))}: expected-value scoring needs one; use "
            "stages.judge.scoring: parse"
        )
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"scale tokens share ids: {ids}")
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
    tokenizer: Any, prompts: Sequence[Prompt], max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt (`render_prompt`), and the indices of those to run: not empty
    and at most `max_length` tokens."""
    encoded = [render_prompt(tokenizer, p) for p in prompts]
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
        prompts: Sequence[Prompt],
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
        prefix: Any = None,
        width: int = 0,
    ) -> tuple[Any, list[list[int]]]:
        """One forward pass over the left-padded batch: `scores` of the float32 next-token
        logits at the last position, and each prompt's greedy tokens: the argmax of those
        scores, then (when `generate`) up to `max_new_tokens - 1` more, a row stopping after its
        first EOS. With `prefix` (the KV cache of `width` tokens every prompt starts with, batch
        of one), `sequences` are what follows it: a copy of the cache is expanded to the batch
        and positions continue the prefix's."""
        import torch

        ids, mask, positions = hf.left_padded(sequences, self.pad_id, self.device)
        past = None
        if prefix is not None and width:
            past = copy.deepcopy(prefix)  # the model appends to the cache it is given
            past.batch_repeat_interleave(len(sequences))
            ones = torch.ones((len(sequences), width), dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
            positions = positions + width
        # Only the last position's logits are read: `logits_to_keep=1` skips the LM head (a
        # vocabulary-wide matmul, and batch x length x vocabulary floats) everywhere else.
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=generate or past is not None,
            logits_to_keep=1,
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
    `max_new_tokens`, then calls this constructor (`engine_args`: more `vllm.LLM` arguments,
    such as the judge's `enable_prefix_caching`)."""

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
        **engine_args: Any,
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
            **engine_args,
        )

    def _completions(
        self,
        prompts: Sequence[Prompt],
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
