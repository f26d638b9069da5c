"""The review searches' query plans use the indexes audit_0003 made, a time range as a seq range (SQLite's EXPLAIN QUERY PLAN)."""

from __future__ import annotations

import pytest
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.dialects import sqlite

from audit import AuditStore, make_engine, migrate
from audit.search import EntryFilter, _page, _seqs
from audit.tables import audit_table


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(engine)
    AuditStore(engine).append("request", "r", principal="p", team="t", model="m", body={}, policy_revision=None)
    yield engine
    engine.dispose()


def _plan(engine, where: EntryFilter, newest_first: bool = True) -> str:
    return _explain(engine, _page(engine, where, newest_first, 10, 51, _seqs(engine, where)))


def _explain(engine, stmt) -> str:
    compiled = stmt.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        return " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))


@pytest.mark.parametrize("column", ["principal", "team", "model", "kind"])
@pytest.mark.parametrize("newest_first", [True, False])
def test_a_filtered_page_reads_its_index_in_page_order(engine, column, newest_first):
    plan = _plan(engine, EntryFilter(**({"kinds": frozenset({"request"})} if column == "kind" else {column: "x"})),
                 newest_first)
    assert f"INDEX ix_audit_entries_{column}_seq" in plan
    # The page's seqs come in index order (no sort); only the page's own 51 rows are sorted, once fetched.
    picking, _, fetching = plan.partition("SCAN page")
    assert "TEMP B-TREE" not in picking and fetching
    if column != "kind":
        assert f"COVERING INDEX ix_audit_entries_{column}_seq" in picking  # no row is read to pick a page


_DAY = (datetime(2026, 10, 1, tzinfo=timezone.utc), datetime(2026, 10, 2, tzinfo=timezone.utc))


@pytest.mark.parametrize("column", ["principal", "team", "model"])
def test_a_column_within_a_time_range_is_one_stretch_of_its_seq_index(engine, column):
    """The range is a seq range (audit.time_order): no (column, created_at) index, and no row read to pick."""
    plan = _plan(engine, EntryFilter(**{column: "x"}, since=_DAY[0], until=_DAY[1]))
    picking = plan.partition("SCAN page")[0]
    assert f"COVERING INDEX ix_audit_entries_{column}_seq ({column}=? AND seq>? AND seq<?)" in picking
    assert "TEMP B-TREE" not in picking


def test_a_time_range_alone_is_a_stretch_of_the_primary_key(engine):
    picking = _plan(engine, EntryFilter(since=_DAY[0], until=_DAY[1])).partition("SCAN page")[0]
    assert "INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in picking and "TEMP B-TREE" not in picking


def test_each_end_of_a_time_range_is_one_seek_in_the_created_at_index(engine):
    _t = audit_table.c
    plan = _explain(engine, select(_t.seq).where(_t.created_at >= _DAY[0]).order_by(_t.created_at, _t.seq).limit(1))
    assert "COVERING INDEX ix_audit_entries_created_at (created_at>?)" in plan and "TEMP B-TREE" not in plan


def test_a_range_reaching_entries_older_than_the_ordered_stretch_filters_on_created_at(engine):
    """A store whose earlier entries went back in time (recorded by audit_0005) is searched the old way there."""
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_time_order SET ordered_from = 2, earlier_latest = '2026-10-01 12:00:00.000000'")
    assert _seqs(engine, EntryFilter(team="x", since=_DAY[0], until=_DAY[1])) is None
    picking = _plan(engine, EntryFilter(since=_DAY[0], until=_DAY[1])).partition("SCAN page")[0]
    assert "COVERING INDEX ix_audit_entries_created_at" in picking
    # Later than every earlier entry: the seq range again.
    assert _seqs(engine, EntryFilter(team="x", since=_DAY[1])) is not None
