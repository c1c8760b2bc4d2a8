"""Run report: a self-contained `report.html` summarising what was kept, dropped and why."""

from engine.report.html import render_report

__all__ = ["render_report"]
