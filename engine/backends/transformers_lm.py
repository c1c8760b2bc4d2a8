"""transformers backend: per-token NLL of the scored positions, batched, answer-only logits.

`TransformersScorer.token_nll` sorts the sequences by length and packs them into batches of at
most `max_batch_tokens` (batch size x padded length), right-padded with an attention mask. It runs
the model's base (decoder) to get the last hidden states, gathers only the rows that predict a
scored token (positions `score_from - 1 .. len - 2`), and applies the output head to those rows
alone, so full-vocabulary logits are never built for prompt positions; `log_softmax` runs in
float32 on the gathered rows, in chunks, and the target tokens' NLLs come back as float64 arrays
in the input order.

`reference_token_nll` is the batch-1 loop Cherry LLM and Superfiltering use (one forward per
sequence, full logits, float32 cross-entropy on the scored positions): the baseline that tests
and the benchmark compare against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.backends import hf
from engine.signals.lm import ScoredSequence

log = logging.getLogger(__name__)

# Rows of the output head computed at once: bounds the float32 logits to rows x vocabulary
# (1024 x 49,152 x 4 bytes = 200 MB for SmolLM2, twice that with the log_softmax output).
HEAD_CHUNK_ROWS = 1024

# A sequence joins a batch only if the batch's padded width exceeds its length by at most this
# fraction: on CPU every padded position costs as much as a real one.
PAD_TOLERANCE = 0.1


def base_model_of(model: Any) -> Any:
    """The part of a CausalLM that returns the last hidden states (after the final norm)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    if decoder is None:
        decoder = getattr(model, "model", None)
    if decoder is None or decoder is model:
        raise ValueError(f"cannot find the base model of {type(model).__name__}")
    return decoder


def _check_sequence(seq: ScoredSequence) -> None:
    if seq.score_from < 1:
        raise ValueError(
            f"score_from must be at least 1 (the first token has no context), got {seq.score_from}"
        )


