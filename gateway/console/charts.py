"""Inline SVG charts, laid out here and drawn by a template macro: no chart library, no script.

:func:`stacked_bars` turns usage rows (one per day and team, or day and
model) into a stacked bar per day; :func:`bars` draws one horizontal bar per
label (denials by reason). Only numbers and labels leave this module; the
template escapes the labels (team, model and reason names are user data).
Colours are CSS classes (``s0``…``s7``), since the Content-Security-Policy
allows no inline styles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final, Iterable, Sequence

WIDTH: Final = 720
HEIGHT: Final = 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 12, 40
#: Series beyond this many (the smallest) are drawn together as "other".
MAX_SERIES: Final = 7
#: In parentheses, like "(none)": no team or model name (letters, digits, . _ @ -) can spell it, so a team
#: named "other" is not merged with it.
OTHER: Final = "(other)"


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    css: str
    title: str


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True)
class Chart:
    """What the ``chart`` macro draws: rectangles, axis ticks, a legend."""

    width: int
    height: int
    rects: list[Rect]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[tuple[str, str]] = field(default_factory=list)  # (css class, label)
    empty: bool = False
    horizontal: bool = False


def nice_max(value: float) -> float:
    """A round axis top at or above ``value`` (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1_000:
        return f"{value / 1_000:g}k"
    return f"{value:g}"


def _label(value: Any) -> str:
    return "(none)" if value is None else str(value)


def stacked_bars(rows: Iterable[dict[str, Any]], series_key: str, value_key: str, *, unit: str) -> Chart:
    """A bar per day, stacked by ``series_key`` (team or model), each part ``value_key`` high."""
    totals: dict[str, float] = {}
    cells: dict[tuple[str, str], float] = {}
    days: set[str] = set()
    for row in rows:
        day, name, value = row["day"], _label(row[series_key]), float(row[value_key] or 0)
        days.add(day)
        cells[(day, name)] = cells.get((day, name), 0) + value
        totals[name] = totals.get(name, 0) + value
    ordered = sorted(totals, key=lambda n: (-totals[n], n))
    kept = ordered[:MAX_SERIES]
    series = kept + ([OTHER] if len(ordered) > len(kept) else [])
    css = {name: f"s{i}" for i, name in enumerate(series)}
    per_day: dict[str, dict[str, float]] = {day: {} for day in days}
    for (day, name), value in cells.items():
        target = name if name in css else OTHER
        per_day[day][target] = per_day[day].get(target, 0) + value
    ordered_days = sorted(days)
    top = nice_max(max((sum(parts.values()) for parts in per_day.values()), default=0))
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(ordered_days), 1)
    bar_w = max(min(slot * 0.7, 48), 2)
    rects: list[Rect] = []
    x_ticks: list[Tick] = []
    label_every = max(1, math.ceil(len(ordered_days) / 12))
    for i, day in enumerate(ordered_days):
        x = _LEFT + i * slot + (slot - bar_w) / 2
        y = float(_TOP + plot_h)
        for name in series:
            value = per_day[day].get(name, 0)
            if value <= 0:
                continue
            h = value / top * plot_h
            y -= h
            rects.append(Rect(round(x, 1), round(y, 1), round(bar_w, 1), round(h, 1), css[name],
                              f"{day} · {name}: {value:g} {unit}"))
        if i % label_every == 0:
            x_ticks.append(Tick(round(x + bar_w / 2, 1), day[5:]))
    y_ticks = [Tick(round(_TOP + plot_h - plot_h * k / 4, 1), _number(top * k / 4)) for k in range(5)]
    return Chart(WIDTH, HEIGHT, rects, x_ticks, y_ticks, [(css[name], name) for name in series],
                 empty=not rects)


def bars(items: Sequence[tuple[str, float]], *, unit: str) -> Chart:
    """One horizontal bar per (label, value), largest first."""
    items = sorted(items, key=lambda item: (-item[1], item[0]))[:20]
    row_h, label_w = 26, 200
    height = max(len(items), 1) * row_h + _TOP + 24
    plot_w = WIDTH - label_w - _RIGHT - 40
    top = nice_max(max((value for _, value in items), default=0))
    rects = [Rect(label_w, _TOP + i * row_h + 4, round(max(value / top * plot_w, 1), 1), row_h - 8, "s0",
                  f"{label}: {value:g} {unit}") for i, (label, value) in enumerate(items)]
    y_ticks = [Tick(_TOP + i * row_h + row_h / 2 + 4, label) for i, (label, _) in enumerate(items)]
    x_ticks = [Tick(round(label_w + plot_w * k / 4, 1), _number(top * k / 4)) for k in range(5)]
    return Chart(WIDTH, height, rects, x_ticks, y_ticks, empty=not items, horizontal=True)
