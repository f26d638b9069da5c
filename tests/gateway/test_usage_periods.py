"""The day and month labels the usage scripts get, worked out once a day, match the calendar."""

from __future__ import annotations

import calendar
from datetime import datetime, timezone

import pytest

from gateway.limits.counters import _Periods

_US = 1_000_000


def _utc_us(*args: int) -> int:
    return calendar.timegm(datetime(*args, tzinfo=timezone.utc).timetuple()) * _US


@pytest.mark.parametrize("now_us, day, yesterday, month, last_month, day_end, month_end", [
    (_utc_us(2026, 11, 30, 23, 59, 59) + 999_999, "20261130", "20261129", "202611", "202610",
     _utc_us(2026, 12, 1), _utc_us(2026, 12, 1)),
    (_utc_us(2026, 12, 1), "20261201", "20261130", "202612", "202611", _utc_us(2026, 12, 2), _utc_us(2027, 1, 1)),
    (_utc_us(2027, 1, 1, 12), "20270101", "20261231", "202701", "202612", _utc_us(2027, 1, 2),
     _utc_us(2027, 2, 1)),
    (_utc_us(2028, 2, 29, 1), "20280229", "20280228", "202802", "202801", _utc_us(2028, 3, 1),
     _utc_us(2028, 3, 1)),
])
def test_periods_at_day_month_and_year_ends(now_us: int, day: str, yesterday: str, month: str, last_month: str,
                                           day_end: int, month_end: int) -> None:
    assert _Periods.at(now_us) == _Periods(day, yesterday, day_end, month, last_month, month_end)


def test_the_next_microsecond_after_a_cached_day_is_the_next_day() -> None:
    end = _utc_us(2026, 11, 30, 23, 59, 59) + 999_999
    assert _Periods.at(end).day == "20261130"  # cached now
    assert _Periods.at(end + 1).day == "20261201"
