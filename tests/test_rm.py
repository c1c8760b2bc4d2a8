"""The reward-model signal `rm`: which pairs are scored and how they pool (pure), a real reward
model trained here on real Alpaca answers (no reward model ships offline) that ranks true answers
above answers shuffled between rows, batched scores equal to one-by-one scores, and the stage end
to end through the real pipeline (Spark, Ray, the score cache, ranking and filters)."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from engine.reasons import RM_NO_TURN
from engine.signals.rm import RM_SCHEMA, RMPair, plan_pairs, record_columns
from engine.stages.contract import ConfigDeprecationWarning
from engine.stages.rm import STAGE, RMSpec, check_model
from tests.support.reward_model import alpaca_pairs, shuffled_answers, train_reward_model

TRAIN_ROWS = slice(0, 3000)  # the reward model learns on these rows
HELD_OUT = slice(-100, None)  # ... and is judged on these (never seen in training)
PIPELINE_ROWS = slice(-160, -130)  # scored end to end (held out too)
# Pairwise accuracy of the trained model on held-out rows (chance: 0.5); see the report for the
# measured value.
ACCURACY_BOUND = 0.8
NO_DEDUP = {"near": {"enabled": False}, "semantic": {"enabled": False}}


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# ---- pairs and pooling (pure) ----------------------------------------------------------------


def test_pairs_take_the_last_user_turn_before_each_answer() -> None:
    chat = [
        _msg("system", "Be brief."),
        _msg("user", "Capital of France?"),
        _msg("assistant", "Paris."),
        _msg("user", "And of Italy?"),
        _msg("assistant", "Rome."),
        _msg("assistant", "Also: Milan is not the capital."),
    ]
    pairs = plan_pairs([chat])
    assert pairs == [
        RMPair(0, 0, "Capital of France?", "Paris."),
        RMPair(0, 1, "And of Italy?", "Rome."),
        RMPair(0, 2, "And of Italy?", "Also: Milan is not the capital."),
    ]
    # The system turn is never an instruction; a blank answer is not scored.
    assert plan_pairs([[_msg("system", "S"), _msg("assistant", "A")]]) == []
    assert plan_pairs([[_msg("user", "Q"), _msg("assistant", "  ")]]) == []


def test_max_turns_counts_scorable_turns_as_lm_and_judges_do() -> None:
    greeting_first = [
        _msg("assistant", "Hello! How can I help?"),  # turn 0: no instruction before it
        _msg("user", "Q1"),
        _msg("assistant", "A1"),
        _msg("user", "Q2"),
        _msg("assistant", "A2"),
        _msg("user", "Q3"),
        _msg("assistant", "A3"),
    ]
    # engine.signals.turns numbers every assistant turn; max_turns keeps the first N scorable
    # ones, so the opening greeting (no instruction before it) neither counts nor is scored.
    assert plan_pairs([greeting_first], max_turns=1) == [RMPair(0, 1, "Q1", "A1")]
    assert plan_pairs([greeting_first], max_turns=2) == [
        RMPair(0, 1, "Q1", "A1"),
        RMPair(0, 2, "Q2", "A2"),
    ]
    assert [p.turn for p in plan_pairs([greeting_first])] == [1, 2, 3]
    with pytest.raises(ValueError, match="max_turns"):
        plan_pairs([greeting_first], max_turns=0)


def test_record_columns_pool_the_mean_and_give_a_reason_for_no_turn() -> None:
    conversations = [
        [_msg("user", "Q1"), _msg("assistant", "A1"), _msg("user", "Q2"), _msg("assistant", "A2")],
        [_msg("assistant", "Hi there.")],
        [_msg("user", "Only a question?")],
        [_msg("user", "Q"), _msg("assistant", "")],
        [],
        [_msg("user", "Q"), _msg("assistant", "A")],
    ]
    pairs = plan_pairs(conversations)
    assert [p.record for p in pairs] == [0, 0, 5]
    ids = ["a", "b", "c", "d", "e", "f"]
    table = record_columns(ids, pairs, np.array([1.0, 2.5, -0.5]))
    assert table.schema == RM_SCHEMA
    rows = table.to_pylist()
    assert rows[0] == {"id": "a", "rm_score": 1.75, "rm_turns": [1.0, 2.5], "rm_reason": None}
    assert rows[5] == {"id": "f", "rm_score": -0.5, "rm_turns": [-0.5], "rm_reason": None}
    for row in rows[1:5]:
        assert math.isnan(row["rm_score"]) and row["rm_turns"] == []
        assert row["rm_reason"] == RM_NO_TURN
    with pytest.raises(ValueError, match="3 pairs but 2 scores"):
        record_columns(ids, pairs, [1.0, 2.0])


# ---- the stage's settings ----------------------------------------------------------------------


def _job(**block) -> SimpleNamespace:
    """Just enough of a JobSpec for `Stage.fingerprint` (the stages block)."""
    return SimpleNamespace(stages=SimpleNamespace(rm=RMSpec(**block)))


def test_settings_resources_and_fingerprint() -> None:
    spec = RMSpec(model="some/reward-model")
    assert spec.settings() == {
        "model": "some/reward-model",
        "revision": None,
        "max_length": 512,
        "max_turns": 1,
        "dtype": "float32",
        "trust_remote_code": False,
        "max_turns_counts": "scorable",  # what max_turns counts (engine.signals.turns)
    }
    assert (spec.resources.batch_size, spec.resources.max_batch_pairs) == (64, 16)
    base = STAGE.fingerprint(_job(model="m"))
    # Resources and the cache never change the numbers: same fingerprint.
    fast = {"resources": {"batch_size": 8, "max_batch_pairs": 2, "concurrency": 1}}
    assert STAGE.fingerprint(_job(model="m", cache={"enabled": False}, **fast)) == base
    for change in ({"model": "n"}, {"revision": "abc"}, {"max_turns": None}, {"dtype": "auto"}):
        assert STAGE.fingerprint(_job(**{"model": "m", **change})) != base, change
    # A resource key at the top of the block moves under resources:, with a warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = RMSpec(model="m", max_batch_pairs=4)
    assert legacy.resources.max_batch_pairs == 4
    assert any(issubclass(w.category, ConfigDeprecationWarning) for w in caught)


def test_a_job_without_a_reward_model_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"stages\.rm\.model"):
        check_model(RMSpec())
    with pytest.raises(ValueError, match=r"stages\.rm\.model"):
        check_model(RMSpec(model=""))
    assert STAGE.model_of(RMSpec()) == ""  # the fingerprint of an unset model still computes


# ---- a real reward model, trained here ---------------------------------------------------------


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict]) -> Path:
    """A MiniLM reward model trained on real Alpaca rows (tests/support/reward_model.py)."""
    out = tmp_path_factory.mktemp("reward-model") / "model"
    return train_reward_model(out, alpaca_rows[TRAIN_ROWS])


@pytest.fixture(scope="module")
def scorer(reward_model: Path):
    from engine.backends.reward import RewardScorer

    with RewardScorer(str(reward_model), dtype="float32", max_length=128, num_threads=2) as s:
        yield s


def test_trained_model_ranks_true_answers_above_shuffled_ones(
    scorer, alpaca_rows: list[dict]
) -> None:
    held = alpaca_pairs(alpaca_rows[HELD_OUT])
    wrong = shuffled_answers(held, random.Random(1))
    true_scores = scorer.score(held)
    wrong_scores = scorer.score([(q, w) for (q, _), w in zip(held, wrong, strict=True)])
    assert true_scores.dtype == np.float64 and true_scores.shape == (len(held),)
    accuracy = float(np.mean(true_scores > wrong_scores))
    assert accuracy >= ACCURACY_BOUND, accuracy


def test_batched_scores_equal_one_by_one(
    scorer, reward_model: Path, alpaca_rows: list[dict]
) -> None:
    from engine.backends.reward import RewardScorer

    pairs = alpaca_pairs(alpaca_rows[HELD_OUT][:20])
    pairs += [
        ("Say nothing.", ""),  # the backend scores any pair, an empty answer too
        ("word " * 300, "A long instruction must not crowd the answer out."),  # both sides cut
        ("Summarise.", "sentence " * 400),  # the answer is cut
    ]
    batched = scorer.score(pairs)
    assert scorer.max_batch_pairs == 16 and len(scorer.batches([5] * len(pairs))) == 2
    with RewardScorer(
        str(reward_model), dtype="float32", max_length=128, max_batch_pairs=1, num_threads=2
    ) as single:
        alone = np.array([single.score([pair])[0] for pair in pairs])
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)
    # Another order packs other batches: the same score per pair.
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    reordered = scorer.score([pairs[i] for i in order])
    np.testing.assert_allclose(reordered, alone[order], rtol=1e-5, atol=1e-5)
    assert scorer.score([]).shape == (0,)


def test_truncation_keeps_short_instructions_whole(scorer) -> None:
    tokenizer = scorer.tokenizer
    short_q, long_a = "Summarise this.", "sentence " * 400
    long_q, short_a = "word " * 300, "Fine."
    encoded = scorer.encode(
        [(short_q, long_a), ("word " * 300, "sentence " * 300), (long_q, short_a)]
    )
    assert all(len(e["input_ids"]) == 128 for e in encoded)
    q_ids = tokenizer(short_q, add_special_tokens=False)["input_ids"]
    assert encoded[0]["input_ids"][1 : 1 + len(q_ids)] == q_ids  # only the answer was cut
    types = np.array(encoded[1]["token_type_ids"])
    assert abs(int((types == 0).sum()) - int((types == 1).sum())) <= 2  # the room is shared
    answer = tokenizer(short_a, add_special_tokens=False)["input_ids"]
    assert encoded[2]["input_ids"][-1 - len(answer) : -1] == answer  # the short answer is whole


def test_a_classifier_head_is_refused(reward_model: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from engine.backends.reward import RewardScorer

    config = AutoConfig.from_pretrained(str(reward_model), num_labels=3)
    config.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"num_labels=1.*has 3"):
        RewardScorer(str(tmp_path))


def test_closed_scorer_refuses_work(reward_model: Path) -> None:
    from engine.backends.reward import RewardScorer

    scorer = RewardScorer(str(reward_model), dtype="float32", max_length=64)
    scorer.close()
    scorer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score([("q", "a")])


def test_actor_maps_a_batch_to_the_sidecar_rows(reward_model: Path, scorer) -> None:
    from engine.stages.rm import RewardActor

    conversations = [
        [_msg("user", "Name a primary colour."), _msg("assistant", "Red.")],
        [_msg("assistant", "Hello!")],
    ]
    batch = pa.table({"id": ["x", "y"], "conversation": conversations})
    actor = RewardActor(
        str(reward_model),
        max_turns=1,
        dtype="float32",
        max_length=128,
        max_batch_pairs=16,
        trust_remote_code=False,
        num_threads=2,
        use_gpu=False,
    )
    out = actor(batch)
    assert out.schema == RM_SCHEMA and out["id"].to_pylist() == ["x", "y"]
    expected = scorer.score([("Name a primary colour.", "Red.")])[0]
    assert out["rm_score"][0].as_py() == pytest.approx(expected, abs=1e-5)
    assert out["rm_reason"].to_pylist() == [None, RM_NO_TURN]


# ---- end to end through the pipeline -----------------------------------------------------------


def _registered() -> bool:
    from engine.stages.registry import BY_NAME

    return "rm" in BY_NAME


def _rm_info(runner) -> dict:
    """Run the job; the rm stage's counts as manifest.json records them."""
    runner.execute()
    manifest = json.loads(runner.run.manifest.read_text(encoding="utf-8"))
    return manifest["signals"]["rm"]


