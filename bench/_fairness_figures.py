"""The arithmetic of ``bench/fairness.py``: jobs read from the audit trail, and what one worker gave each team.

Everything here works on :class:`Job` values (team, and when it was queued,
started and ended), made from the terminal entries the worker wrote:

* ``ended`` is the terminal entry's ``created_at`` (taken when the worker
  appends it, just before it answers), or for an output the worker handed
  over to its gateway (non-streamed, under output rules) that minus
  ``timings.handed_over_ms`` (the gateway recorded it that long after the
  worker was free again);
* ``started`` is ``ended`` minus the entry's ``timings.generate_ms`` (the
  worker's clock from start to the end of generation) and
  ``timings.verdict_ms`` (a worker's wait for its output verdict, when it waited);
* ``queued`` is ``started`` minus ``timings.queue_ms`` (the worker's start
  minus the gateway's ``enqueued_at``: the request's wait in the queue).

With one worker at concurrency 1 the jobs run one after another, so the
terminal entries in order of ``ended`` are the worker's schedule. Each job
owns the *slot* from the previous job's end to its own end: the worker's
whole time for it (taking it off the queue, the start claim, generation,
the audit append, the acknowledgement). A slot is *busy* when its job was
already queued at the previous end (the worker did not sit idle before it).

* **service time** of one job: the median busy slot;
* **a team is backlogged in a slot** when it has a job that was queued by
  the slot's start and not ended before the slot's end (a job waiting to be
  picked, or the one picked);
* **share of worker time while all are backlogged**: over the busy slots
  in which every team of the scenario was backlogged, each team's sum of
  slot time over the total; **share error**: the largest difference between
  a team's share and its weight's fraction of all weights;
* **throughput**: jobs ended per second from the first job's start to the
  last end of the teams that burst (the worker is backlogged all that time).

A trickling team's request is also seen from the client (:class:`Answer`,
matched to its job by request id): its **latency** (send to answer), its
**admission** (send to ``queued``: the time the gateway held it before
queueing it).

An append that waits for the database's write lock moves its job's
``ended`` (and so ``started``) later by the wait; that moves slot time
between neighbouring jobs, never the total.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench._figures import percentile

__all__ = ["Answer", "Job", "Slot", "admissions_ms", "backlogged_shares", "handovers_ms", "job_from_entry",
           "latencies_ms", "overall_shares", "schedule", "service_ms", "share_error", "throughput", "timeline",
           "passed_waits_ms", "wait_figures", "waits_ms"]


@dataclass(frozen=True)
class Job:
    """One served request as the worker saw it; times in seconds since the epoch."""

    team: str
    queued: float
    started: float
    ended: float
    request_id: str = ""

    @property
    def wait_ms(self) -> float:
        return (self.started - self.queued) * 1000


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it: its status (or exception name), its id, when sent and answered (epoch s)."""

    status: str
    request_id: str | None
    sent: float
    done: float


@dataclass(frozen=True)
class Slot:
    """The worker's time for one job: from the previous job's end (or its own start) to its end."""

    team: str
    start: float
    end: float
    busy: bool

    @property
    def seconds(self) -> float:
        return self.end - self.start


def job_from_entry(entry: Any) -> Job | None:
    """A :class:`Job` from a terminal audit entry; None when it carries no timings (not generated)."""
    timings = entry.body.get("timings") or {}
    queue_ms, generate_ms = timings.get("queue_ms"), timings.get("generate_ms")
    if queue_ms is None or generate_ms is None or entry.team is None:
        return None
    # A worker that waited for its output verdict was busy until it recorded (verdict_ms); one that
    # handed its output over was free again when it did, its gateway recording later (handed_over_ms).
    ended = entry.created_at.timestamp() - (timings.get("handed_over_ms") or 0) / 1000
    started = ended - (generate_ms + (timings.get("verdict_ms") or 0)) / 1000
    return Job(team=entry.team, queued=started - queue_ms / 1000, started=started, ended=ended,
               request_id=entry.request_id)


def schedule(jobs: Iterable[Job]) -> list[Slot]:
    """The worker's slots in order (see the module docstring)."""
    slots: list[Slot] = []
    previous_end: float | None = None
    for job in sorted(jobs, key=lambda j: j.ended):
        busy = previous_end is not None and job.queued <= previous_end
        start = previous_end if busy and previous_end is not None else job.started
        slots.append(Slot(team=job.team, start=start, end=job.ended, busy=busy))
        previous_end = job.ended
    return slots


def handovers_ms(jobs: Iterable[Job]) -> list[float]:
    """For each busy slot, the previous job's end to this job's start, in milliseconds: the worker between jobs.

    What a slot holds besides generation: the previous job's hand-back and
    acknowledgement, taking the next job (BRPOP, the fair pick), handing it
    to the pool process and its start claim. A trickling team's job waits for
    the rest of the slot in progress and then for its own hand-over, so on a
    short job this is most of its wait (2026-11-30: 2.0-2.6 ms against 1.6-2.0
    ms of generation for 16 tiny-model tokens on the quiet VM).
    """
    return [row["handover_ms"] for row in timeline(jobs) if row["handover_ms"] is not None]


