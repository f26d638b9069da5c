"""The review searches' query plans use the indexes audit_0003 made (SQLite's EXPLAIN QUERY PLAN)."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import sqlite

from audit import AuditStore, make_engine, migrate
from audit.search import EntryFilter, _ordered
from audit.tables import audit_table


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(engine)
    AuditStore(engine).append("request", "r", principal="p", team="t", model="m", body={}, policy_revision=None)
    yield engine
    engine.dispose()


def _plan(engine, where: EntryFilter, newest_first: bool = True) -> str:
    stmt = _ordered(select(audit_table), engine, where, newest_first, 10).limit(51)
    compiled = stmt.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        return " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))


@pytest.mark.parametrize("column", ["principal", "team", "model", "kind"])
@pytest.mark.parametrize("newest_first", [True, False])
def test_a_filtered_page_reads_its_index_in_page_order(engine, column, newest_first):
    plan = _plan(engine, EntryFilter(**({"kinds": frozenset({"request"})} if column == "kind" else {column: "x"})),
                 newest_first)
    assert f"ix_audit_entries_{column}_seq" in plan
    assert "TEMP B-TREE" not in plan  # no sort: the index gives the order

