"""Scores made comparable across groups (languages, sources) before one global ranking.

A judge or LM score often sits on a different scale per language; ranking on the raw value then
mostly selects a language. Normalising within each group compares rows with their peers instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METHODS = ("rank", "zscore")


def normalize_within(values: np.ndarray, groups: np.ndarray, method: str) -> np.ndarray:
    """Each value normalised within its group (float64; NaN stays NaN and is left out of the
    group statistics; null group labels form the group "None").

    - "rank": percentile rank (r - 1) / (m - 1) in [0, 1], r the average rank (1-based, ties share
      the mean of their ranks) among the group's m non-NaN values; a group of one gets 1.0.
    - "zscore": (x - mean) / std with the population std (ddof 0) of the group's non-NaN values;
      a group whose std is 0 gets 0.0.
    """
    if method not in METHODS:
        raise ValueError(f"normalize method must be one of {METHODS}, not {method!r}")
    series = pd.Series(np.asarray(values, dtype=np.float64))
    labels = pd.Series(np.asarray(groups).astype(str))
    grouped = series.groupby(labels, sort=False)
    if method == "rank":
        ranks = grouped.rank(method="average")
        counts = grouped.transform("count")
        result = (ranks - 1.0) / (counts - 1.0)
        result = result.where(counts != 1, 1.0)
    else:
        mean = grouped.transform("mean")
        std = grouped.transform("std", ddof=0)
        result = ((series - mean) / std).where(std != 0, 0.0)
    return np.where(series.isna(), np.nan, result.to_numpy(dtype=np.float64))
