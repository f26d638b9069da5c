"""Keys on the chain on PostgreSQL: the key row rides in the append's transaction there too.

The key statements run on the append's own psycopg cursor (named
parameters, an advisory lock instead of ``BEGIN IMMEDIATE``), so this is
not the SQLite path again. Uses the session's ``postgres_server``
(tests/conftest.py): skipped without PostgreSQL, failed instead when
``GOVGATE_TEST_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from audit import AuditStore, verify_chain
from audit.key_ledger import BACKFILL_REQUEST_ID, key_request_id
from gateway.auth import KeyStore
from gateway.db_setup import open_database
from govgate.cli_keys import key_discrepancies


@pytest.fixture
def pg_engine(postgres_server, settings):
    server = postgres_server
    url = server.fresh_database("keys")
    engine = open_database(settings.with_(database_url=url))
    yield engine
    engine.dispose()
    server.drop_database(url)


def test_changes_are_entries_and_sql_tampering_is_reported_on_postgresql(pg_engine):
    store = KeyStore(pg_engine)
    key_id = store.create("ann", team="ops", roles=["viewer"], by="t").key.key_id
    other = store.create("bob", team=None, roles=["analyst"], by="t").key.key_id
    assert store.set_roles(key_id, ["admin", "viewer"], by="t").changed
    assert store.revoke(key_id, by="t") and not store.revoke(key_id, by="t")
    assert [e.kind for e in AuditStore(pg_engine).entries_for(key_request_id(key_id))] == [
        "key_created", "key_roles_changed", "key_revoked"]
    assert key_discrepancies(pg_engine) == (2, [])
    assert AuditStore(pg_engine).entries_for(BACKFILL_REQUEST_ID) == []
    with pg_engine.begin() as conn:  # api_keys has no guard: plain SQL
        conn.execute(text("UPDATE api_keys SET revoked_at = NULL WHERE key_id = :k"), {"k": key_id})
        conn.execute(text("UPDATE api_keys SET roles_json = '[\"admin\"]' WHERE key_id = :k"), {"k": other})
    known, problems = key_discrepancies(pg_engine)
    assert sorted(": ".join(p.split(": ")[:2]) for p in problems) == sorted(
        [f"key {key_id}: revoked_on_chain_only", f"key {other}: roles_differ"])
    assert verify_chain(pg_engine).ok  # the chain itself is untouched
