"""Run report: a self-contained `report.html` summarising what was kept, dropped and why.

`render_report(scores, manifest, examples)` builds the page from the typed `Manifest` (counts)
and the scores frame (distributions and breakdowns), using the Jinja2 templates in `templates/`.
"""

from engine.report.render import render_report

__all__ = ["render_report"]
