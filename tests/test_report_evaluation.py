"""The report's Evaluation section and `winnow compare`'s table (compare.json, compare.html).

The eval files are hand-written in the layout the stages write (design: `eval/train/<arm>/
loss.json`, `eval/results.json`), with results.json's numbers produced by the real arithmetic
(engine.evaluation.winning_rate) over hand-made judgements whose outcomes are worked out below.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.evaluation import (
    alpacaeval_rate,
    bootstrap_interval,
    fastchat_rate,
    winning_rates_by_set,
)
from engine.evaluation.compare_table import (
    MethodInputs,
    build_compare,
    jaccard,
    mean_answer_chars,
    overlap_matrix,
    render_compare_html,
    scoring_cost,
)
from engine.manifest import Counts, IngestSummary, Manifest, Outputs, StageRecord
from engine.report import render_report

EVIL = "<script>alert(1)</script>"
NAN = math.nan
SMOKE = "a 135M model judged by itself is a smoke test of the loop, not a quality claim"
# Hand-worked outcomes (model 1 = the arm): vicuna win, tie, loss -> 1 / 1 / 1, rate 1.0;
# koala win, lose+win = tie, unparsed -> 1 / 1 / 0 (+1 unparsed), rate 1.5;
# pooled 2 / 2 / 1 (+1 unparsed): (2 - 1) / 5 + 1 = 1.2.
JUDGEMENTS = {
    "vicuna": [(8.0, 6.0, 7.0, 5.0), (5.0, 5.0, 5.0, 5.0), (3.0, 7.0, 4.0, 6.0)],
    "koala": [(9.0, 2.0, 9.0, 2.0), (4.0, 7.0, 8.0, 5.0), (NAN, 6.0, 7.0, 5.0)],
}
EXPECTED = {"vicuna": (1, 1, 1, 0, 1.0), "koala": (1, 1, 0, 1, 1.5), "pooled": (2, 2, 1, 1, 1.2)}
RECIPE = {"base_model": "builtin:smollm2-135m", "max_steps": 6, "learning_rate": 0.0002}


def pair_results(arm: str, baseline: str = "random") -> dict[str, Any]:
    """One results.json pair entry, computed by the real functions."""
    per_set, pooled = winning_rates_by_set(JUDGEMENTS)
    every = [j for js in JUDGEMENTS.values() for j in js]
    return {
        "arm": arm,
        "baseline": baseline,
        "sets": {name: wr.as_dict() for name, wr in per_set.items()},
        "pooled": pooled.as_dict(),
        "interval": list(bootstrap_interval(JUDGEMENTS, 0.95, 500, seed=0)),
        "level": 0.95,
        "fastchat": fastchat_rate(every).as_dict(),
        "alpacaeval": alpacaeval_rate(every).as_dict(),
    }


def results_json(judge: str = "builtin:smollm2-135m") -> dict[str, Any]:
    return {
        "judge": {"model": judge, "prompt": "cherry", "note": EVIL},
        "pairs": {"selected_vs_random": pair_results("selected")},
    }


def loss_json(arm: str, drop: float) -> dict[str, Any]:
    return {
        "arm": arm,
        "train": [[1, 2.5], [2, 2.5 - drop], [3, 2.5 - 2 * drop]],
        "eval": [[3, 2.6 - drop]],
        "steps": 3,
        "rows": 48,
        "train_rows": 44,
        "eval_rows": 4,
        "seconds": 21.5,
        "resumed_from_step": None,
    }


def write_eval(root: Path, judge: str = "builtin:smollm2-135m") -> Path:
    """A run directory's eval/ folder as the three stages leave it."""
    for arm, drop in (("selected", 0.3), ("random", 0.2)):
        folder = root / "eval" / "train" / arm
        folder.mkdir(parents=True)
        (folder / "loss.json").write_text(json.dumps(loss_json(arm, drop)), encoding="utf-8")
    (root / "eval" / "results.json").write_text(json.dumps(results_json(judge)), encoding="utf-8")
    return root


