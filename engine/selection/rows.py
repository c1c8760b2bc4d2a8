"""The selection algorithm: decide every row, in this order (first reason wins):

  1. exact_duplicate            (ingest found an identical normalised conversation)
  2. lang_not_allowed           (select.languages allow/deny, on the instruction side)
  3. the configured filters, then the preset's own rule (e.g. ifd >= 1), on raw or `norm_*` columns
  4. a missing ranking score    (the signal's own reason, e.g. judge_unparsed, else score_missing)
  5. near_duplicate             (MinHash components; the best member by `keep_by` is kept)
  6. semantic_duplicate         (embedding cosine >= threshold; the best member is kept)
  7. the selector under the budget, per quota group: rank | random | deita | kcenter |
     facility_location (options in `select.diversity`: each paper's reference behaviour beside
     Winnow's, see engine.selection.diversity); deita's skipped rows get too_similar, the rest
     below_budget.
Duplicates are resolved among rows that passed the filters, so a duplicate is never dropped in
favour of a copy that a filter rejects. Pure over a frame of signal columns (and the embedding
matrix aligned to it): no Spark, no Ray, no files; the select stage (engine.stages.select) loads
the frame and writes the result. The random baseline is drawn from the same final pool, with the
same size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from engine import reasons as R
from engine.config import PRESETS, JobSpec
from engine.selection.budget import random_select, rank_select, resolve_budget
from engine.selection.filters import first_matching_reason
from engine.selection.groups import keep_best

# Companion column that says why a signal is NaN, for the columns a preset ranks by.
REASON_COLUMNS = {
    "ifd": "lm_reason",
    "ifd_ppl": "lm_reason",
    "ppl": "lm_reason",
    "rm_score": "rm_reason",
}


def _normalize(frame: pd.DataFrame, job: JobSpec, unique: np.ndarray) -> dict[str, Any] | None:
    """Adds `norm_<column>` (within-group rank or z-score) computed over the unique records."""
    spec = job.select.normalize
    if spec is None:
        return None
    from engine.selection.normalize import normalize_within

    groups = _group_labels(frame, spec.within)
    for column in spec.columns:
        values = frame[column].to_numpy(dtype=np.float64, na_value=np.nan).copy()
        values[~unique] = np.nan  # exact duplicates do not count twice in the statistics
        normed = normalize_within(values, groups, spec.method)
        # A duplicate row gets its original's value (same id, same numbers).
        by_id = dict(zip(frame["id"].to_numpy()[unique], normed[unique], strict=True))
        frame[f"norm_{column}"] = frame["id"].map(by_id).astype("float64")
    return spec.model_dump()


def _group_labels(frame: pd.DataFrame, by: str) -> np.ndarray:
    column = frame[by].astype("string").fillna("und" if by == "lang" else "unknown")
    return column.to_numpy(dtype=object).astype(str)


def _score_reason(frame: pd.DataFrame, score: str) -> pd.Series:
    """Why each row's ranking score is missing: the signal's own reason, else score_missing."""
    base = score.removeprefix("norm_")
    reason_column = REASON_COLUMNS.get(base)
    if reason_column is None and base.startswith("judge_"):
        name = base.removeprefix("judge_")
        if f"judge_{name}_reason" in frame.columns:
            reason_column = f"judge_{name}_reason"
    reason = pd.Series(R.SCORE_MISSING, index=frame.index, dtype=object)
    if reason_column is not None and reason_column in frame.columns:
        given = frame[reason_column]
        reason = reason.where(given.isna(), given.astype(object))
    return reason


def _resolve_duplicates(
    eligible: np.ndarray, labels: np.ndarray, frame: pd.DataFrame, job: JobSpec
) -> np.ndarray:
    """Index of the kept member per row (-1: not a duplicate); only eligible rows take part."""
    groups = np.where(eligible, labels, -1)
    keep_column = job.select.keep_by()
    scores = frame[keep_column].to_numpy(dtype=np.float64, na_value=np.nan)
    keeper = keep_best(
        groups, scores, frame["id"].to_numpy(), job.select.dedup.keep_order == "desc"
    )
    rows = np.arange(len(frame))
    return np.where((keeper >= 0) & (keeper != rows), keeper, -1)


def _near_duplicates(frame: pd.DataFrame, eligible: np.ndarray, job: JobSpec) -> np.ndarray:
    clusters = frame["near_dup_cluster"]
    codes = pd.factorize(clusters, sort=True)[0]  # -1 for null (no near-duplicate)
    return _resolve_duplicates(eligible, codes, frame, job)


def _semantic_duplicates(
    frame: pd.DataFrame, eligible: np.ndarray, vectors: np.ndarray, job: JobSpec
) -> np.ndarray:
    from engine.selection.dedup import semantic_duplicates

    spec = job.select.dedup.semantic
    return semantic_duplicates(
        vectors,
        frame[job.select.keep_by()].to_numpy(dtype=np.float64, na_value=np.nan),
        frame["id"].to_numpy(),
        eligible,
        threshold=spec.threshold,
        descending=job.select.dedup.keep_order == "desc",
        index=spec.index,
        flat_max_rows=spec.flat_max_rows,
        seed=job.seed,
    )


SelectGroup = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _selector(frame: pd.DataFrame, job: JobSpec, vectors: np.ndarray | None) -> SelectGroup:
    """The preset's selector as f(eligible mask, k) -> (selected, too_similar)."""
    spec = job.select
    ids = frame["id"].to_numpy()
    score = spec.ranking_score()
    scores = (
        frame[score].to_numpy(dtype=np.float64, na_value=np.nan)
        if score is not None
        else np.full(len(frame), np.nan)
    )
    descending = spec.order == "desc"
    none = np.zeros(len(frame), dtype=bool)
    kind = spec.selector()
    if kind == "random":
        return lambda mask, k: (random_select(ids, mask, k, job.seed, salt="select"), none)
    if kind == "rank":
        return lambda mask, k: (rank_select(scores, ids, mask, k, descending), none)
    from engine.selection import diversity

    assert vectors is not None
    options = spec.diversity
    if kind == "deita":
        threshold = diversity.deita_threshold(options.threshold, job.stages.embed.backend)
        return lambda mask, k: diversity.deita_select(
            vectors, scores, ids, mask, k, threshold, descending
        )
    given = scores if score is not None else None
    if kind == "kcenter":
        return lambda mask, k: (
            diversity.kcenter_select(
                vectors, ids, mask, k, job.seed, given, descending, first=options.kcenter_first
            ),
            none,
        )
    if kind == "facility_location":
        return lambda mask, k: (
            diversity.facility_location_select(
                vectors,
                ids,
                mask,
                k,
                job.seed,
                similarity=options.facility_similarity,
                scores=given,
                descending=descending,
                prefilter=options.prefilter(k),
            ),
            none,
        )
    raise ValueError(f"unknown selector {kind!r}")


