"""Time ranges as seq ranges (audit/time_order.py, audit_0005): the append keeps time in chain order, and a
search by time finds exactly the entries a filter on ``created_at`` finds, on stores whose history goes
back in time as well. Both backends.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from alembic import command
from sqlalchemy import text

import audit.appender
from audit import AuditEntry, AuditError, AuditStore, make_engine, migrate, verify_chain
from audit.db import MIGRATE_LOCK_KEY, alembic_config, locked_transaction
from audit.search import EntryFilter, count_matching, iter_matching, search
from audit.time_order import seq_range
from tests.audit.conftest import RawDB

DAY0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


class _Clock:
    """``audit.appender``'s clock, set by the test: the time a host would read, stepped back at will."""

    def __init__(self) -> None:
        self.now = DAY0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = self

        class _Datetime(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
                return clock.now

        monkeypatch.setattr(audit.appender, "datetime", _Datetime)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    clock.install(monkeypatch)
    return clock


def _append(store: AuditStore, request_id: str, team: str) -> AuditEntry:
    return store.append("request", request_id, principal=f"p-{team}", team=team, model="m", body={},
                        policy_revision=None)


def test_an_entry_never_gets_an_earlier_time_than_its_predecessor(store: AuditStore, clock: _Clock) -> None:
    first = _append(store, "r1", "a")
    clock.now = DAY0 - timedelta(hours=3)  # the clock stepped back (NTP, another host's slower clock)
    second = _append(store, "r2", "a")
    assert second.created_at == first.created_at == DAY0
    clock.now = DAY0 + timedelta(seconds=1)
    third = _append(store, "r3", "a")
    assert third.created_at == DAY0 + timedelta(seconds=1)
    assert [e.created_at for e in store.iter_entries()][1:] == [DAY0, DAY0, DAY0 + timedelta(seconds=1)]
    assert verify_chain(store).ok  # the time hashed is the time stored


def test_an_unreadable_head_time_refuses_the_append(tmp_path: Path) -> None:
    """A tampered head (SQLite keeps text: anything fits) fails the append closed, with a clear error.

    SQLite only: PostgreSQL's timestamptz cannot hold an unreadable time.
    """
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = make_engine(url)
    migrate(engine)
    store = AuditStore(engine)
    raw = RawDB(url, "sqlite")
    try:
        _append(store, "r1", "a")
        raw.without_guards("UPDATE audit_entries SET created_at = 'yesterday' WHERE seq = 2")
        with pytest.raises(AuditError, match="created_at is unreadable"):
            _append(store, "r2", "a")
        assert raw.rows("SELECT count(*) FROM audit_entries") == [(2,)]
    finally:
        raw.dispose()
        engine.dispose()


def _fill(store: AuditStore, clock: _Clock, times: list[timedelta]) -> list[AuditEntry]:
    """One entry per offset from DAY0, teams a/b/c in turn."""
    entries = []
    for i, offset in enumerate(times):
        clock.now = DAY0 + offset
        entries.append(_append(store, f"r{i}", "abc"[i % 3]))
    return entries


#: Ranges around the entries' times: open ends, empty ranges, ranges before and after all of them.
RANGES = [(None, 3), (2, None), (2, 5), (0, 1), (4.5, 4.6), (-10, -5), (50, 60), (3, 3.0001), (-1, 100)]


def _expected(entries: list[AuditEntry], since: datetime | None, until: datetime | None,
              team: str | None) -> list[int]:
    return sorted((e.seq for e in entries
                   if (since is None or e.created_at >= since) and (until is None or e.created_at < until)
                   and (team is None or e.team == team)), reverse=True)


def _check_every_range(store: AuditStore, entries: list[AuditEntry]) -> None:
    for low, high in RANGES:
        since = DAY0 + timedelta(days=low) if low is not None else None
        until = DAY0 + timedelta(days=high) if high is not None else None
        for team in (None, "a", "b"):
            where = EntryFilter(team=team, since=since, until=until)
            expected = _expected(entries, since, until, team)
            pages, cursor = [], None
            while True:  # pages of 2 through the cursor
                page = search(store, where, limit=2, cursor=cursor)
                pages += [e.seq for e in page.entries]
                if (cursor := page.next_cursor) is None:
                    break
            assert pages == expected, (low, high, team)
            assert [e.seq for e in iter_matching(store, where, batch=3)] == sorted(expected), (low, high, team)
            assert count_matching(store.engine, where) == len(expected), (low, high, team)


def test_a_time_range_finds_exactly_its_entries(store: AuditStore, clock: _Clock) -> None:
    # Several entries at the same instant (a batch, a clock that stood still) and gaps of days.
    entries = _fill(store, clock, [timedelta(days=d) for d in (0, 0, 1, 2, 2, 2, 3, 4.5, 4.5, 6, 9)])
    with store.engine.connect() as conn:
        assert seq_range(conn, DAY0, None) is not None  # a new store is ordered from its first entry
    assert len(entries) == 11
    _check_every_range(store, list(store.iter_entries()))  # with the chain_format boundary, seq 1


@pytest.mark.parametrize("seq", [5, 9])
def test_an_entry_dated_in_the_future_hides_no_other_from_a_time_range(store: AuditStore, clock: _Clock,
                                                                      raw: RawDB, seq: int) -> None:
    """One entry dated in the future by a database writer was the first "at or after" every later moment: a
    range up to now ended before it, and every later entry fell out (probe s59 F5: an export of the last day gave
    7 of 29 entries, the review API none of the newest). A boundary where the times go back gets no seq range
    now, and the range is searched by time. (The rewritten entry itself may still show in a range its new date
    is not in when it lies inside the seq range; `verify` names it.)"""
    _fill(store, clock, [timedelta(days=d) for d in range(12)])
    _step_back(raw, seq, DAY0 + timedelta(days=3650))
    entries = [e for e in store.iter_entries() if e.seq != seq]
    assert verify_chain(store).ok is False
    for low, high in RANGES:
        since = DAY0 + timedelta(days=low) if low is not None else None
        until = DAY0 + timedelta(days=high) if high is not None else None
        where = EntryFilter(since=since, until=until)
        found = [e.seq for e in iter_matching(store, where, batch=3) if e.seq != seq]
        assert found == sorted(_expected(entries, since, until, None)), (low, high)


def _step_back(raw: RawDB, seq: int, moment: datetime) -> None:
    """An entry written before audit_0005 by a clock that had stepped back: its stored time, set directly."""
    value = moment.strftime("%Y-%m-%d %H:%M:%S.%f") if raw.backend == "sqlite" else moment
    raw.without_guards("UPDATE audit_entries SET created_at = :t WHERE seq = :seq", params={"t": value, "seq": seq})


@pytest.fixture
def old_store(db_url: str, raw_at_0004: Callable[[], RawDB], clock: _Clock) -> Iterator[tuple[AuditStore, RawDB]]:
    """A store written at audit_0004 whose times go back twice (at seq 5 and seq 9), then upgraded."""
    raw = raw_at_0004()
    store = raw.store()
    _fill(store, clock, [timedelta(days=d) for d in range(12)])  # seqs 2..13 on days 0..11 (1: the boundary)
    _step_back(raw, 5, DAY0 + timedelta(days=1, hours=12))  # day 3 -> day 1.5
    _step_back(raw, 9, DAY0 + timedelta(days=2))  # day 7 -> day 2
    migrate(store.engine)
    yield store, raw


@pytest.fixture
def raw_at_0004(db_url: str, backend: str) -> Iterator[Callable[[], RawDB]]:
    made: list[RawDB] = []

    def make() -> RawDB:
        engine = make_engine(db_url)
        migrate(engine, "audit_0004")
        engine.dispose()
        made.append(RawDB(db_url, backend))
        return made[-1]

    yield make
    for raw in made:
        raw.dispose()


def test_the_upgrade_records_where_time_stops_going_back(old_store: tuple[AuditStore, RawDB]) -> None:
    store, raw = old_store
    [(ordered_from, earlier_latest)] = raw.rows("SELECT ordered_from, earlier_latest FROM audit_time_order")
    assert ordered_from == 9  # the last step back
    latest = earlier_latest if isinstance(earlier_latest, datetime) else datetime.fromisoformat(earlier_latest)
    assert (latest.replace(tzinfo=timezone.utc) if latest.tzinfo is None else latest) == DAY0 + timedelta(days=6)


def test_ranges_over_a_history_that_went_back_find_exactly_their_entries(old_store: tuple[AuditStore, RawDB],
                                                                         clock: _Clock) -> None:
    store, _ = old_store
    with store.engine.connect() as conn:
        assert seq_range(conn, DAY0 + timedelta(days=3), None) is None  # reaches back before seq 9: created_at
        assert seq_range(conn, DAY0 + timedelta(days=7), None) is not None  # after all of it: a seq range
    entries = list(store.iter_entries())
    clock.now = DAY0 + timedelta(days=12)
    entries.append(_append(store, "late", "a"))
    for low, high in [(None, 1), (1, 2.5), (3, None), (6.5, None), (7, 9), (8, 8.5), (11, 13), (20, None)]:
        since = DAY0 + timedelta(days=low) if low is not None else None
        until = DAY0 + timedelta(days=high) if high is not None else None
        for team in (None, "b"):
            where = EntryFilter(team=team, since=since, until=until)
            assert [e.seq for e in search(store, where, limit=500).entries] == \
                _expected(entries, since, until, team), (low, high, team)
            assert count_matching(store.engine, where) == len(_expected(entries, since, until, team))


def test_downgrade_restores_audit_0004_and_upgrade_comes_back(store: AuditStore, raw: RawDB, clock: _Clock) -> None:
    entries = _fill(store, clock, [timedelta(days=d) for d in range(4)])
    with locked_transaction(store.engine, MIGRATE_LOCK_KEY) as conn:
        command.downgrade(alembic_config(conn), "audit_0004")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version_audit")).scalar() == "audit_0004"
    # audit_0004's guards are back: a second entry naming an existing predecessor is refused.
    with pytest.raises(Exception, match="prev_hash"):
        raw.execute("INSERT INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash)"
                    " VALUES (99, :t, 'x', 'request', '{}', :prev, 'f')",
                    {"t": "2026-03-09 00:00:00.000000" if raw.backend == "sqlite" else DAY0,
                     "prev": entries[1].prev_hash})
    migrate(store.engine)
    assert verify_chain(store).ok and store.head().seq == entries[-1].seq  # type: ignore[union-attr]
    _check_every_range(store, list(store.iter_entries()))
