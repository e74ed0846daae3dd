"""Small formatters shared by every Markdown report (run report, model card, parity and template sections)."""

from __future__ import annotations


def pct(x: float | None) -> str:
    """0.505 -> '50.5%'; None (not measured) -> an en dash, never 0%."""
    return "–" if x is None else f"{100 * x:.1f}%"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: a literal | (as in `<|im_end|>`) would split the cell."""
    return str(text).replace("|", "\\|")
