"""Filter rules: `reject_if: "<signal> <op> <value>"` with a reason, evaluated in order.

A row is rejected by the first rule that matches it and carries that rule's reason. A rule never
matches a missing value (NaN/null): a row a signal did not score is not rejected by that signal.
An `optional` rule (a hygiene rule on an optional signal, e.g. the token cap on `tokens_assistant`)
matches nothing when its column is absent from the frame; any other rule on an absent column is an
error, so a misspelt or unloaded column never passes silently.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

_OPS: dict[str, Callable[[object, object], object]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|!=|<|>)\s*(.+?)\s*$")


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    column: str
    op: str
    value: float | bool | str
    reason: str
    optional: bool = False

    @classmethod
    def parse(cls, expression: str, reason: str, optional: bool = False) -> Rule:
        match = _RULE.match(expression)
        if not match:
            raise RuleError(
                f"cannot parse {expression!r}: expected '<signal> <op> <value>' "
                f"with op one of {', '.join(_OPS)}"
            )
        column, op, text = match.groups()
        return cls(column, op, _parse_value(text), reason, optional)

    @property
    def expression(self) -> str:
        """The rule as `reject_if` text, e.g. `longest_response_chars > 65536` (for summaries)."""
        if isinstance(self.value, bool):
            text = str(self.value).lower()
        elif isinstance(self.value, str):
            text = repr(self.value)
        else:
            text = f"{self.value:g}"
        return f"{self.column} {self.op} {text}"

    def matches(self, frame: pd.DataFrame) -> np.ndarray:
        if self.optional and self.column not in frame.columns:
            return np.zeros(len(frame), dtype=bool)
        values = frame[self.column]
        present = values.notna().to_numpy()
        result = np.asarray(_OPS[self.op](values, self.value), dtype=bool)
        return result & present


def _parse_value(text: str) -> float | bool | str:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        return float(text)
    except ValueError as exc:
        raise RuleError(f"value {text!r} is not a number, true/false or a quoted string") from exc


def first_matching_reason(frame: pd.DataFrame, rules: Sequence[Rule]) -> np.ndarray:
    """Per row, the reason of the first matching rule, or None."""
    reasons = np.full(len(frame), None, dtype=object)
    undecided = np.ones(len(frame), dtype=bool)
    for rule in rules:
        hit = undecided & rule.matches(frame)
        reasons[hit] = rule.reason
        undecided &= ~hit
    return reasons
