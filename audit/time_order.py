"""A time range as a ``seq`` range: along the chain ``created_at`` never goes back, so one is the other.

Why: a search "this team, last Tuesday" pages on the ``(team, seq)`` index.
To find a page within a time range it used an index on ``(team,
created_at)`` per searched column (audit_0004); those three indexes cost an
append a third of SQLite's work (bench/audit_sqlite_floor.py), since each
puts a random leaf page in every commit. The append now gives each entry
the later of the clock and its predecessor's time (:mod:`audit.appender`),
so on the chain's ordered stretch the entries of ``[since, until)`` are the
entries of one ``seq`` range, whose ends are two seeks in the ``created_at``
index: the first entry at or after ``since``, the first at or after ``until``.

Entries written before audit_0005 may go back in time (a clock stepped
back). The migration recorded where the ordered stretch begins
(``audit_time_order``) and the latest time before it; a range that could
reach those earlier entries gets no ``seq`` range (``None``), and the search
filters on ``created_at`` as before: slower, never wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Connection

from .tables import audit_table, time_order_table

log = logging.getLogger(__name__)

_t = audit_table.c
_o = time_order_table.c


@dataclass(frozen=True, slots=True)
class SeqRange:
    """The entries of a time range: ``start <= seq < stop`` (None: unbounded), or none at all (``empty``)."""

    start: int | None
    stop: int | None
    empty: bool = False


def seq_range(conn: Connection, since: datetime | None, until: datetime | None) -> SeqRange | None:
    """The seq range holding exactly the entries with ``since <= created_at < until``, or None.

    None when no range is asked for, when the store has no time-order
    record, or when the range could reach entries written before the
    ordered stretch: then the caller filters on ``created_at`` itself.
    """
    if since is None and until is None:
        return None
    order = conn.execute(select(_o.ordered_from, _o.earlier_latest).where(_o.id == 1)).first()
    if order is None:
        return None
    ordered_from, earlier_latest = order
    if ordered_from > 1 and (since is None or earlier_latest is None or since <= earlier_latest):
        return None  # entries before the ordered stretch may fall in the range
    start = _first_at_or_after(conn, since) if since is not None else None
    if since is not None and start is None:
        return SeqRange(None, None, empty=True)  # nothing that late
    stop = _first_at_or_after(conn, until) if until is not None else None
    if not _in_order_around(conn, start) or not _in_order_around(conn, stop):
        return None  # the times go back there: the caller filters on created_at, never wrong
    return SeqRange(start, stop)


def _in_order_around(conn: Connection, seq: int | None) -> bool:
    """Whether ``created_at`` does not go back from entry ``seq - 1`` to ``seq`` to ``seq + 1`` (one look by
    seq, three rows).

    A boundary found by time is where an entry whose time was rewritten would land: one dated in the future
    is the first "at or after" any later moment, and every entry after it fell out of the range (probe s59 F5:
    an export of the last day gave 7 of 29 entries, and the review API none of the newest). Such an entry
    breaks the chain (``verify`` names it); here it only costs the range its shortcut.
    """
    if seq is None:
        return True
    times = [row[0] for row in conn.execute(select(_t.created_at).where(_t.seq.between(seq - 1, seq + 1))
                                            .order_by(_t.seq))]
    if all(earlier <= later for earlier, later in zip(times, times[1:])):
        return True
    log.warning("audit entries around seq %d are not in time order (a rewritten created_at?): a time range is "
                "searched by time alone; run `govgate audit verify`", seq)
    return False


def _first_at_or_after(conn: Connection, moment: datetime) -> int | None:
    """The lowest seq whose ``created_at`` is ``moment`` or later: one seek in the ``created_at`` index.

    In time order, ties by seq; on the ordered stretch that is seq order,
    so the first row found is the lowest seq.
    """
    stmt = select(_t.seq).where(_t.created_at >= moment).order_by(_t.created_at, _t.seq).limit(1)
    return conn.execute(stmt).scalar()
