"""The select stage's decision order on a synthetic frame: pure, no Spark or Ray.

Duplicates (exact, near, semantic), language allow/deny, normalisation, missing scores, the
diversity selectors and quotas all meet here; every row must leave with exactly one outcome.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.config import parse_job
from engine.selection.quotas import allocate
from engine.selection.rows import select_rows

DIM = 16


def _frame(n: int = 60, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.array([f"id{i:03d}" for i in range(n)])
    frame = pd.DataFrame(
        {
            "id": ids,
            "source": np.where(np.arange(n) % 3 == 0, "a.json", "b.json"),
            "source_index": np.where(np.arange(n) % 3 == 0, 0, 1),
            "row": np.arange(n),
            "dup_of": pd.array([None] * n, dtype="string"),
            "assistant_chars": rng.integers(10, 1000, n).astype("int64"),
            "ifd": rng.uniform(0.2, 1.2, n),
            "lm_reason": pd.array([None] * n, dtype="string"),
            "lang": np.array(["en", "es", "ko", "de"])[np.arange(n) % 4],
            "near_dup_cluster": pd.array([None] * n, dtype="string"),
        }
    )
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return frame, vectors


def _job(**select: object) -> object:
    return parse_job(
        {
            "inputs": [{"path": "x"}],
            "signals": ["lm", "lang"],
            # The synthetic frame has no indicator columns: no filters, no hygiene rules.
            "select": {"filters": [], "hygiene": {"enabled": False}, **select},
        }
    )


def _outcomes_reconcile(out: pd.DataFrame) -> None:
    assert (out["selected"] ^ out["reason"].notna()).all()


def test_duplicates_keep_the_best_member_and_point_to_it() -> None:
    frame, vectors = _frame()
    frame.loc[5, "dup_of"] = "id004"  # exact duplicate from ingest
    frame.loc[[1, 2, 3], "near_dup_cluster"] = "id001"
    frame.loc[[1, 2, 3], "assistant_chars"] = [100, 300, 200]
    vectors[7] = vectors[6] + 0.01 * vectors[8]  # a semantic twin of row 6
    vectors[7] /= np.linalg.norm(vectors[7])
    frame.loc[[6, 7], "assistant_chars"] = [50, 60]
    out, summary = select_rows(frame, _job(budget=1.0), vectors)
    _outcomes_reconcile(out)
    assert out.loc[5, "reason"] == "exact_duplicate" and out.loc[5, "dup_of"] == "id004"
    assert out.loc[2, "selected"]
    assert list(out.loc[[1, 3], "reason"]) == ["near_duplicate"] * 2
    assert list(out.loc[[1, 3], "dup_of"]) == ["id002"] * 2
    assert out.loc[6, "reason"] == "semantic_duplicate" and out.loc[6, "dup_of"] == "id007"
    assert summary["dedup"]["removed"] == {"near_duplicate": 2, "semantic_duplicate": 1}


def test_a_filtered_row_never_wins_its_duplicate_group() -> None:
    frame, vectors = _frame()
    frame.loc[[1, 2], "near_dup_cluster"] = "id001"
    frame.loc[[1, 2], "assistant_chars"] = [100, 900]
    frame["refusal"] = False
    frame.loc[2, "refusal"] = True
    job = _job(filters=[{"reject_if": "refusal == true", "reason": "refusal"}])
    out, _ = select_rows(frame, job, vectors)
    assert out.loc[2, "reason"] == "refusal" and out.loc[1, "selected"]


def test_languages_normalisation_and_missing_scores() -> None:
    frame, vectors = _frame()
    frame.loc[0, "ifd"] = np.nan
    frame.loc[0, "lm_reason"] = "no_scorable_answer"
    frame.loc[4, "ifd"] = np.nan  # no reason given by the signal
    job = _job(
        preset="ifd",
        score="norm_ifd",
        budget=12,
        languages={"deny": ["de"]},
        normalize={"within": "lang", "method": "rank", "columns": ["ifd"]},
        dedup={"semantic": {"enabled": False}},
    )
    out, summary = select_rows(frame, job, vectors)
    _outcomes_reconcile(out)
    assert (out.loc[out["lang"] == "de", "reason"] == "lang_not_allowed").all()
    assert out.loc[0, "reason"] == "no_scorable_answer"
    assert out.loc[4, "reason"] == "score_missing"
    ranks = out.groupby("lang")["norm_ifd"].max()
    assert np.allclose(ranks.drop("de"), 1.0)
    assert out["selected"].sum() == 12
    assert summary["normalize"]["method"] == "rank"


@pytest.mark.parametrize("mode", ["proportional", "capped", "min_share"])
def test_quotas_are_respected_exactly(mode: str) -> None:
    frame, vectors = _frame(n=80)
    frame.loc[frame.index < 50, "lang"] = "en"  # unbalanced: 50 en, the rest ko/de/es
    quota = {"by": "lang", "mode": mode, "cap": 5 if mode == "capped" else None}
    if mode == "min_share":
        quota = {"by": "lang", "mode": mode, "min_share": 0.2}
    out, summary = select_rows(
        frame, _job(budget=20, quota=quota, dedup={"semantic": {"enabled": False}}), vectors
    )
    _outcomes_reconcile(out)
    sizes = frame["lang"].value_counts().to_dict()
    plan = allocate(sizes, 20, mode, quota.get("cap"), quota.get("min_share"))
    got = out.loc[out["selected"], "lang"].value_counts().to_dict()
    assert {g: got.get(g, 0) for g in plan} == plan
    assert {g: v["selected"] for g, v in summary["quota"]["groups"].items()} == plan
    if mode == "capped":
        assert max(got.values()) <= 5


def test_deita_flags_too_similar_rows_and_baseline_matches_size() -> None:
    frame, vectors = _frame(n=40)
    base = vectors[0]
    for i in range(1, 6):  # five near-copies of the best row
        vectors[i] = base + 0.05 * vectors[i + 10]
        vectors[i] /= np.linalg.norm(vectors[i])
    frame.loc[0:5, "assistant_chars"] = [5000, 4999, 4998, 4997, 4996, 4995]
    job = _job(
        preset="deita",
        score="assistant_chars",
        budget=10,
        diversity={"threshold": 0.9},
        dedup={"semantic": {"enabled": False}},
    )
    out, summary = select_rows(frame, job, vectors)
    _outcomes_reconcile(out)
    assert out.loc[0, "selected"]
    assert (out.loc[1:5, "reason"] == "too_similar").all()
    assert out["selected"].sum() == 10 and summary["selector"] == "deita"
    assert out["random_baseline"].sum() == 10


@pytest.mark.parametrize("preset", ["kcenter", "facility_location", "random", "longest"])
def test_every_selector_fills_the_budget_deterministically(preset: str) -> None:
    frame, vectors = _frame(n=50)
    job = _job(preset=preset, budget=7)
    first, _ = select_rows(frame, job, vectors)
    second, _ = select_rows(frame.copy(), job, vectors.copy())
    _outcomes_reconcile(first)
    assert first["selected"].sum() == 7
    assert first["selected"].equals(second["selected"])


def test_superfiltering_d_options_prefilter_by_score_then_facility_location() -> None:
    """facility_location with a ranking score, a prefilter and the submodlib kernel: only the
    best `prefilter_ratio x budget` rows by ifd can be chosen; a row without ifd is rejected
    with its signal's reason; the result is the pure selector's on that pool."""
    from engine.selection.diversity import best_first, facility_location_select

    frame, vectors = _frame(n=60)
    frame.loc[3, "ifd"] = np.nan
    frame.loc[3, "lm_reason"] = "no_scorable_answer"
    job = _job(
        preset="facility_location",
        score="ifd",
        budget=5,
        diversity={"facility_similarity": "euclidean", "prefilter_ratio": 4},
        dedup={"semantic": {"enabled": False}},
    )
    out, summary = select_rows(frame, job, vectors)
    _outcomes_reconcile(out)
    assert out.loc[3, "reason"] == "no_scorable_answer"
    ifd = frame["ifd"].to_numpy()
    eligible = ~np.isnan(ifd)
    pool = best_first(ifd, frame["id"].to_numpy(), np.flatnonzero(eligible))[:20]
    chosen = np.flatnonzero(out["selected"].to_numpy())
    assert len(chosen) == 5 and set(chosen) <= set(pool)
    expected = facility_location_select(
        vectors,
        frame["id"].to_numpy(),
        eligible,
        5,
        similarity="euclidean",
        scores=ifd,
        prefilter=20,
    )
    assert set(np.flatnonzero(expected)) == set(chosen)
    # Today's facility location (no prefilter, cosine) ignores the score and is reachable.
    plain, _ = select_rows(
        frame,
        _job(preset="facility_location", budget=5, dedup={"semantic": {"enabled": False}}),
        vectors,
    )
    assert plain["selected"].sum() == 5
    assert summary["selector"] == "facility_location"


def test_mods_kcenter_option_draws_the_first_center_with_the_seed() -> None:
    frame, vectors = _frame(n=50)
    firsts = set()
    for seed in range(6):
        job = parse_job(
            {
                "inputs": [{"path": "x"}],
                "seed": seed,
                "select": {
                    "filters": [],
                    "hygiene": {"enabled": False},
                    "preset": "kcenter",
                    "budget": 1,
                    "diversity": {"kcenter_first": "random"},
                    "dedup": {"semantic": {"enabled": False}},
                },
            }
        )
        out, _ = select_rows(frame, job, vectors)
        (row,) = np.flatnonzero(out["selected"].to_numpy())
        assert row == np.random.RandomState(seed).choice(np.arange(50))  # MoDS' draw, seeded
        firsts.add(int(row))
    assert len(firsts) > 1


def test_deita_threshold_default_depends_on_the_embedding_backend() -> None:
    from engine.selection.diversity import DEITA_THRESHOLDS

    frame, vectors = _frame(n=30)
    summaries = {}
    for backend in ("sentence_transformers", "causal_lm"):
        embed = {"backend": backend}  # each with its default model
        job = parse_job(
            {
                "inputs": [{"path": "x"}],
                "select": {
                    "filters": [],
                    "hygiene": {"enabled": False},
                    "preset": "deita",
                    "score": "assistant_chars",
                    "budget": 10,
                },
                "stages": {"embed": embed},
            }
        )
        assert job.select.diversity.threshold is None
        _, summaries[backend] = select_rows(frame, job, vectors)
        assert summaries[backend]["diversity"]["threshold"] == DEITA_THRESHOLDS[backend]


def test_reference_options_are_checked_when_the_job_is_read() -> None:
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="prefilter"):
        _job(preset="facility_location", budget=5, diversity={"prefilter_rows": 50})
    with pytest.raises(ConfigError, match="prefilter"):
        _job(preset="kcenter", score="ifd", budget=5, diversity={"prefilter_rows": 50})
    with pytest.raises(ConfigError, match="not both"):
        _job(
            preset="facility_location",
            score="ifd",
            diversity={"prefilter_rows": 5, "prefilter_ratio": 2},
        )

    def embed_job(**embed: str) -> object:
        return parse_job(
            {"inputs": [{"path": "x"}], "signals": ["embed"], "stages": {"embed": embed}}
        )

    with pytest.raises(ConfigError, match="causal_lm backend embeds with a CausalLM"):
        embed_job(backend="causal_lm", model="builtin:all-minilm-l6-v2")
    with pytest.raises(ConfigError, match="is a CausalLM"):
        embed_job(model="builtin:smollm2-135m")
    assert embed_job(backend="causal_lm").stages.embed.model_name() == "builtin:smollm2-135m"
    assert embed_job().stages.embed.model_name() == "builtin:all-minilm-l6-v2"