def eval_manifest(root: Path, judge: str = "builtin:smollm2-135m", **extra: Any) -> Manifest:
    out = str(root)
    return Manifest(
        run_id="eval-run",
        started_at="2026-11-29T06:00:00Z",
        out=out,
        config={
            "eval": {"arms": ["selected", "random"], "baseline": "random"},
            "stages": {
                "train": {**RECIPE, "resources": {"num_workers": 1}},
                "judge_pairwise": {"model": judge, "prompt": "cherry"},
            },
        },
        counts=Counts(input=0, quarantined=0, selected=0),
        ingest=IngestSummary(ingested=0, unique=0, exact_duplicates=0),
        evaluation={
            "train": {"arms": 2, "curve": [[step, 2.0] for step in range(300)]},
            "generate": {"prompts": 6},
            "judge_pairwise": {},
        },
        outputs=Outputs(
            selected=f"{out}/selected.jsonl",
            random_baseline=f"{out}/random_baseline.jsonl",
            scores=f"{out}/scores.parquet",
            quarantine=f"{out}/quarantine.jsonl",
            report=f"{out}/report.html",
        ),
        **extra,
    )


def _table(page: str, table_id: str) -> list[list[str]]:
    body = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r, flags=re.S) for r in rows]
    return [[html.unescape(c) for c in row] for row in cells if row]  # the header has no <td>


# --- the Evaluation section -----------------------------------------------------------------


def test_section_shows_rates_losses_and_the_smoke_line(tmp_path: Path) -> None:
    root = write_eval(tmp_path / "run")
    page = render_report(None, eval_manifest(root))
    assert 'id="evaluation"' in page and "<script" not in page and EVIL not in page
    rows = {(r[0], r[1]): r[2:] for r in _table(page, "eval-rates-table")}
    pair = "selected_vs_random"
    for name, (wins, ties, losses, unparsed, rate) in EXPECTED.items():
        assert rows[(pair, name)][:5] == [
            str(wins),
            str(ties),
            str(losses),
            str(unparsed),
            f"{rate:.3f}",
        ]
    lo, hi = pair_results("selected")["interval"]
    assert rows[(pair, "pooled")][5] == f"95% [{lo:.3f}, {hi:.3f}]"
    # FastChat / AlpacaEval: (wins + ties / 2) / judged over the orders' verdicts, in [0, 1]
    for cell in rows[(pair, "pooled")][6:8]:
        assert 0 <= float(cell) <= 1
    assert SMOKE in page
    losses = {r[0]: r for r in _table(page, "eval-loss-table")}
    assert set(losses) == {"selected", "random"}
    assert losses["selected"][5] == "1.90" and losses["random"][6] == "2.40"
    assert page.count('src="data:image/png;base64,') == 2  # loss curves, one W/T/L plot
    recipe = dict(r for r in _table(page, "eval-recipe-table"))
    assert recipe == {k: str(v) for k, v in RECIPE.items()}  # resources left out
    assert "1 judgements could not be parsed" in page
    stages = page.split('id="eval-stages"', 1)[1].split("</details>", 1)[0]
    assert "<h3>train</h3>" in stages and "chars]" in stages  # the long loss list is cut


def test_no_smoke_line_for_another_judge(tmp_path: Path) -> None:
    root = write_eval(tmp_path / "run", judge="Qwen/Qwen2.5-72B-Instruct")
    page = render_report(None, eval_manifest(root, judge="Qwen/Qwen2.5-72B-Instruct"))
    assert 'id="evaluation"' in page and SMOKE not in page


def test_no_section_without_an_eval_block(tmp_path: Path) -> None:
    manifest = eval_manifest(write_eval(tmp_path / "run")).model_copy(update={"evaluation": None})
    assert 'id="evaluation"' not in render_report(None, manifest)


