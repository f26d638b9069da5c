"""The arithmetic and layout every bench report shares: percentiles, ratios, rounding, table rows.

Percentiles are nearest-rank (no interpolation), so every figure printed is
a latency that really happened.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """``a / b`` rounded; None when either is missing or ``b`` is zero."""
    return round(a / b, digits) if a is not None and b else None


def table_row(label: str, cells: Sequence[Any], widths: tuple[int, int], suffix: str = "") -> str:
    """``label`` left-aligned in ``widths[0]``, each cell right-aligned in ``widths[1]``; None shows as "-"."""
    label_width, cell_width = widths
    texts = ["-" if c is None else f"{c}{suffix}" for c in cells]
    return label.ljust(label_width) + "".join(t.rjust(cell_width) for t in texts)


def write_json(path: Path, document: Any) -> None:
    """Write a bench's figures for ``--json``: the folder made if needed, UTF-8, one trailing newline.

    ``make bench`` points every bench at ``bench/results/<name>.json`` and
    ``bench/collect.py`` merges them, so they are all written the same way.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
