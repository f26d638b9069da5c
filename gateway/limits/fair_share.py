"""Fair share's arithmetic at the gateway: a team's places in a model's queue, when one frees, where a
request would stand.

The admission script (``gateway/limits/scripts.py``) applies :func:`team_cap`'s
rule inside Redis; the 429's ``Retry-After`` and ``GET /v1/models`` use the
rest. Weights are the policy's team shares as published in ``SHARES_KEY``
(``gateway/policy/shares.py``); service time is the workers' running mean
(``svc`` in ``tags_key(model)``). docs/architecture.md, "Admission in fair mode".
"""

from __future__ import annotations

import math
from urllib.parse import unquote

from workers.contract.fair_queues import encode_name

#: The team field of principals without a team, as the fair queues spell it (F1's ``team_field``).
NO_TEAM = "!"
#: Mean service time assumed while the workers have measured none (ms).
FALLBACK_SERVICE_MS = 1000.0
#: How far the total of all teams may grow past ``GOVGATE_MAX_QUEUED_PER_MODEL`` (see :func:`team_cap`).
CEILING_FACTOR = 2


def team_field(team: str | None) -> str:
    """``team`` as the fair-share hashes name it (None: :data:`NO_TEAM`)."""
    return NO_TEAM if team is None else encode_name(team)


def team_label(field: str) -> str:
    """A hash field read back as a team's name for people (a hashed long name stays as it is)."""
    if field == NO_TEAM:
        return "(no team)"
    return field if field.startswith("#") else unquote(field)


def team_cap(limit: int, weight: float, waiting_weight: float) -> int:
    """Places a team may hold: ``max(1, floor(limit × weight / waiting_weight))``.

    ``waiting_weight`` is the sum of the weights of the teams with jobs
    waiting, this team's included. One team's burst fills at most its own
    places, so the others are still admitted; the model's total is held
    below ``CEILING_FACTOR × limit`` by a separate ceiling (a team's cap was
    larger while fewer teams waited, so its places can outnumber its cap).
    """
    if waiting_weight <= weight:
        return max(1, limit)
    return max(1, math.floor(limit * weight / waiting_weight + 1e-9))


def service_ms(raw: object) -> float:
    """The workers' mean service time (ms) from its hash field, :data:`FALLBACK_SERVICE_MS` when unknown."""
    try:
        value = float(raw.decode() if isinstance(raw, bytes) else raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return FALLBACK_SERVICE_MS
    return value if math.isfinite(value) and value > 0 else FALLBACK_SERVICE_MS


def drain_wait_s(places: int, mean_service_ms: float, live_workers: int, share: float) -> int:
    """Whole seconds until ``places`` of a team's jobs have left the queue, ≥ 1.

    The model's live workers serve the team at its ``share`` (of the
    waiting teams' weight) of their rate: ``places × service / workers /
    share``. At least one worker is assumed (none alive: the first to come).
    """
    seconds = max(1, places) * mean_service_ms / 1000 / max(1, live_workers) / min(1.0, max(share, 1e-9))
    return max(1, math.ceil(seconds - 1e-9))


def position(team_waiting: int, total: int, weight: float, waiting_weight: float) -> int:
    """Where a request of the team sent now would be served among the model's waiting jobs (1: next).

    Served at its share, the team's ``team_waiting + 1``-th job comes after
    about ``(team_waiting + 1) × waiting_weight / weight`` jobs in all; never
    later than behind every job waiting now.
    """
    estimate = math.ceil((team_waiting + 1) * waiting_weight / max(weight, 1e-9) - 1e-9)
    return max(1, min(total + 1, estimate))


def estimated_wait_s(places_ahead: int, mean_service_ms: float, live_workers: int) -> float:
    """Seconds until ``places_ahead`` jobs are served by the model's live workers (≥ 1 assumed)."""
    return round(places_ahead * mean_service_ms / 1000 / max(1, live_workers), 1)