class TransformersScorer(hf.TransformersBackend):
    """`TokenScorer` on a transformers CausalLM (see the module docstring). Runs on the CPU
    unless `use_gpu` (and torch sees a GPU)."""

    name = "transformers"
    _held = ("head", "decoder", "model")

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        max_batch_tokens: int = 8192,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        use_gpu: bool = False,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.max_batch_tokens = max_batch_tokens
        self._load_model(model_path, dtype, use_gpu, num_threads, trust_remote_code)
        self.decoder = base_model_of(self.model)
        self.head = self.model.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (lm_head)")
        config = self.model.config
        text_config = getattr(config, "get_text_config", lambda: config)()
        # Post-head transforms some architectures apply to their logits (Cohere, Granite, Gemma 2).
        self._logit_scale = getattr(text_config, "logit_scale", None)
        self._logits_scaling = getattr(text_config, "logits_scaling", None)
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        pad = getattr(text_config, "pad_token_id", None)
        vocab = getattr(text_config, "vocab_size", None)
        self._pad_id = int(pad) if isinstance(pad, int) and vocab and 0 <= pad < vocab else 0
        self._check_head()
        log.info("transformers scorer: %s on %s, %s", model_path, self.device, self.dtype)

    # ------------------------------------------------------------------------------------------
    def _head_logits(self, hidden: Any) -> Any:
        """float32 logits for a block of hidden rows, with the architecture's post-head scaling."""
        import torch

        logits = self.head(hidden).float()
        if self._logit_scale is not None:
            logits = logits * self._logit_scale
        if self._logits_scaling is not None:
            logits = logits / self._logits_scaling
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _check_head(self) -> None:
        """Refuse a model whose logits are not head(last hidden state): the answer-only path
        would silently compute something else. One forward of 8 tokens."""
        import torch

        vocab = self.head.weight.shape[0]
        ids = torch.arange(8, device=self.device).remainder(vocab).unsqueeze(0)
        with torch.inference_mode():
            full = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits.float(), -1)
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
            ours = torch.log_softmax(self._head_logits(hidden), -1)
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        diff = float((full - ours).abs().max())
        if not diff <= tolerance:
            raise ValueError(
                f"{type(self.model).__name__}: logits from base model + output head differ from "
                f"the model's own logits by {diff:.3g}; the answer-only path does not support it"
            )

    # ------------------------------------------------------------------------------------------
    def batches(self, sequences: Sequence[ScoredSequence]) -> list[list[int]]:
        """Indices of the sequences to run, longest first, packed so that batch size x padded
        length stays within `max_batch_tokens` (a longer sequence runs alone) and padding stays
        under `PAD_TOLERANCE` of each sequence's batch width (padding is pure waste on CPU)."""
        order = sorted(
            (i for i, s in enumerate(sequences) if s.score_from < len(s.token_ids)),
            key=lambda i: len(sequences[i].token_ids),
            reverse=True,
        )
        out: list[list[int]] = []
        width = 0
        for i in order:
            n = len(sequences[i].token_ids)
            if (
                out
                and (len(out[-1]) + 1) * width <= self.max_batch_tokens
                and n >= width * (1 - PAD_TOLERANCE)
            ):
                out[-1].append(i)
            else:
                out.append([i])
                width = n
        return out

    def token_nll(self, sequences: Sequence[ScoredSequence]) -> list[np.ndarray]:
        import torch

        self._check_open()
        for seq in sequences:
            _check_sequence(seq)
        result: list[np.ndarray] = [np.zeros(0, dtype=np.float64) for _ in sequences]
        with torch.inference_mode():
            for batch in self.batches(sequences):
                nll = self._batch_nll([sequences[i] for i in batch])
                for i, values in zip(batch, nll, strict=True):
                    result[i] = values
        return result

    def _batch_nll(self, batch: list[ScoredSequence]) -> list[np.ndarray]:
        import torch

        width = max(len(s.token_ids) for s in batch)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, targets, counts = [], [], []
        for b, seq in enumerate(batch):
            n = len(seq.token_ids)
            ids[b, :n] = torch.tensor(seq.token_ids, dtype=torch.long)
            mask[b, :n] = 1
            # hidden state at position p predicts token p + 1
            rows.append(torch.arange(seq.score_from - 1, n - 1) + b * width)
            targets.append(ids[b, seq.score_from : n])
            counts.append(n - seq.score_from)
        ids = ids.to(self.device)
        # no padding in the batch: no mask, so attention takes its plain causal path
        mask = mask.to(self.device) if any(len(s.token_ids) < width for s in batch) else None
        hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        row_index = torch.cat(rows).to(self.device)
        target = torch.cat(targets).to(self.device)
        nll = torch.empty(len(row_index), dtype=torch.float32, device=self.device)
        for start in range(0, len(row_index), HEAD_CHUNK_ROWS):
            stop = start + HEAD_CHUNK_ROWS
            logits = self._head_logits(hidden.index_select(0, row_index[start:stop]))
            logp = torch.log_softmax(logits, dim=-1)
            nll[start:stop] = -logp.gather(1, target[start:stop, None]).squeeze(1)
            del logits, logp
        values = nll.double().cpu().numpy()
        return [part.copy() for part in np.split(values, np.cumsum(counts)[:-1])]


def reference_token_nll(model: Any, sequences: Sequence[ScoredSequence]) -> list[np.ndarray]:
    """The batch-1 baseline, as Cherry LLM / Superfiltering compute it: one forward per sequence,
    full-vocabulary logits (`model(input_ids).logits`), float32 cross-entropy of the scored tokens
    (what `labels` with -100 on the prompt computes, kept per token). Load the model in float32
    for the reference numbers."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq in sequences:
            _check_sequence(seq)
            if seq.score_from >= len(seq.token_ids):
                out.append(np.zeros(0, dtype=np.float64))
                continue
            ids = torch.tensor([seq.token_ids], dtype=torch.long, device=device)
            logits = model(ids).logits.float()
            nll = F.cross_entropy(
                logits[0, seq.score_from - 1 : -1], ids[0, seq.score_from :], reduction="none"
            )
            out.append(nll.double().cpu().numpy())
    return out
