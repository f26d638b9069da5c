"""The moments the reload trial's request decisions are asked at (``gateway/requests/policy_trial.py``).

Rules may read ``input.time`` (``hour_utc``, ``weekday``, ``now_ns``): the
shipped schedules do, and so can an operator's shift or cut-off module. Each
trial input carried the moment of the reload itself, so a rule failing only
at another hour or weekday (two overlapping shift ranges) passed the trial
and answered ``policy_error`` to every request once the clock got there
(probe q3 F4). The request decisions now take turns over the hours of the
coming week: decision ``i`` is asked at the present plus ``i`` hours, round
the 168 hours of a week, so every (weekday, hour) pair and every moment up
to a week ahead to the hour is asked once the trial holds 168 decisions;
:data:`HOURS_OF_WEEK` is also the fewest request decisions a trial asks.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

#: The hours of a week: the time points the request decisions take turns over.
HOURS_OF_WEEK = 7 * 24
HOUR_NS = 3600 * 10**9


def trial_moment(now_ns: int, index: int) -> int:
    """When request decision ``index`` is asked (``now_ns`` first): the ``index``-th hour on, round the week."""
    return now_ns + (index % HOURS_OF_WEEK) * HOUR_NS


def describe_moment(time: Any) -> str:
    """How a refusal names the moment of a trial input's ``time`` (``Friday 2026-12-04 20:18 UTC``)."""
    now_ns = time.get("now_ns") if isinstance(time, dict) else None
    if not isinstance(now_ns, int):
        return "an unknown time"
    return datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc).strftime("%A %Y-%m-%d %H:%M UTC")
