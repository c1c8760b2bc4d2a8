"""engine.signals.turns: which assistant turns are scored, how `max_turns` counts them, and how
the counting rule enters the LM, judge and reward-model fingerprints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.signals.judge import plan_judge_turns
from engine.signals.lm import plan_turns
from engine.signals.rm import plan_pairs
from engine.signals.turns import AssistantTurn, scorable_turns, turn_rule_settings
from engine.stages.judge import STAGE as JUDGE_STAGE
from engine.stages.judge import JudgeSpec, judge_cache_keys
from engine.stages.lm import STAGE as LM_STAGE
from engine.stages.lm import LMSpec
from engine.stages.rm import STAGE as RM_STAGE
from engine.stages.rm import RMSpec


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# A ShareGPT fragment cut from a longer chat: it opens with an assistant message that has no
# instruction before it, then a blank answer, then two real exchanges.
FRAGMENT = [
    _m("assistant", "...and that is why the sky is blue."),  # turn 0: no user turn before it
    _m("user", "Thanks. What about sunsets?"),
    _m("assistant", "   "),  # turn 1: blank
    _m("user", "Hello?"),
    _m("assistant", "Sunsets are red because light crosses more air."),  # turn 2
    _m("user", "And clouds?"),
    _m("assistant", "Clouds scatter all wavelengths alike."),  # turn 3
]


def test_max_turns_keeps_the_first_scorable_turns_with_stable_numbers() -> None:
    every = list(scorable_turns(FRAGMENT))
    assert every == [AssistantTurn(2, 4, 3), AssistantTurn(3, 6, 5)]
    # max_turns counts scorable turns: 1 keeps the first one that can be scored, not the
    # opening fragment (the rule before issue 11 scored nothing here).
    assert list(scorable_turns(FRAGMENT, 1)) == every[:1]
    assert list(scorable_turns(FRAGMENT, 2)) == every
    assert list(scorable_turns(FRAGMENT, 5)) == every
    # A turn's number is its place among the assistant messages, whatever max_turns is.
    assert [t.turn for t in scorable_turns(FRAGMENT, 1)] == [2]


def test_user_turn_may_be_further_back_and_system_turns_do_not_count() -> None:
    chat = [
        _m("system", "be brief"),
        _m("user", "Q"),
        _m("system", "note"),
        _m("assistant", "A"),
        _m("assistant", "A, continued"),
    ]
    assert list(scorable_turns(chat, 2)) == [AssistantTurn(0, 3, 1), AssistantTurn(1, 4, 1)]
    assert list(scorable_turns([_m("user", "Q")])) == []
    assert list(scorable_turns([])) == []
    with pytest.raises(ValueError, match="max_turns"):
        list(scorable_turns(chat, 0))


def test_lm_judges_and_rm_score_the_same_turns() -> None:
    from transformers import AutoTokenizer

    from engine.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m"))
    for max_turns in (1, 2, None):
        lm = [(p.record, p.turn) for p in plan_turns(tokenizer, [FRAGMENT], "chat", 256, max_turns)]
        judge = [(t.record, t.turn) for t in plan_judge_turns([FRAGMENT], max_turns)]
        rm = [(p.record, p.turn) for p in plan_pairs([FRAGMENT], max_turns)]
        assert lm == judge == rm == [(0, 2), (0, 3)][: max_turns or 2], max_turns
    # The instruction of a scored turn is the user turn just before it.
    assert plan_pairs([FRAGMENT], 1)[0].instruction == "Hello?"


def _fingerprints(stage, spec_type, block_key: str, **block) -> str:
    job = SimpleNamespace(stages=SimpleNamespace(**{block_key: spec_type(**block)}))
    return stage.fingerprint(job)


def test_counting_rule_enters_fingerprints_only_when_max_turns_is_set() -> None:
    assert turn_rule_settings(None) == {}
    assert turn_rule_settings(3) == {"max_turns_counts": "scorable"}
    for spec_type, extra in ((LMSpec, {}), (JudgeSpec, {}), (RMSpec, {"model": "m"})):
        unlimited = spec_type(**extra, max_turns=None).settings()
        assert "max_turns_counts" not in unlimited  # caches of unlimited runs stay valid
        assert spec_type(**extra, max_turns=2).settings()["max_turns_counts"] == "scorable"
    # The stage fingerprints still tell max_turns values apart.
    for stage, spec_type, key, extra in (
        (LM_STAGE, LMSpec, "lm", {}),
        (RM_STAGE, RMSpec, "rm", {"model": "m"}),
    ):
        prints = {_fingerprints(stage, spec_type, key, **extra, max_turns=n) for n in (None, 1, 2)}
        assert len(prints) == 3
    assert JUDGE_STAGE.name == "judge"


def test_judge_cache_keys_carry_the_counting_rule() -> None:
    from engine.config import parse_job

    def keys(max_turns: int | None) -> dict[str, str]:
        job = parse_job(
            {
                "inputs": [{"path": "data.jsonl"}],
                "signals": ["judge.alpagasus"],
                "select": {"budget": 10},
                "stages": {"judge": {"max_turns": max_turns}},
            }
        )
        return judge_cache_keys(job)

    assert len({keys(None)["alpagasus"], keys(1)["alpagasus"], keys(2)["alpagasus"]}) == 3
