"""Evaluation arithmetic: pure functions over judge scores (no model, no Spark, no Ray)."""

from engine.evaluation.winning_rate import (
    AlpacaEvalRate,
    FastChatRate,
    Judgement,
    Outcome,
    WinningRate,
    alpacaeval_rate,
    bootstrap_interval,
    fastchat_rate,
    outcome,
    winning_rate,
    winning_rates_by_set,
)

__all__ = [
    "AlpacaEvalRate",
    "FastChatRate",
    "Judgement",
    "Outcome",
    "WinningRate",
    "alpacaeval_rate",
    "bootstrap_interval",
    "fastchat_rate",
    "outcome",
    "winning_rate",
    "winning_rates_by_set",
]