@pytest.mark.parametrize("damage", ["missing", "not-json", "no-pairs"])
def test_damaged_results_become_a_note(tmp_path: Path, damage: str) -> None:
    root = write_eval(tmp_path / "run")
    results = root / "eval" / "results.json"
    if damage == "missing":
        results.unlink()
    elif damage == "not-json":
        results.write_text('{"pairs": {', encoding="utf-8")
    else:
        results.write_text("[1, 2]", encoding="utf-8")
    (root / "eval" / "train" / "random" / "loss.json").write_text("garbage", encoding="utf-8")
    page = render_report(None, eval_manifest(root))
    section = page.split('id="evaluation"', 1)[1].split("</section>", 1)[0]
    expected = {"missing": "is missing", "not-json": "is damaged", "no-pairs": "no `pairs`"}
    assert expected[damage] in section
    assert "loss curve of arm random" in section and "is damaged" in section
    assert 'id="eval-rates-table"' not in section
    assert [r[0] for r in _table(section, "eval-loss-table")] == ["selected"]
    assert SMOKE in section  # the judge still known from the job's config
    assert 'id="run"' in page  # the rest of the report survived


# --- compare builders -----------------------------------------------------------------------


def test_jaccard_hand_worked() -> None:
    assert jaccard({"a", "b", "c"}, {"b", "c", "d"}) == 0.5
    assert jaccard({"a"}, {"b"}) == 0.0
    assert jaccard(set(), set()) == 1.0
    assert jaccard({"a", "b"}, {"a", "b"}) == 1.0


ids = st.frozensets(st.sampled_from("abcdefgh"))


@given(st.dictionaries(st.sampled_from(["x", "y", "z", "w"]), ids, min_size=1))
def test_overlap_is_symmetric_with_ones_on_the_diagonal(selections: dict) -> None:
    matrix = overlap_matrix(selections)
    assert list(matrix) == list(selections)
    for a in selections:
        assert matrix[a][a] == 1.0
        for b in selections:
            assert matrix[a][b] == matrix[b][a] == jaccard(selections[a], selections[b])
            assert 0.0 <= matrix[a][b] <= 1.0


def test_mean_answer_chars(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Say hi", "input": "", "output": "abcd"},  # 4
        {
            "conversations": [  # two answers: 2 + 1
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "xy"},
                {"from": "human", "value": "again"},
                {"from": "gpt", "value": "z"},
            ]
        },
    ]
    path = tmp_path / "selected.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert mean_answer_chars(path) == 3.5
    assert (
        mean_answer_chars(
            [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "abc"}]]
        )
        == 3.0
    )
    assert mean_answer_chars([]) is None


def _run(root: Path, selected: list[str], tokens: list[int]) -> Path:
    """A finished scoring run: scores.parquet (ids a..e, one duplicate), selected.jsonl."""
    root.mkdir(parents=True)
    ids = ["a", "b", "c", "d", "e"]
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "selected": [i in selected for i in ids],
                "tokens_chat": tokens,
                "dup_of": [None, None, None, None, "a"],
            }
        ),
        root / "scores.parquet",
    )
    lines = [
        {"id": i, "instruction": f"q{i}", "input": "", "output": "x" * (10 * (k + 1))}
        for k, i in enumerate(ids)
        if i in selected
    ]
    (root / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), "utf-8")
    return root


SIGNALS = {
    "lm": {"rows": 4, "cache_hits": 1, "cache_misses": 3, "model": "builtin:smollm2-135m"},
    "embed": {"rows": 4, "cache_hits": 0, "cache_misses": 4, "model": "builtin:minilm"},
    "tokens": {"rows": 4, "model": "builtin:smollm2-135m"},
    "lang": {"rows": 4},
}
STAGES = [
    StageRecord(name="ingest", engine="spark", version=1, fingerprint="f", seconds=9.0),
    StageRecord(name="lang", engine="spark", version=1, fingerprint="f", seconds=1.5),
    StageRecord(name="tokens", engine="ray", version=1, fingerprint="f", seconds=2.0),
    StageRecord(name="embed", engine="ray", version=1, fingerprint="f", seconds=4.0, skipped=True),
    StageRecord(name="lm", engine="ray", version=1, fingerprint="f", seconds=10.0),
    StageRecord(name="select", engine="driver", version=1, fingerprint="f", seconds=0.5),
]


