"""The read figures on a large store: search pages, a request's story, free text, usage, export.

Each call is the one the review API makes (:mod:`gateway.review.service`):
:func:`audit.search.search` with an :class:`audit.search.EntryFilter`,
newest first, 50 entries a page; a request's story is
:meth:`audit.AuditStore.entries_for` plus the ``read_of`` search a reviewer's
story adds; usage is :func:`audit.aggregates.usage`; an export is
:func:`audit.search.iter_matching` into :func:`audit.export.chunks`. The
values cycle through teams, principals, models, reason codes and days so
no figure is one lucky cached value. Exports run each in a fresh spawned
process that reports its own peak resident memory (``VmHWM``), so the
peaks of a small and a large export are measured apart.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from datetime import timedelta
from typing import Any, Callable

from audit import AuditStore, make_engine
from audit.aggregates import usage
from audit.search import EntryFilter, search

from bench._audit_store import DAYS, MODELS, PRINCIPALS, REASONS, START, TEAMS, Store
from bench._figures import percentile, rounded

PAGE: int = 50
SPAWN = multiprocessing.get_context("spawn")


def timed(call: Callable[[int], Any], repeats: int) -> dict[str, Any]:
    """p50/p99 (nearest rank) in ms of ``call(i)`` for i in range(repeats), after one untimed warm-up."""
    call(repeats)
    times = []
    for i in range(repeats):
        began = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - began) * 1000)
    return {"p50_ms": rounded(percentile(times, 50), 2), "p99_ms": rounded(percentile(times, 99), 2),
            "runs": repeats}


def _day(i: int) -> tuple[Any, Any]:
    day = START + timedelta(days=i % DAYS)
    return day, day + timedelta(days=1)


#: The filtered searches a reviewer makes, by name: the filter for the i-th run.
FILTERS: dict[str, Callable[[int], EntryFilter]] = {
    "team": lambda i: EntryFilter(team=TEAMS[i % len(TEAMS)]),
    "principal": lambda i: EntryFilter(principal=PRINCIPALS[(i * 7) % 60]),
    "model": lambda i: EntryFilter(model=MODELS[i % len(MODELS)]),
    "kind_and_reason": lambda i: EntryFilter(kinds=frozenset({"request"}), reason=REASONS[i % len(REASONS)]),
    "denied": lambda i: EntryFilter(decision="deny"),
    "time_range_one_day": lambda i: EntryFilter(since=_day(i)[0], until=_day(i)[1]),
    "team_and_time_range": lambda i: EntryFilter(team=TEAMS[i % len(TEAMS)], since=_day(i)[0], until=_day(i)[1]),
}


def search_figures(store: Store, repeats: int) -> dict[str, Any]:
    audit = AuditStore(make_engine(store.url))
    figures: dict[str, Any] = {}
    for name, where in FILTERS.items():
        def page(i: int, where: Callable[[int], EntryFilter] = where) -> None:
            if not search(audit, where(i), limit=PAGE).entries:
                raise RuntimeError(f"search {name} found nothing: the bench store is not what it should be")
        figures[name] = timed(page, repeats)
    deep = [(FILTERS["team"](i), cursor) for i in range(len(TEAMS))
            if (cursor := _cursor_of_page(audit, FILTERS["team"](i), 20)) is not None]
    if not deep:
        raise RuntimeError("no team has 20 pages: the bench store is too small (--entries)")
    figures["team_page_20"] = timed(lambda i: search(audit, deep[i % len(deep)][0], limit=PAGE,
                                                     cursor=deep[i % len(deep)][1]), repeats)
    figures["story"] = timed(lambda i: _story(audit, store.sample_request_ids[i % len(store.sample_request_ids)]),
                             repeats)
    # Free text scans: a common term fills a page from the newest entries, a rare one reads every row.
    figures["free_text_common"] = timed(lambda i: search(audit, EntryFilter(text="quarterly"), limit=PAGE),
                                        max(3, repeats // 5))
    figures["free_text_rare"] = timed(lambda i: search(audit, EntryFilter(text="no such words here"), limit=PAGE),
                                      3)
    figures["usage_one_day"] = timed(lambda i: usage(audit.engine, EntryFilter(since=_day(i)[0], until=_day(i)[1])),
                                     max(3, repeats // 5))
    figures["usage_30_days"] = timed(lambda i: usage(audit.engine, EntryFilter(since=START,
                                                                               until=START + timedelta(days=DAYS))), 3)
    audit.engine.dispose()
    return figures


def _cursor_of_page(audit: AuditStore, where: EntryFilter, n: int) -> int | None:
    """The keyset cursor that asks for page ``n`` (walked once, untimed); None when there are fewer pages."""
    cursor = None
    for _ in range(n - 1):
        cursor = search(audit, where, limit=PAGE, cursor=cursor).next_cursor
        if cursor is None:
            return None
    return cursor


def _story(audit: AuditStore, request_id: str) -> None:
    if not audit.entries_for(request_id):
        raise RuntimeError(f"request {request_id} is not in the bench store")
    search(audit, EntryFilter(read_of=request_id), limit=500)


def _vm(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (VmHWM: peak resident, VmRSS: resident now)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _export_child(url: str, fmt: str, limit: int | None, out: Any) -> None:
    """Child: export ``limit`` entries (all when None) into /dev/null; report bytes, seconds, memory."""
    from audit.export import chunks
    from audit.search import iter_matching

    audit = AuditStore(make_engine(url))
    audit.tail(1)
    before = _vm("VmRSS")
    entries = iter_matching(audit, EntryFilter(), newest_first=False)
    if limit is not None:
        entries = itertools.islice(entries, limit)
    written = 0
    began = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        for chunk in chunks(fmt, entries, with_text=True):
            sink.write(chunk)
            written += len(chunk)
    seconds = time.perf_counter() - began
    out.put({"bytes": written, "seconds": seconds, "rss_before_kib": before, "peak_rss_kib": _vm("VmHWM")})


def export_once(store: Store, fmt: str, limit: int | None) -> dict[str, Any]:
    out = SPAWN.Queue()
    child = SPAWN.Process(target=_export_child, args=(store.url, fmt, limit, out))
    child.start()
    try:
        got = out.get(timeout=3600)
    finally:
        child.join(60)
    if child.exitcode != 0:
        raise RuntimeError(f"the export child exited with {child.exitcode}")
    entries = store.entries if limit is None else min(limit, store.entries)
    return {"entries": entries, "mb": rounded(got["bytes"] / 1e6), "mb_per_s": rounded(got["bytes"] / 1e6 / got["seconds"]),
            "entries_per_s": rounded(entries / got["seconds"]), "rss_before_mib": rounded(got["rss_before_kib"] / 1024),
            "peak_rss_mib": rounded(got["peak_rss_kib"] / 1024)}


def export_figures(store: Store) -> dict[str, Any]:
    """JSONL and CSV (with texts), of a tenth of the store and of all of it; memory should not follow size."""
    small = store.entries // 10
    figures: dict[str, Any] = {}
    for fmt in ("jsonl", "csv"):
        part, whole = export_once(store, fmt, small), export_once(store, fmt, None)
        figures[fmt] = {"part": part, "whole": whole,
                        "peak_rss_growth_mib": rounded(whole["peak_rss_mib"] - part["peak_rss_mib"])}
    return figures
