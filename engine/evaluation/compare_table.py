"""`winnow compare`'s table: one row per selection method, built from finished runs.

Given each method's run directory, manifest and judged pair (results.json's entry for
`<method>_vs_<baseline>`), this builds `compare.json`'s dict and renders `compare.html`. No model,
Spark or Ray here: the builders are plain functions over files the runs already wrote, so the
table can be rebuilt (or tested) without redoing any work.

Columns and why: the winning rate against the baseline (per set and pooled, with its interval,
FastChat's and AlpacaEval's rates beside it); the mean answer length of the selection, the
confound the literature warns about (judges favour longer answers, and a method that picks long
rows can win on length alone); the scoring cost (seconds measured, tokens the model-backed signal
stages read); and the pairwise overlap (Jaccard) of the selections, since two methods that pick
the same rows cannot differ in their results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.manifest import Manifest

__all__ = [
    "MethodInputs",
    "build_compare",
    "jaccard",
    "mean_answer_chars",
    "overlap_matrix",
    "render_compare_html",
    "scoring_cost",
    "selection_ids",
]

# Signal stages that count or parse text without a model forward pass: no model tokens.
NO_MODEL_TOKENS = frozenset({"tokens", "lang", "minhash"})
TOKENS_HOW = (
    "per model-backed signal stage the run computed (lm, judge, rm, embed): the stage's own "
    "token count where its info carries one, else the sum of `tokens_chat` (whole chat, the "
    "tokens signal's tokenizer) over the unique rows it scored — a lower bound that leaves out "
    "judge prompt templates and generated tokens; cache hits count too (the work the method "
    "needs, not what this run recomputed)"
)
SECONDS_HOW = (
    "wall seconds of the run's signal stages; a stage complete from an earlier run counts that "
    "run's time; rows served from the shared score cache cost little (see cached_rows)"
)
SETTINGS_SKIP = ("resources", "cache")  # where and how a stage ran, not what it computed


@dataclass(frozen=True)
class MethodInputs:
    """One compared method: its run directory, its manifest, and its judged pair.

    `results` is results.json's pair entry for `<method>_vs_<baseline>` (or the whole
    results.json; None for the baseline itself); `judge` optionally results.json's judge block.
    """

    run: Path
    manifest: Manifest
    results: Mapping[str, Any] | None = None
    judge: Mapping[str, Any] | None = None


def jaccard(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty selections are identical (1.0)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def overlap_matrix(selections: Mapping[str, set[str]]) -> dict[str, dict[str, float]]:
    """Jaccard overlap of every pair of selections (symmetric, 1.0 on the diagonal)."""
    names = list(selections)
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for i, a in enumerate(names):
        out[a][a] = 1.0
        for b in names[i + 1 :]:
            out[a][b] = out[b][a] = jaccard(selections[a], selections[b])
    return out


def _conversations_from_jsonl(path: Path) -> Iterable[list[dict[str, str]]]:
    """Exported rows (any input schema Winnow reads) as canonical conversations."""
    from engine.records import RecordError, detect_schema, to_canonical

    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            schema = detect_schema(record) if isinstance(record, Mapping) else None
            if schema is None:
                raise ValueError(f"{path}: a row in no schema Winnow reads: {line[:80]!r}")
            try:
                yield to_canonical(record, schema).conversation
            except RecordError as exc:
                raise ValueError(f"{path}: a row Winnow would not ingest ({exc})") from exc


def mean_answer_chars(
    source: str | Path | Iterable[Sequence[Mapping[str, Any]]],
) -> float | None:
    """Mean characters of the assistant turns per row of a selection (None when empty).

    `source` is an exported JSONL file (selected.jsonl) or conversations ({role, content}
    messages). A row's answer length is the sum over its assistant turns, so multi-turn rows
    weigh what a trainer sees.
    """
    rows = _conversations_from_jsonl(Path(source)) if isinstance(source, str | Path) else source
    total, count = 0, 0
    for conversation in rows:
        total += sum(
            len(m.get("content") or "") for m in conversation if m.get("role") == "assistant"
        )
        count += 1
    return total / count if count else None


def selection_ids(run: str | Path) -> set[str]:
    """The ids a run selected (scores.parquet's `selected` column)."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(run) / "scores.parquet", columns=["id", "selected"])
    return {
        i for i, s in zip(table["id"].to_pylist(), table["selected"].to_pylist(), strict=True) if s
    }


def _unique_token_sum(run: str | Path | None) -> int | None:
    """Σ tokens_chat over the run's unique rows (what a model-backed stage reads), if counted."""
    if run is None:
        return None
    import pyarrow.parquet as pq

    path = Path(run) / "scores.parquet"
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError):
        return None
    if "tokens_chat" not in names:
        return None
    columns = ["tokens_chat", *(["dup_of"] if "dup_of" in names else [])]
    frame = pq.read_table(path, columns=columns).to_pandas()
    if "dup_of" in frame:
        frame = frame[frame["dup_of"].isna()]
    return int(frame["tokens_chat"].fillna(0).sum())