def select_rows(
    frame: pd.DataFrame, job: JobSpec, vectors: np.ndarray | None = None
) -> tuple[pd.DataFrame, dict]:
    """Decide every row: adds `selected`, `reason`, `dup_of`, `random_baseline`. Pure over the
    frame (and the embedding matrix aligned to it, when a step needs vectors)."""
    spec = job.select
    # A shallow copy: columns are only added, replaced or dropped here, never written into, so
    # the caller's frame stays as it was without a second copy of every column (1M rows).
    frame = frame.copy(deep=False)
    ids = frame["id"].to_numpy()
    n = len(frame)
    reasons = np.full(n, None, dtype=object)
    dup_of = frame["dup_of"].astype(object).to_numpy().copy()
    reasons[pd.notna(dup_of)] = R.EXACT_DUPLICATE
    unique = pd.isna(reasons)
    steps: dict[str, Any] = {}
    removed: dict[str, int] = {}

    if spec.languages is not None:
        langs = _group_labels(frame, "lang")
        allowed = np.ones(n, dtype=bool)
        if spec.languages.allow:
            allowed &= np.isin(langs, spec.languages.allow)
        if spec.languages.deny:
            allowed &= ~np.isin(langs, spec.languages.deny)
        reasons[pd.isna(reasons) & ~allowed] = R.LANG_NOT_ALLOWED
    steps["normalize"] = _normalize(frame, job, unique)

    undecided = pd.isna(reasons)
    reasons[np.flatnonzero(undecided)] = first_matching_reason(frame.loc[undecided], spec.rules())

    score = spec.ranking_score()
    if score is not None and needs_score(job):
        missing = pd.isna(reasons) & frame[score].isna().to_numpy()
        reasons[missing] = _score_reason(frame, score).to_numpy()[missing]

    dedup = spec.dedup
    for reason, enabled, finder in (
        (R.NEAR_DUPLICATE, dedup.near.enabled, lambda e: _near_duplicates(frame, e, job)),
        (
            R.SEMANTIC_DUPLICATE,
            dedup.semantic.enabled,
            lambda e: _semantic_duplicates(frame, e, vectors, job),
        ),
    ):
        if not enabled:
            continue
        keeper = finder(pd.isna(reasons))
        hit = keeper >= 0
        reasons[hit] = reason
        dup_of[hit] = ids[keeper[hit]]
        removed[reason] = int(hit.sum())

    eligible = pd.isna(reasons)
    k = resolve_budget(spec.budget, int(eligible.sum()))
    select_group = _selector(frame, job, vectors)
    if spec.quota is not None:
        from engine.selection.quotas import allocate, select_with_quotas

        groups = _group_labels(frame, spec.quota.by)
        quota = spec.quota
        selected, flagged = select_with_quotas(
            groups, eligible, k, quota.mode, quota.cap, quota.min_share, select_group
        )
        sizes = pd.Series(groups[eligible]).value_counts().sort_index()
        plan = allocate(
            {str(g): int(c) for g, c in sizes.items()}, k, quota.mode, quota.cap, quota.min_share
        )
        got = pd.Series(groups[selected]).value_counts()
        steps["quota"] = {
            "by": quota.by,
            "mode": quota.mode,
            "groups": {
                g: {"eligible": int(sizes[g]), "budget": plan[g], "selected": int(got.get(g, 0))}
                for g in plan
            },
        }
    else:
        selected, flagged = select_group(eligible, k)
    flagged = flagged & eligible & ~selected
    reasons[flagged] = R.TOO_SIMILAR
    reasons[eligible & ~selected & ~flagged] = R.BELOW_BUDGET

    out = frame  # the shallow copy above: dropping a column here leaves the caller's frame
    del out["source_index"]
    out["selected"] = selected
    out["reason"] = pd.array(reasons, dtype="string")
    out["dup_of"] = pd.array(dup_of, dtype="string")
    out["random_baseline"] = random_select(
        ids, eligible, int(selected.sum()), job.seed, salt="baseline"
    )
    summary = {
        "preset": spec.preset,
        "selector": spec.selector(),
        "score": score,
        "order": spec.order if score else None,
        "budget": spec.budget,
        "budget_rows": k,
        "eligible": int(eligible.sum()),
        "default_score_of_preset": PRESETS[spec.preset]["score"],
        "filters": [f.model_dump() for f in spec.filters],
        "hygiene": spec.hygiene.summary(),
        "dedup": {**dedup.model_dump(), "keep_by_column": spec.keep_by(), "removed": removed},
        **{key: value for key, value in steps.items() if key in ("normalize", "quota")},
    }
    if spec.selector() in ("deita", "kcenter", "facility_location"):
        from engine.selection.diversity import deita_threshold

        used = spec.diversity.model_dump()
        if spec.selector() == "deita":  # the threshold in use (null = the backend's default)
            used["threshold"] = deita_threshold(used["threshold"], job.stages.embed.backend)
        summary["diversity"] = used
    return out, summary


def needs_score(job: JobSpec) -> bool:
    """True when the selector ranks by the score, so a row without one cannot take part: rank,
    deita, and facility location with a prefilter (Superfiltering.D's IFD top rows)."""
    spec = job.select
    kind = spec.selector()
    prefiltered = spec.diversity.prefilter_rows or spec.diversity.prefilter_ratio
    return kind in ("rank", "deita") or (kind == "facility_location" and bool(prefiltered))


def needs_vectors(job: JobSpec) -> bool:
    spec = job.select
    return spec.dedup.semantic.enabled or spec.selector() in (
        "deita",
        "kcenter",
        "facility_location",
    )
