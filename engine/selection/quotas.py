"""Budgets per group (source or language) and selection within each group.

Every mode returns integer budgets that never exceed a group's size and sum to the largest total
the mode allows, at most min(k, sum of sizes). Fractions are shared by the largest-remainder
method in exact integer arithmetic, ties by group name, so budgets are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

MODES = ("proportional", "capped", "min_share")


def _largest_remainder(weights: dict[str, int], total: int) -> dict[str, int]:
    """`total` split in proportion to integer `weights` (floor, then +1 by largest remainder,
    ties by name). A share never exceeds ceil(total * w / W), so never a weight when total <= W."""
    weight_sum = sum(weights.values())
    if total <= 0 or weight_sum <= 0:
        return dict.fromkeys(weights, 0)
    shares = {g: total * w // weight_sum for g, w in weights.items()}
    remainders = sorted(weights, key=lambda g: (-(total * weights[g] % weight_sum), g))
    for group in remainders[: total - sum(shares.values())]:
        shares[group] += 1
    return shares


def _water_fill(weights: dict[str, int], limits: dict[str, int], total: int) -> dict[str, int]:
    """`total` (<= sum of limits) split in proportion to `weights`, no group above its limit: groups
    whose share would pass their limit are fixed at it, and the rest is shared again among the
    others, until every share fits."""
    budgets = dict.fromkeys(weights, 0)
    active = {g for g in weights if limits[g] > 0}
    remaining = min(total, sum(limits[g] for g in active))
    while remaining > 0 and active:
        shares = _largest_remainder({g: weights[g] for g in sorted(active)}, remaining)
        over = {g for g in active if shares[g] > limits[g]}
        if not over:
            budgets.update(shares)
            break
        for group in over:
            budgets[group] = limits[group]
            remaining -= limits[group]
        active -= over
    return budgets


def allocate(
    sizes: dict[str, int],
    k: int,
    mode: str = "proportional",
    cap: int | float | None = None,
    min_share: float | None = None,
) -> dict[str, int]:
    """Budget per group for `k` rows over groups of `sizes` eligible rows.

    - proportional: k * size / total, largest remainder (ties by group name); sums to
      min(k, total) and never exceeds a size.
    - capped: no group above `cap` (int: rows; float: fraction of k, floor(cap * k)); the budget
      the caps free is water-filled proportionally (by size) over groups with room left. When the
      caps make k impossible the sum is the most achievable, sum(min(size, cap)).
    - min_share: each group first gets min(size, ceil(min_share * k)); if these floors exceed
      min(k, total) they are scaled down proportionally (largest remainder). The rest of the
      budget is water-filled proportionally to size over the room each group has left.
    """
    if mode not in MODES:
        raise ValueError(f"quota mode must be one of {MODES}, not {mode!r}")
    sizes = {str(g): max(0, int(s)) for g, s in sizes.items()}
    total = min(max(0, int(k)), sum(sizes.values()))
    if mode == "proportional":
        return _water_fill(sizes, sizes, total)
    if mode == "capped":
        if cap is None:
            raise ValueError("capped quotas need cap")
        # A float cap is a fraction of k (1e-9: 0.3 * 10 must give 3, not 2.9999...).
        fraction = isinstance(cap, float)
        cap_rows = math.floor(cap * max(0, int(k)) + 1e-9) if fraction else int(cap)
        limits = {g: min(s, max(0, cap_rows)) for g, s in sizes.items()}
        return _water_fill(sizes, limits, total)
    if min_share is None:
        raise ValueError("min_share quotas need min_share")
    floor_rows = math.ceil(min_share * max(0, int(k)) - 1e-9)
    floors = {g: min(s, floor_rows) for g, s in sizes.items()}
    if sum(floors.values()) >= total:
        return _water_fill(floors, floors, total)
    room = {g: sizes[g] - floors[g] for g in sizes}
    extra = _water_fill(sizes, room, total - sum(floors.values()))
    return {g: floors[g] + extra[g] for g in sizes}


def select_with_quotas(
    groups: np.ndarray,
    eligible: np.ndarray,
    k: int,
    mode: str,
    cap: int | float | None,
    min_share: float | None,
    select_group: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """(selected, flagged) masks: each group's budget from `allocate` over its eligible rows, then
    `select_group(eligible mask of that group, budget)` in sorted group order (groups with budget
    0 are not called), its masks ORed together. Null labels form the group "None"."""
    labels = np.asarray(groups).astype(str)
    eligible = np.asarray(eligible, dtype=bool)
    names, counts = np.unique(labels[eligible], return_counts=True)
    budgets = allocate(
        dict(zip(names.tolist(), counts.tolist(), strict=True)), k, mode, cap, min_share
    )
    selected = np.zeros(len(labels), dtype=bool)
    flagged = np.zeros(len(labels), dtype=bool)
    for name in sorted(budgets):
        if budgets[name] <= 0:
            continue
        chosen, flags = select_group(eligible & (labels == name), budgets[name])
        selected |= np.asarray(chosen, dtype=bool)
        flagged |= np.asarray(flags, dtype=bool)
    return selected, flagged
