"""The report's Evaluation section: what the `eval:` block's stages left under `<run>/eval/`.

Read only: the loss curves (`eval/train/<arm>/loss.json`) and the judged pairs
(`eval/results.json`), both written by engine.evaluation. A file that is missing or damaged (a
stage failed, a run was copied without it) becomes a visible note on the page, never an
exception: the rest of the report must survive a broken evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.manifest import Manifest
from engine.report import eval_plots
from engine.report.format import as_number, truncate
from engine.report.plots import Figure
from engine.report.summary import kv_table
from engine.report.tables import Table

__all__ = [
    "SMOKE_JUDGE",
    "EvaluationSection",
    "judge_model",
    "rate_of",
    "read_json",
    "section",
]

# A 135M model judging its own fine-tunes can only show that the loop runs end to end.
SMOKE_JUDGE = "builtin:smollm2-135m"
SMOKE_LINE = (
    "The judge is the built-in 135M model ({model}): a 135M model judged by itself is a smoke "
    "test of the loop, not a quality claim."
)
RECIPE_SKIP = ("resources",)  # where the training ran, not what it trained


@dataclass
class EvaluationSection:
    """Everything the evaluation template shows (plain values; the template escapes)."""

    arms: list[str]
    baseline: str | None
    pairs: list[str]
    loss_figure: Figure | None = None
    losses: Table | None = None
    wtl_figures: list[Figure] = field(default_factory=list)
    rates: Table | None = None
    judge: Table | None = None
    recipe: Table | None = None
    smoke: str | None = None
    notes: list[str] = field(default_factory=list)
    stages: dict[str, Table] = field(default_factory=dict)


def read_json(path: Path, what: str) -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, a note saying why it could not be read)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{what}: {path} is missing (did its stage fail?)"
    except OSError as exc:
        return None, f"{what}: {path} cannot be read ({type(exc).__name__}: {exc})"
    try:
        return json.loads(text), None
    except ValueError as exc:
        return None, f"{what}: {path} is damaged (not JSON: {exc})"


def rate_of(value: Any) -> float | None:
    """A rate from results.json: a number, or a dict's `rate` (FastChat/AlpacaEval blocks)."""
    if isinstance(value, Mapping):
        value = value.get("rate")
    return as_number(value)


def _count(value: Any) -> int | None:
    number = as_number(value)
    return int(number) if number is not None and number == int(number) else None


def _stage_block(manifest: Manifest, name: str) -> Mapping[str, Any]:
    stages = manifest.config.get("stages")
    block = stages.get(name) if isinstance(stages, Mapping) else None
    return block if isinstance(block, Mapping) else {}


def judge_model(manifest: Manifest, results: Mapping[str, Any] | None = None) -> str | None:
    """The pairwise judge's model: results.json's judge block first, else the job's config."""
    if isinstance(results, Mapping) and isinstance(results.get("judge"), Mapping):
        model = results["judge"].get("model")
        if isinstance(model, str):
            return model
    model = _stage_block(manifest, "judge_pairwise").get("model")
    return model if isinstance(model, str) else None


def _arms(manifest: Manifest) -> tuple[list[str], str | None]:
    """Trained arms and the baseline, from the job's `eval:` block (defaults as in EvalSpec)."""
    block = manifest.config.get("eval")
    block = block if isinstance(block, Mapping) else {}
    arms = block.get("arms")
    arms = [a for a in arms if isinstance(a, str)] if isinstance(arms, list) else []
    baseline = block.get("baseline")
    return arms or ["selected", "random"], baseline if isinstance(baseline, str) else None


