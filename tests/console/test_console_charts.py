"""The charts' layout: sums per day and series, the "other" series, axis tops, empty data."""

from __future__ import annotations

import pytest

from gateway.console.charts import HEIGHT, MAX_SERIES, OTHER, bars, nice_max, stacked_bars


@pytest.mark.parametrize(("value", "top"), [(0, 1), (1, 1), (3, 5), (7, 10), (11, 20), (240, 250), (2501, 5000)])
def test_nice_max_rounds_up(value: float, top: float) -> None:
    assert nice_max(value) == top


def test_rows_of_one_day_and_series_are_added_up_and_stacked() -> None:
    rows = [{"day": "2026-05-01", "team": "a", "model": "m1", "requests": 3},
            {"day": "2026-05-01", "team": "a", "model": "m2", "requests": 2},
            {"day": "2026-05-01", "team": None, "model": "m1", "requests": 5},
            {"day": "2026-05-02", "team": "a", "model": "m1", "requests": 1}]
    chart = stacked_bars(rows, "team", "requests", unit="requests")
    assert [label for _, label in chart.legend] == ["a", "(none)"]  # largest total first
    titles = [rect.title for rect in chart.rects]
    assert titles == ["2026-05-01 · a: 5 requests", "2026-05-01 · (none): 5 requests", "2026-05-02 · a: 1 requests"]
    first_day = chart.rects[:2]
    assert first_day[0].y == pytest.approx(first_day[1].y + first_day[1].h)  # stacked, no gap
    assert chart.y_ticks[-1].label == "10"
    assert all(0 <= rect.y and rect.y + rect.h <= HEIGHT for rect in chart.rects)


def test_beyond_the_palette_the_smallest_series_become_other() -> None:
    rows = [{"day": "2026-05-01", "model": f"m{i}", "total_tokens": 100 - i} for i in range(MAX_SERIES + 3)]
    chart = stacked_bars(rows, "model", "total_tokens", unit="tokens")
    labels = [label for _, label in chart.legend]
    assert labels[:MAX_SERIES] == [f"m{i}" for i in range(MAX_SERIES)] and labels[-1] == OTHER
    other = next(rect for rect in chart.rects if rect.title.startswith(f"2026-05-01 · {OTHER}:"))
    assert other.title.endswith(f"{sum(100 - i for i in range(MAX_SERIES, MAX_SERIES + 3))} tokens")


def test_no_data_is_an_empty_chart() -> None:
    assert stacked_bars([], "team", "requests", unit="requests").empty
    assert stacked_bars([{"day": "2026-05-01", "team": "a", "requests": 0}], "team", "requests", unit="r").empty
    assert bars([], unit="denials").empty


def test_bars_are_largest_first() -> None:
    chart = bars([("b", 2), ("a", 9), ("c", 2)], unit="denials")
    assert [tick.label for tick in chart.y_ticks] == ["a", "b", "c"]
    assert chart.rects[0].w > chart.rects[1].w == chart.rects[2].w


def test_a_team_named_other_is_not_merged_with_the_other_series() -> None:
    # "other" is a valid team name (the key store takes it); it must stay its own series, not be added to the
    # smallest teams' bucket and drawn twice.
    rows = [{"day": "2026-05-01", "team": "other", "requests": 100}]
    rows += [{"day": "2026-05-01", "team": f"t{i}", "requests": 50 - i} for i in range(MAX_SERIES + 1)]
    chart = stacked_bars(rows, "team", "requests", unit="requests")
    labels = [label for _, label in chart.legend]
    assert len(labels) == len(set(labels)) == MAX_SERIES + 1
    titles = [rect.title for rect in chart.rects]
    assert "2026-05-01 · other: 100 requests" in titles
    assert f"2026-05-01 · {OTHER}: {(50 - MAX_SERIES + 1) + (50 - MAX_SERIES)} requests" in titles
    assert sum(rect.h for rect in chart.rects) <= HEIGHT