@pytest.mark.slow
@pytest.mark.usefixtures("spark", "ray_local")
@pytest.mark.skipif(not _registered(), reason="the rm stage is not in engine.stages.registry yet")
def test_rm_through_the_pipeline_ranks_filters_and_caches(
    tmp_path: Path, reward_model: Path, alpaca_rows: list[dict]
) -> None:
    from engine.config import parse_job
    from engine.pipeline import JobRunner

    rows = alpaca_rows[PIPELINE_ROWS]
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    chats = tmp_path / "chats.jsonl"
    greeting = {"messages": [_msg("assistant", "Hello! Ask me anything about gardening.")]}
    chats.write_text(json.dumps(greeting), encoding="utf-8")
    cache = tmp_path / "cache"

    def job(filters: list[dict] | None = None):
        select = {"score": "rm_score", "budget": 5, "dedup": NO_DEDUP}
        if filters is not None:
            select["filters"] = filters
        return parse_job(
            {
                "inputs": [{"path": str(alpaca)}, {"path": str(chats), "format": "messages"}],
                "signals": ["rm"],
                "stages": {
                    "rm": {
                        "model": str(reward_model),
                        "max_length": 128,
                        "resources": {"batch_size": 8, "num_cpus": 1},
                        "cache": {"dir": str(cache)},
                    }
                },
                "select": select,
            }
        )

    info = _rm_info(JobRunner(job(), tmp_path / "run1"))
    total = len(rows) + 1
    assert (info["cache_hits"], info["cache_misses"]) == (0, total)
    scores = pd.read_parquet(tmp_path / "run1" / "scores.parquet")
    assert len(scores) == total
    alpaca_scores = scores[scores["source"] == str(alpaca)]
    assert alpaca_scores["rm_score"].notna().all()
    assert alpaca_scores["rm_reason"].isna().all()
    lone = scores[scores["source"] == str(chats)].iloc[0]
    assert math.isnan(lone["rm_score"]) and lone["rm_reason"] == RM_NO_TURN
    assert not lone["selected"] and lone["reason"] is not None

    # The selection is the top 5 by rm_score among the rows no filter rejected.
    eligible = scores[scores["reason"].isna() | (scores["reason"] == "below_budget")]
    top = set(eligible.nlargest(5, "rm_score")["id"])
    assert set(scores.loc[scores["selected"], "id"]) == top and len(top) == 5

    # The scores equal scoring the same pairs directly with the backend.
    from engine.backends.reward import RewardScorer

    with RewardScorer(str(reward_model), dtype="float32", max_length=128) as direct:
        expected = direct.score(alpaca_pairs(rows))
    got = alpaca_scores.sort_values("row")["rm_score"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # A second run (another run directory, a filter on rm_score) reads every score from the
    # cache; the filter rejects exactly the rows below its threshold.
    threshold = float(alpaca_scores["rm_score"].median())
    rule = {"reject_if": f"rm_score < {threshold!r}", "reason": "low_reward"}
    info = _rm_info(JobRunner(job([rule]), tmp_path / "run2"))
    assert (info["cache_hits"], info["cache_misses"]) == (total, 0)
    again = pd.read_parquet(tmp_path / "run2" / "scores.parquet")
    merged = again.merge(scores[["id", "rm_score"]], on="id", suffixes=("", "_first"))
    np.testing.assert_array_equal(merged["rm_score"], merged["rm_score_first"])
    low = again["rm_score"] < threshold
    assert (again.loc[low, "reason"] == "low_reward").all() and low.sum() > 0
    assert (again.loc[again["reason"] == "low_reward", "rm_score"] < threshold).all()
    assert not again.loc[low, "selected"].any()
    assert again["selected"].sum() == 5