def _losses(root: Path, arms: list[str], notes: list[str]) -> dict[str, dict[str, Any]]:
    """Each trained arm's loss.json, checked enough that the plot cannot choke on it."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        data, note = read_json(root / "train" / arm / "loss.json", f"loss curve of arm {arm}")
        if note:
            notes.append(note)
            continue
        if not isinstance(data, Mapping):
            notes.append(f"loss curve of arm {arm}: loss.json is not an object")
            continue
        curves = {}
        for part in ("train", "eval"):
            points = data.get(part) or []
            good = [
                (float(p[0]), float(p[1]))
                for p in points
                if isinstance(p, list | tuple)
                and len(p) == 2
                and as_number(p[0]) is not None
                and as_number(p[1]) is not None
            ]
            if len(good) != len(points):
                notes.append(
                    f"loss curve of arm {arm}: {len(points) - len(good)} bad {part} points"
                )
            curves[part] = good
        out[arm] = {**data, **curves}
    return out


def _loss_table(losses: Mapping[str, Mapping[str, Any]]) -> Table:
    rows = []
    for arm, data in losses.items():
        last_train = data["train"][-1][1] if data["train"] else None
        last_eval = data["eval"][-1][1] if data["eval"] else None
        rows.append(
            [
                arm,
                _count(data.get("rows")),
                _count(data.get("train_rows")),
                _count(data.get("eval_rows")),
                _count(data.get("steps")),
                last_train,
                last_eval,
                as_number(data.get("seconds")),
                _count(data.get("resumed_from_step")),
            ]
        )
    return Table(
        id="eval-loss-table",
        headers=[
            "arm",
            "rows",
            "train rows",
            "eval rows",
            "steps",
            "last train loss",
            "last eval loss",
            "seconds",
            "resumed from step",
        ],
        rows=rows,
        num_columns={1, 2, 3, 4, 5, 6, 7, 8},
    )


def _interval(pair: Mapping[str, Any]) -> str:
    interval = pair.get("interval")
    if not isinstance(interval, list | tuple) or len(interval) != 2:
        return "–"
    lo, hi = (as_number(v) for v in interval)
    if lo is None or hi is None:
        return "–"
    level = as_number(pair.get("level"))
    prefix = f"{level:.0%} " if level is not None else ""
    return f"{prefix}[{lo:.3f}, {hi:.3f}]"


def _rate_cell(value: Any) -> str:
    rate = rate_of(value)
    return "–" if rate is None or math.isnan(rate) else f"{rate:.3f}"


def _counts_row(label: str, block: Any) -> list[Any]:
    block = block if isinstance(block, Mapping) else {}
    return [
        label,
        *(_count(block.get(k)) for k in ("wins", "ties", "losses", "unparsed")),
        _rate_cell(block),
    ]


def _rates_table(pairs: Mapping[str, Mapping[str, Any]]) -> Table:
    """Per pair: one row per set, then the pooled row with its interval and the other rates."""
    rows: list[list[Any]] = []
    for name, pair in pairs.items():
        sets = pair.get("sets") if isinstance(pair.get("sets"), Mapping) else {}
        for set_name, block in sets.items():
            rows.append([name, *_counts_row(str(set_name), block), "", "", ""])
        rows.append(
            [
                name,
                *_counts_row("pooled", pair.get("pooled")),
                _interval(pair),
                _rate_cell(pair.get("fastchat")),
                _rate_cell(pair.get("alpacaeval")),
            ]
        )
    return Table(
        id="eval-rates-table",
        headers=[
            "pair",
            "set",
            "wins",
            "ties",
            "losses",
            "unparsed",
            "winning rate",
            "interval",
            "FastChat (0–1)",
            "AlpacaEval (0–1)",
        ],
        rows=rows,
        num_columns={2, 3, 4, 5, 6, 7, 8, 9},
    )


def _pairs(results: Any, notes: list[str]) -> dict[str, Mapping[str, Any]]:
    if not isinstance(results, Mapping) or not isinstance(results.get("pairs"), Mapping):
        notes.append("results.json has no `pairs` object: no winning rates to show")
        return {}
    pairs = {str(k): v for k, v in results["pairs"].items() if isinstance(v, Mapping)}
    for name, pair in pairs.items():
        pooled = pair.get("pooled") if isinstance(pair.get("pooled"), Mapping) else {}
        unparsed = _count(pooled.get("unparsed"))
        if unparsed:
            notes.append(
                f"{name}: {unparsed:,} judgements could not be parsed; they are left out of the "
                "rate (never counted as ties)"
            )
    return pairs


def _plot(notes: list[str], what: str, make: Any, *args: Any) -> Any:
    try:
        return make(*args)
    except Exception as exc:  # a broken plot must never cost the run its report
        notes.append(f"plot failed — {what}: {type(exc).__name__}: {exc}")
        return None


def _stage_table(info: Mapping[str, Any]) -> Table:
    """A stage's info as key/value rows, long values (per-step loss lists) cut to stay readable."""
    table = kv_table(info)
    table.rows = [[k, truncate(v) if isinstance(v, str) else v] for k, v in table.rows]
    return table


def section(manifest: Manifest, run_root: Path | None = None) -> EvaluationSection | None:
    """The Evaluation section, or None when the run had no `eval:` block."""
    if manifest.evaluation is None:
        return None
    root = Path(run_root if run_root is not None else manifest.out) / "eval"
    arms, baseline = _arms(manifest)
    notes: list[str] = []
    out = EvaluationSection(arms=arms, baseline=baseline, pairs=[])

    losses = _losses(root, arms, notes)
    if losses:
        out.losses = _loss_table(losses)
        out.loss_figure = _plot(notes, "loss curves", eval_plots.loss_curves, losses)

    results, note = read_json(root / "results.json", "judged pairs")
    if note:
        notes.append(note)
    else:
        pairs = _pairs(results, notes)
        out.pairs = list(pairs)
        if pairs:
            out.rates = _rates_table(pairs)
        for name, pair in pairs.items():
            figure = _plot(notes, f"W/T/L of {name}", eval_plots.wtl_bars, name, pair)
            if figure is not None:
                out.wtl_figures.append(figure)
        if isinstance(results, Mapping) and isinstance(results.get("judge"), Mapping):
            out.judge = kv_table(results["judge"], "eval-judge-table")

    model = judge_model(manifest, results if isinstance(results, Mapping) else None)
    if out.judge is None and model is not None:
        out.judge = kv_table({"model": model}, "eval-judge-table")
    if model == SMOKE_JUDGE:
        out.smoke = SMOKE_LINE.format(model=model)
    recipe = {k: v for k, v in _stage_block(manifest, "train").items() if k not in RECIPE_SKIP}
    if recipe:
        out.recipe = kv_table(recipe, "eval-recipe-table")
    out.stages = {
        name: _stage_table(info) for name, info in (manifest.evaluation or {}).items() if info
    }
    out.notes = notes
    return out
