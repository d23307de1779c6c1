"""Markdown tables for the reports the CLI and scripts print (evaluation, demo, long-context report)."""
from __future__ import annotations

import math
from typing import Sequence


def format_cell(value) -> str:
    """One cell: blanks for None, yes/no for bools, 4 significant digits (whole numbers from 10,000), escaped text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", "\\n").strip()


def markdown_table(rows: Sequence[dict], columns: Sequence[str | tuple[str, str]]) -> str:
    """A GitHub markdown table; `columns` are row keys or (key, header) pairs. Numbers right-aligned."""
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    pairs = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    cells = [[format_cell(row.get(key)) for key, _ in pairs] for row in rows]
    numeric = [bool(rows) and all(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
                                  for row in rows) for key, _ in pairs]
    header = "| " + " | ".join(h for _, h in pairs) + " |"
    rule = "|" + "|".join("---:" if is_num else "---" for is_num in numeric) + "|"
    body = ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join([header, rule, *body])
