"""Train a real small reward model for the `rm` tests: no reward model ships offline.

The built-in MiniLM (the sentence-transformers folder of `builtin:all-minilm-l6-v2`, a plain BERT
checkpoint at its root) gets a fresh one-output classification head
(`AutoModelForSequenceClassification`, `num_labels=1`) and is trained pairwise on real Alpaca
rows: for every row, the true (instruction, answer) pair must score above the same instruction
with another row's answer (Bradley–Terry loss, -log sigmoid(r(x, y_true) - r(x, y_shuffled))).
The pairs are built exactly as the `rm` stage builds them (engine.records.to_canonical, then
engine.signals.rm.plan_pairs), so the model is trained on what it will score. The result is saved
with `save_pretrained` (model and tokenizer), a folder the `rm` stage loads like any hub model.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.models import resolve_embedding_model
from engine.records import to_canonical
from engine.signals.rm import plan_pairs


def alpaca_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(instruction, answer) of Alpaca rows, as the rm stage pairs them (first turn)."""
    conversations = [to_canonical(row, "alpaca").conversation for row in rows]
    return [(p.instruction, p.response) for p in plan_pairs(conversations, max_turns=1)]


def shuffled_answers(pairs: Sequence[tuple[str, str]], rng: random.Random) -> list[str]:
    """Every pair's answer replaced by another pair's answer (a derangement: never its own)."""
    n = len(pairs)
    if n < 2:
        raise ValueError("need at least two pairs to shuffle answers between them")
    order = list(range(n))
    rng.shuffle(order)
    # Rotating a random order by one moves every index to another position.
    other = {order[k]: order[(k + 1) % n] for k in range(n)}
    return [pairs[other[i]][1] for i in range(n)]


def train_reward_model(
    out_dir: Path,
    alpaca_rows: Sequence[dict[str, Any]],
    steps: int = 200,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 64,
    learning_rate: float = 2e-4,
    train_layers: int = 2,
    num_threads: int = 2,
) -> Path:
    """Train (see the module docstring) and save into `out_dir`; returns `out_dir`. Writes
    `train_seconds` and the last losses into `out_dir/training.txt` for the record.

    Each step scores `batch_size` true pairs and as many shuffled ones (2 x `batch_size`
    sequences of at most `max_length` tokens). Only the top `train_layers` encoder layers, the
    pooler and the new head learn: the CPU budget (about a minute on 2 cores for the defaults,
    which reach ~0.95 pairwise accuracy on held-out rows) goes to the layers that must learn to
    compare the two segments, and the frozen layers need no backward pass."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    rng = random.Random(seed)
    base = resolve_embedding_model("builtin:all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    layers = model.bert.encoder.layer
    frozen = [model.bert.embeddings, *layers[: len(layers) - train_layers]]
    for module in frozen:
        module.requires_grad_(False)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps) + 1e-3
    )

    pairs = alpaca_pairs(alpaca_rows)
    losses: list[float] = []
    epoch: list[int] = []
    wrong: list[str] = []
    for _ in range(steps):
        if len(epoch) < batch_size:  # a fresh pass: new order, new wrong answers
            epoch = list(range(len(pairs)))
            rng.shuffle(epoch)
            wrong = shuffled_answers(pairs, rng)
        batch, epoch = epoch[:batch_size], epoch[batch_size:]
        questions = [pairs[i][0] for i in batch]
        answers = [pairs[i][1] for i in batch] + [wrong[i] for i in batch]
        inputs = tokenizer(
            questions + questions,
            answers,
            truncation="longest_first",
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        rewards = model(**inputs).logits[:, 0]
        true, shuffled = rewards[: len(batch)], rewards[len(batch) :]
        loss = -F.logsigmoid(true - shuffled).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    seconds = time.perf_counter() - started
    tail = losses[-20:]
    (out_dir / "training.txt").write_text(
        f"steps {steps}\nbatch {batch_size}\nmax_length {max_length}\n"
        f"train_seconds {seconds:.1f}\nfirst_loss {losses[0]:.4f}\n"
        f"last20_mean_loss {sum(tail) / len(tail):.4f}\n",
        encoding="utf-8",
    )
    return out_dir