def timeline(jobs: Iterable[Job]) -> list[dict[str, Any]]:
    """The worker's schedule as rows (``bench/fairness.py --schedule-json``), times in ms from the first queued job.

    Each row: team, request id, queued, started, ended, its wait, and the
    hand-over before it (None when the worker sat idle before it): enough
    to see, for a long wait, whether the job waited behind other teams'
    jobs, or behind a slow hand-over or a slow generation (a starved process).
    """
    ordered = sorted(jobs, key=lambda j: j.ended)
    if not ordered:
        return []
    origin = min(j.queued for j in ordered)
    rows: list[dict[str, Any]] = []
    previous_end: float | None = None
    for job in ordered:
        busy = previous_end is not None and job.queued <= previous_end
        rows.append({"team": job.team, "request_id": job.request_id,
                     "queued_ms": round((job.queued - origin) * 1000, 3),
                     "started_ms": round((job.started - origin) * 1000, 3),
                     "ended_ms": round((job.ended - origin) * 1000, 3), "wait_ms": round(job.wait_ms, 3),
                     "handover_ms": round((job.started - previous_end) * 1000, 3)
                     if busy and previous_end is not None else None})
        previous_end = job.ended
    return rows


def service_ms(slots: Sequence[Slot]) -> float | None:
    """The median busy slot in milliseconds: one job's whole cost to the worker."""
    busy = [s.seconds * 1000 for s in slots if s.busy]
    return statistics.median(busy) if busy else None


def waits_ms(jobs: Iterable[Job], team: str) -> list[float]:
    """``team``'s queue waits in milliseconds."""
    return [j.wait_ms for j in jobs if j.team == team]


def passed_waits_ms(jobs: Iterable[Job], team: str) -> list[float]:
    """``team``'s queue waits during which a job of another team started first, in milliseconds.

    On one worker a fair pick never puts a team furthest below its share
    behind another's newer job; what starts first anyway was taken before
    the waiting job was queued: the take pops the next job as the previous
    one ends, and most of the hand-over (the job's delivery, the start claim)
    comes after it. Such a wait holds that job's whole slot as well as the
    rest of the one in progress (docs/architecture.md, "Where in the
    hand-over B's long waits begin").
    """
    jobs = list(jobs)
    others = sorted(j.started for j in jobs if j.team != team)
    passed = []
    for job in jobs:
        if job.team != team:
            continue
        first = bisect.bisect_right(others, job.queued)
        if first < len(others) and others[first] < job.started:
            passed.append(job.wait_ms)
    return passed


def wait_figures(waits: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and the largest of ``waits`` (nearest rank)."""
    return {"p50": percentile(waits, 50), "p95": percentile(waits, 95), "max": max(waits) if waits else None,
            "count": len(waits)}


def latencies_ms(answers: Iterable[Answer]) -> list[float]:
    """Send to answer, in milliseconds, of the requests answered 200 (the client's clock)."""
    return [(a.done - a.sent) * 1000 for a in answers if a.status == "200"]


def admissions_ms(answers: Iterable[Answer], jobs: Iterable[Job]) -> list[float]:
    """Send to enqueue, in milliseconds: the time each request spent in the gateway before it was queued."""
    queued = {j.request_id: j.queued for j in jobs if j.request_id}
    return [(queued[a.request_id] - a.sent) * 1000 for a in answers if a.request_id in queued]


class _Backlog:
    """Answers "had ``team`` a job queued by ``start`` and not ended before ``end``?" in O(log n)."""

    def __init__(self, jobs: Iterable[Job]) -> None:
        ordered = sorted(jobs, key=lambda j: j.ended)
        self.ends = [j.ended for j in ordered]
        # earliest[i]: the earliest queue time among the jobs ending at ends[i] or later
        self.earliest = [0.0] * len(ordered)
        running = float("inf")
        for i in range(len(ordered) - 1, -1, -1):
            running = min(running, ordered[i].queued)
            self.earliest[i] = running

    def at(self, start: float, end: float) -> bool:
        i = bisect.bisect_left(self.ends, end)
        return i < len(self.ends) and self.earliest[i] <= start


def backlogged_shares(jobs: Sequence[Job], teams: Sequence[str]) -> tuple[dict[str, float], float, int]:
    """Each team's share of the worker's time in the busy slots where every team was backlogged.

    Returns the shares (summing to 1; all 0 when no slot qualified), the
    seconds those slots lasted and how many there were.
    """
    backlogs = {team: _Backlog(j for j in jobs if j.team == team) for team in teams}
    spent = dict.fromkeys(teams, 0.0)
    count = 0
    for slot in schedule(jobs):
        if slot.busy and slot.team in spent and all(b.at(slot.start, slot.end) for b in backlogs.values()):
            spent[slot.team] += slot.seconds
            count += 1
    total = sum(spent.values())
    return ({team: (t / total if total else 0.0) for team, t in spent.items()}, total, count)


def overall_shares(jobs: Sequence[Job], teams: Sequence[str]) -> dict[str, float]:
    """Each team's share of all the worker's slot time in the phase (busy or not)."""
    spent = dict.fromkeys(teams, 0.0)
    for slot in schedule(jobs):
        if slot.team in spent:
            spent[slot.team] += slot.seconds
    total = sum(spent.values())
    return {team: (t / total if total else 0.0) for team, t in spent.items()}


def share_error(shares: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """The largest ``|share - weight / sum of weights|`` over the teams; None without shares."""
    total = sum(weights.values())
    if not shares or not any(shares.values()) or total <= 0:
        return None
    return max(abs(shares.get(team, 0.0) - weight / total) for team, weight in weights.items())


def throughput(jobs: Sequence[Job], burst_teams: Iterable[str]) -> float | None:
    """Jobs ended per second from the first start to the last end of ``burst_teams``' jobs."""
    bursting = set(burst_teams)
    if not jobs or not any(j.team in bursting for j in jobs):
        return None
    first = min(j.started for j in jobs)
    last = max(j.ended for j in jobs if j.team in bursting)
    ended = sum(1 for j in jobs if j.ended <= last)
    return ended / (last - first) if last > first else None
