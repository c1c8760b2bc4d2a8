"""Plots of the evaluation loop (loss curves, W/T/L bars, winning rate per method): PNG data URIs.

Same conventions as engine.report.plots: headless Agg, every figure closed in a `finally`, labels
from the data escaped for mathtext. Callers catch failures and show a note instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.ticker import MaxNLocator

from engine.report.format import as_number
from engine.report.plots import (
    REJECTED_COLOR,
    SELECTED_COLOR,
    Figure,
    _finish,
    _mathtext_safe,
    plt,
)

__all__ = ["loss_curves", "winning_rates", "wtl_bars"]

TIE_COLOR = "#9aa5b1"
UNPARSED_COLOR = "#f0d27a"
ARM_COLORS = ("#2a9d8f", "#e76f51", "#264653", "#e9c46a", "#8e6bbf", "#577590")
WTL = (("wins", SELECTED_COLOR), ("ties", TIE_COLOR), ("losses", REJECTED_COLOR))


def loss_curves(losses: Mapping[str, Mapping[str, Sequence[Sequence[float]]]]) -> Figure:
    """Train (solid) and eval (dashed, dots) loss per arm against the optimizer step."""
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    try:
        for k, (arm, data) in enumerate(losses.items()):
            color = ARM_COLORS[k % len(ARM_COLORS)]
            label = _mathtext_safe(arm)
            train = list(data.get("train") or [])
            evals = list(data.get("eval") or [])
            if train:
                ax.plot(*zip(*train, strict=True), color=color, lw=1.3, label=f"{label} train")
            if evals:
                ax.plot(
                    *zip(*evals, strict=True),
                    color=color,
                    lw=1.0,
                    ls="--",
                    marker="o",
                    ms=3,
                    label=f"{label} eval",
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole
        ax.set_xlabel("step", fontsize=8)
        uri = _finish(fig, ax, "loss per arm", "loss")
    finally:
        plt.close(fig)
    return Figure(
        "loss curves",
        uri,
        "train and eval loss per arm",
        "train loss (solid) and eval loss on held-out rows (dashed) per optimizer step",
        560,
        320,
    )


def _counts(block: Any) -> dict[str, int]:
    block = block if isinstance(block, Mapping) else {}
    return {
        key: int(as_number(block.get(key)) or 0) for key in ("wins", "ties", "losses", "unparsed")
    }


def wtl_bars(name: str, pair: Mapping[str, Any]) -> Figure:
    """Stacked horizontal wins/ties/losses (and unparsed) per evaluation set, then pooled."""
    sets = pair.get("sets") if isinstance(pair.get("sets"), Mapping) else {}
    labels = [str(s) for s in sets] + ["pooled"]
    rows = [_counts(b) for b in sets.values()] + [_counts(pair.get("pooled"))]
    fig, ax = plt.subplots(figsize=(5.6, 0.42 * len(labels) + 1.3))
    try:
        y = list(range(len(labels)))[::-1]
        left = [0] * len(labels)
        for key, color in (*WTL, ("unparsed", UNPARSED_COLOR)):
            values = [r[key] for r in rows]
            if key == "unparsed" and not any(values):
                continue
            ax.barh(y, values, left=left, color=color, label=key, height=0.6)
            left = [a + b for a, b in zip(left, values, strict=True)]
        ax.set_yticks(y)
        ax.set_yticklabels([_mathtext_safe(label) for label in labels], fontsize=8)
        ax.set_xlabel("prompts", fontsize=8)
        uri = _finish(fig, ax, f"{_mathtext_safe(name)}: wins / ties / losses", "")
    finally:
        plt.close(fig)
    return Figure(
        name,
        uri,
        f"wins, ties and losses of {name} per evaluation set",
        "per prompt, judged in both orders: wins, ties and losses of the first arm",
    )


def winning_rates(
    methods: Sequence[str], rates: Sequence[float], intervals: Sequence[tuple[float, float]]
) -> Figure:
    """Pooled winning rate per method as horizontal bars with their interval; 1.0 = as good."""
    fig, ax = plt.subplots(figsize=(5.6, 0.45 * len(methods) + 1.4))
    try:
        y = list(range(len(methods)))[::-1]
        err_lo = [max(0.0, r - lo) for r, (lo, _) in zip(rates, intervals, strict=True)]
        err_hi = [max(0.0, hi - r) for r, (_, hi) in zip(rates, intervals, strict=True)]
        colors = [SELECTED_COLOR if r >= 1 else REJECTED_COLOR for r in rates]
        ax.barh(y, rates, color=colors, height=0.6, xerr=[err_lo, err_hi], capsize=3)
        ax.axvline(1.0, color="#1d2430", lw=1.0, ls="--", label="as good as the baseline")
        ax.set_xlim(0, 2)
        ax.set_yticks(y)
        ax.set_yticklabels([_mathtext_safe(m) for m in methods], fontsize=8)
        ax.set_xlabel("winning rate (pooled)", fontsize=8)
        uri = _finish(fig, ax, "winning rate against the baseline", "")
    finally:
        plt.close(fig)
    return Figure(
        "winning rate",
        uri,
        "pooled winning rate per method with its interval",
        "pooled winning rate per method (bar) and its bootstrap interval (whiskers); the dashed "
        "line at 1.0 means as good as the baseline",
    )