def _explicit_tokens(info: Mapping[str, Any]) -> int | None:
    for key in ("tokens", "prompt_tokens", "model_tokens"):
        value = info.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def scoring_cost(manifest: Manifest, run: str | Path | None = None) -> dict[str, Any]:
    """Seconds and tokens the run's signal stages cost (see SECONDS_HOW and TOKENS_HOW).

    Seconds: every stage of `manifest.stages` that is a signal stage (`manifest.signals`); a
    skipped stage's record carries the earlier run's time, which is what the signal cost (a resumed
    compare would otherwise cost nothing). Tokens: None when no stage reports a count and the run
    has no `tokens_chat` column to estimate from (the tokens signal was off).
    """
    signals = manifest.signals
    stages = {r.name: float(r.seconds) for r in manifest.stages if r.name in signals}
    skipped = [r.name for r in manifest.stages if r.name in signals and r.skipped]
    model_stages = [
        name
        for name, info in signals.items()
        if name not in NO_MODEL_TOKENS and isinstance(info, Mapping) and "model" in info
    ]
    tokens: int | None = None
    per_row: int | None = None
    for name in model_stages:
        count = _explicit_tokens(signals[name])
        if count is None:
            if per_row is None:
                per_row = _unique_token_sum(run)
            count = per_row
        if count is not None:
            tokens = (tokens or 0) + count
    cached = sum(
        int(info.get("cache_hits") or 0)
        for name, info in signals.items()
        if name in model_stages and isinstance(info.get("cache_hits"), int)
    )
    return {
        "seconds": round(sum(stages.values()), 3),
        "tokens": tokens if model_stages else 0,
        "stages": stages,
        "skipped": skipped,
        "model_stages": model_stages,
        "cached_rows": cached,
    }


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (compare.json must be strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _pair(results: Mapping[str, Any] | None, method: str, baseline: str) -> Mapping | None:
    """The pair entry, whether given directly or as a whole results.json."""
    if results is None:
        return None
    pairs = results.get("pairs")
    if isinstance(pairs, Mapping):
        pair = pairs.get(f"{method}_vs_{baseline}") or pairs.get(f"selected_vs_{baseline}")
        return pair if isinstance(pair, Mapping) else None
    return results


def _winning_rate(pair: Mapping[str, Any]) -> dict[str, Any]:
    interval = pair.get("interval")
    interval = list(interval) if isinstance(interval, list | tuple) and len(interval) == 2 else None
    return _clean(
        {
            "pooled": dict(pair.get("pooled") or {}),
            "sets": {k: dict(v) for k, v in (pair.get("sets") or {}).items()},
            "interval": interval,
            "level": pair.get("level"),
            "fastchat": pair.get("fastchat"),
            "alpacaeval": pair.get("alpacaeval"),
        }
    )


def _settings(manifest: Manifest, stage: str) -> dict[str, Any]:
    stages = manifest.config.get("stages")
    block = stages.get(stage) if isinstance(stages, Mapping) else None
    if not isinstance(block, Mapping):
        return {}
    return {k: v for k, v in block.items() if k not in SETTINGS_SKIP}


def build_compare(methods: Mapping[str, MethodInputs], baseline: str) -> dict[str, Any]:
    """compare.json's dict: per method its rows, answer length, cost and winning rate (None for
    the baseline), the overlap matrix, the shared recipe and judge, and the prompt count."""
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not one of the methods {list(methods)}")
    selections = {name: selection_ids(m.run) for name, m in methods.items()}
    out_methods: dict[str, Any] = {}
    prompts: int | None = None
    judge: dict[str, Any] | None = None
    for name, inputs in methods.items():
        pair = None if name == baseline else _pair(inputs.results, name, baseline)
        selected = inputs.run / "selected.jsonl"
        chars = mean_answer_chars(selected) if selected.is_file() else None
        out_methods[name] = {
            "rows": len(selections[name]),
            "mean_answer_chars": chars,
            "cost": scoring_cost(inputs.manifest, inputs.run),
            "winning_rate": _winning_rate(pair) if pair is not None else None,
        }
        if pair is not None and prompts is None:
            pooled = pair.get("pooled") or {}
            counts = [pooled.get(k) for k in ("wins", "ties", "losses", "unparsed")]
            if all(isinstance(c, int) for c in counts):
                prompts = sum(counts)
        if judge is None and inputs.judge is not None:
            judge = dict(inputs.judge)
        elif judge is None and isinstance(inputs.results, Mapping):
            block = inputs.results.get("judge")
            judge = dict(block) if isinstance(block, Mapping) else None
    reference = methods[baseline].manifest
    recipe = _settings(reference, "train")
    differs = [n for n, m in methods.items() if _settings(m.manifest, "train") != recipe]
    return _clean(
        {
            "baseline": baseline,
            "methods": out_methods,
            "overlap": overlap_matrix(selections),
            "recipe": recipe,
            "recipe_differs": differs,
            "judge": judge if judge is not None else _settings(reference, "judge_pairwise"),
            "prompts": prompts,
            "cost_how": {"seconds": SECONDS_HOW, "tokens": TOKENS_HOW},
        }
    )


def _rate(value: Any) -> float | None:
    if isinstance(value, Mapping):
        value = value.get("rate")
    return _finite(value)


def _fmt_rate(value: Any) -> str:
    rate = _rate(value)
    return "–" if rate is None else f"{rate:.3f}"


def _fmt_share(value: Any) -> str:
    share = _finite(value)
    return "–" if share is None else f"{share:.2f}"


def _fmt_interval(wr: Mapping[str, Any]) -> str:
    interval = wr.get("interval") or [None, None]
    lo, hi = (_finite(v) for v in interval)
    return "–" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def _bounds(rate: float, interval: Any) -> tuple[float, float]:
    """An interval for the error bars; the rate itself where a bound is missing."""
    lo, hi = (_finite(v) for v in interval) if interval else (None, None)
    return (rate if lo is None else lo, rate if hi is None else hi)


def _page_context(compare: Mapping[str, Any]) -> dict[str, Any]:
    """What compare.html shows: tables of raw cells (the template formats and escapes them)."""
    from engine.report import eval_plots
    from engine.report.evaluation import SMOKE_JUDGE, SMOKE_LINE
    from engine.report.summary import kv_table
    from engine.report.tables import Table

    methods: Mapping[str, Any] = compare.get("methods") or {}
    baseline = compare.get("baseline")
    notes: list[str] = []
    rows, set_names = [], []
    for wr in (m.get("winning_rate") for m in methods.values()):
        for name in (wr or {}).get("sets") or {}:
            if name not in set_names:
                set_names.append(name)
    per_set = []
    for name, m in methods.items():
        wr = m.get("winning_rate")
        cost = m.get("cost") or {}
        pooled = (wr or {}).get("pooled") or {}
        chars = _finite(m.get("mean_answer_chars"))
        rows.append(
            [
                f"{name} (baseline)" if name == baseline else name,
                m.get("rows"),
                _fmt_rate(pooled) if wr else "1 (itself)",
                _fmt_interval(wr) if wr else "",
                *(pooled.get(k) if wr else "" for k in ("wins", "ties", "losses", "unparsed")),
                _fmt_rate(wr.get("fastchat")) if wr else "",
                _fmt_rate(wr.get("alpacaeval")) if wr else "",
                round(chars) if chars is not None else "–",
                _finite(cost.get("seconds")),
                cost.get("tokens") if cost.get("tokens") is not None else "–",
                cost.get("cached_rows"),
            ]
        )
        if wr:
            sets = wr.get("sets") or {}
            per_set.append([name, *(_fmt_rate(sets.get(s)) for s in set_names)])
    table = Table(
        id="compare-table",
        headers=[
            "method",
            "rows",
            "winning rate",
            "interval",
            "wins",
            "ties",
            "losses",
            "unparsed",
            "FastChat (0–1)",
            "AlpacaEval (0–1)",
            "mean answer chars",
            "scoring seconds",
            "scoring tokens",
            "cached rows",
        ],
        rows=rows,
        num_columns=set(range(1, 14)),
    )
    sets_table = (
        Table(
            id="compare-sets-table",
            headers=["method", *set_names],
            rows=per_set,
            num_columns=set(range(1, len(set_names) + 1)),
        )
        if per_set
        else None
    )
    overlap: Mapping[str, Mapping[str, Any]] = compare.get("overlap") or {}
    names = list(overlap)
    overlap_table = Table(
        id="compare-overlap-table",
        headers=["", *names],
        rows=[[a, *(_fmt_share(overlap[a].get(b)) for b in names)] for a in names],
        num_columns=set(range(1, len(names) + 1)),
    )

    figures = []
    plotted = [
        (name, _rate(m["winning_rate"].get("pooled")), m["winning_rate"].get("interval"))
        for name, m in methods.items()
        if m.get("winning_rate")
    ]
    plotted = [(n, r, i) for n, r, i in plotted if r is not None]
    try:
        if plotted:
            intervals = [_bounds(r, i) for _, r, i in plotted]
            figures.append(
                eval_plots.winning_rates(
                    [n for n, _, _ in plotted], [r for _, r, _ in plotted], intervals
                )
            )
        for name, m in methods.items():
            if m.get("winning_rate"):
                figures.append(eval_plots.wtl_bars(f"{name} vs {baseline}", m["winning_rate"]))
    except Exception as exc:  # a broken plot must never cost the table
        notes.append(f"plot failed — {type(exc).__name__}: {exc}")
    if compare.get("recipe_differs"):
        notes.append(
            "the training recipe differs from the baseline's for: "
            + ", ".join(map(str, compare["recipe_differs"]))
        )
    judge = compare.get("judge") or {}
    smoke = SMOKE_LINE.format(model=SMOKE_JUDGE) if judge.get("model") == SMOKE_JUDGE else None
    how = compare.get("cost_how") or {}
    return {
        "baseline": baseline,
        "prompts": compare.get("prompts"),
        "smoke": smoke,
        "notes": notes,
        "methods_table": table,
        "sets_table": sets_table,
        "overlap": overlap_table,
        "figures": figures,
        "recipe": kv_table(compare.get("recipe") or {}, "compare-recipe-table"),
        "judge": kv_table(judge, "compare-judge-table"),
        "cost_how": [f"{k}: {v}" for k, v in how.items()],
    }


def render_compare_html(compare: Mapping[str, Any]) -> str:
    """compare.html: one self-contained page (inline CSS, PNG data URIs, no script), autoescaped
    with the report's Jinja2 environment."""
    from engine.report.render import environment

    return environment().get_template("compare.html").render(_page_context(compare))
