"""Formatting of values for the report: numbers, durations, shares and visible control characters.

Everything here returns plain `str`; HTML escaping is left to Jinja2's autoescaping, so no
function in this module ever produces markup.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from markupsafe import Markup

TURN_CHARS = 600  # characters of one conversation turn shown before it is cut

# C0 control characters (except tab/newline/CR) and DEL are shown as visible \xNN escapes so
# garbage bytes in the corpus are noticeable instead of silently vanishing in the browser.
CONTROL_MAP = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20)]}
CONTROL_MAP[0x7F] = "\\x7f"
# Bidirectional overrides and isolates (and the marks) would let corpus text reverse the report's
# own text around it ("exe.txt" shown as "txt.exe"): they are shown as \uXXXX escapes too.
CONTROL_MAP.update(
    {c: f"\\u{c:04x}" for c in [0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
)


def visible(value: Any) -> Any:
    """Text with control characters made visible; None becomes ''. Markup passes unchanged.

    Also the environment's `finalize`, so every `{{ }}` value goes through it before escaping.
    Lone surrogates (possible in JSON-decoded corpus text) are backslash-escaped because writing
    them as UTF-8 would fail.
    """
    if value is None:
        return ""
    if isinstance(value, Markup):
        return value
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(CONTROL_MAP)


def as_number(value: Any) -> float | None:
    """A finite float for real numbers (not bools), else None: free-form values are loose."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def fmt_int(value: int | None) -> str:
    """Thousands-separated integer, or an en dash for unknown."""
    return "–" if value is None else f"{value:,}"


def fmt_num(value: float | None) -> str:
    """Compact human formatting for signal values of very different scales."""
    if value is None or not math.isfinite(value):
        return "–"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def pct(part: float | None, whole: float | None) -> str:
    """Percentage string, or an en dash when the denominator is unknown or zero."""
    if part is None or not whole:
        return "–"
    return f"{100.0 * part / whole:.1f}%"


def fmt_seconds(seconds: float | None) -> str:
    """Seconds as '4.5 s', or '12 min 3 s' for long stages; an en dash when not a number."""
    seconds = as_number(seconds)
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"


def is_numeric(value: Any) -> bool:
    """True for ints and reals that are not bools: such table cells are right-aligned."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fmt_cell(value: Any) -> Any:
    """A table cell's text: integers with separators, reals compact, anything else unchanged."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return fmt_int(int(value))
    if is_numeric(value):
        return fmt_num(float(value))
    return value


def truncate(text: Any, limit: int = TURN_CHARS) -> str:
    """Cut long text and say how much was cut, so examples stay skimmable."""
    text = "" if text is None else text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [+{len(text) - limit:,} chars]"
