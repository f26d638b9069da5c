"""The review searches' query plans use the indexes audit_0003 and audit_0004 made (SQLite's EXPLAIN QUERY PLAN)."""

from __future__ import annotations

import pytest
from datetime import datetime, timezone

from sqlalchemy.dialects import sqlite

from audit import AuditStore, make_engine, migrate
from audit.search import EntryFilter, _page


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(engine)
    AuditStore(engine).append("request", "r", principal="p", team="t", model="m", body={}, policy_revision=None)
    yield engine
    engine.dispose()


def _plan(engine, where: EntryFilter, newest_first: bool = True) -> str:
    stmt = _page(engine, where, newest_first, 10, 51)
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
def test_a_column_within_a_time_range_is_one_stretch_of_its_created_at_index(engine, column):
    plan = _plan(engine, EntryFilter(**{column: "x"}, since=_DAY[0], until=_DAY[1]))
    picking = plan.partition("SCAN page")[0]
    assert f"COVERING INDEX ix_audit_entries_{column}_created_at ({column}=? AND created_at>? AND created_at<?)" \
        in picking


def test_a_time_range_alone_picks_its_page_from_the_created_at_index_without_reading_rows(engine):
    picking = _plan(engine, EntryFilter(since=_DAY[0], until=_DAY[1])).partition("SCAN page")[0]
    assert "COVERING INDEX ix_audit_entries_created_at" in picking