def test_scoring_cost(tmp_path: Path) -> None:
    run = _run(tmp_path / "r", ["a"], [10, 20, 30, 40, 100])
    manifest = eval_manifest(run, signals=SIGNALS, stages=STAGES)
    cost = scoring_cost(manifest, run)
    assert cost["seconds"] == 1.5 + 2.0 + 4.0 + 10.0  # signal stages only, skipped at its time
    assert cost["model_stages"] == ["lm", "embed"]
    assert cost["tokens"] == 2 * (10 + 20 + 30 + 40)  # the duplicate row is not scored
    assert cost["cached_rows"] == 1 and cost["skipped"] == ["embed"]
    counted = {**SIGNALS, "lm": {**SIGNALS["lm"], "tokens": 7}}
    assert scoring_cost(eval_manifest(run, signals=counted), run)["tokens"] == 7 + 100
    assert scoring_cost(eval_manifest(run, signals=SIGNALS), None)["tokens"] is None


def _methods(tmp_path: Path, judge: str = "builtin:smollm2-135m") -> dict[str, MethodInputs]:
    random_run = _run(tmp_path / "random", ["a", "b"], [10, 20, 30, 40, 100])
    ifd_run = _run(tmp_path / "ifd", ["b", "c", "d"], [10, 20, 30, 40, 100])
    return {
        "random": MethodInputs(
            random_run, eval_manifest(random_run, judge, signals=SIGNALS, stages=STAGES)
        ),
        "ifd": MethodInputs(
            ifd_run,
            eval_manifest(ifd_run, judge, signals=SIGNALS, stages=STAGES),
            results_json(judge),
        ),
    }


def test_build_compare(tmp_path: Path) -> None:
    compare = build_compare(_methods(tmp_path), baseline="random")
    json.dumps(compare, allow_nan=False)  # strict JSON
    assert compare["baseline"] == "random" and compare["prompts"] == 6
    random, ifd = compare["methods"]["random"], compare["methods"]["ifd"]
    assert random["winning_rate"] is None and random["rows"] == 2
    assert ifd["rows"] == 3
    assert random["mean_answer_chars"] == (10 + 20) / 2 and ifd["mean_answer_chars"] == 30.0
    wr = ifd["winning_rate"]
    for name, (wins, ties, losses, unparsed, rate) in EXPECTED.items():
        block = wr["pooled"] if name == "pooled" else wr["sets"][name]
        assert (block["wins"], block["ties"], block["losses"], block["unparsed"]) == (
            wins,
            ties,
            losses,
            unparsed,
        )
        assert block["rate"] == pytest.approx(rate)
    assert wr["interval"][0] <= 1.2 <= wr["interval"][1]
    assert 0 <= wr["fastchat"]["rate"] <= 1 and 0 <= wr["alpacaeval"]["rate"] <= 1
    assert compare["overlap"] == {
        "random": {"random": 1.0, "ifd": 0.25},  # {b} / {a, b, c, d}
        "ifd": {"random": 0.25, "ifd": 1.0},
    }
    assert ifd["cost"]["seconds"] == 17.5 and ifd["cost"]["tokens"] == 200
    assert compare["recipe"] == RECIPE and compare["recipe_differs"] == []
    assert compare["judge"]["model"] == "builtin:smollm2-135m"
    with pytest.raises(ValueError, match="baseline"):
        build_compare(_methods(tmp_path / "again"), baseline="longest")


def test_compare_html(tmp_path: Path) -> None:
    page = render_compare_html(build_compare(_methods(tmp_path), baseline="random"))
    assert "<script" not in page and EVIL not in page and html.escape(EVIL) in page
    rows = {r[0]: r for r in _table(page, "compare-table")}
    assert set(rows) == {"random (baseline)", "ifd"}
    assert rows["ifd"][2] == "1.200" and rows["ifd"][4:8] == ["2", "2", "1", "1"]
    assert rows["ifd"][10] == "30" and rows["random (baseline)"][10] == "15"
    assert page.count('src="data:image/png;base64,') == 2  # winning rates, one W/T/L plot
    assert _table(page, "compare-overlap-table")[0] == ["random", "1.00", "0.25"]
    assert SMOKE in page
    other = render_compare_html(build_compare(_methods(tmp_path / "q", "Qwen/Q"), "random"))
    assert SMOKE not in other
