"""Evaluation arithmetic: pure functions over judge scores (no model, no Spark, no Ray)."""

from engine.evaluation.winning_rate import (
    Judgement,
    Outcome,
    WinningRate,
    bootstrap_interval,
    outcome,
    winning_rate,
    winning_rates_by_set,
)

__all__ = [
    "Judgement",
    "Outcome",
    "WinningRate",
    "bootstrap_interval",
    "outcome",
    "winning_rate",
    "winning_rates_by_set",
]
