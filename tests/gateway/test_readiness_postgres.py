"""Readiness on PostgreSQL: a server that answers reads but refuses writes is not ready.

A failover to a standby (in recovery) or a database left read-only
(``default_transaction_read_only``) answers ``SELECT 1`` while every append
fails: every request is refused 503 ``audit_unavailable``, and a readiness
probe that only read said "database ok" beside them. The read-only database
is made with ``ALTER DATABASE … SET default_transaction_read_only`` (new
sessions only: the gateway's pool is emptied after it). A standby needs a
second server and is not made here; :func:`audit.write_refusal` asks
``pg_is_in_recovery()`` for it. Uses the session's ``postgres_server``
(tests/conftest.py): skipped without PostgreSQL, failed instead when
``GOVGATE_TEST_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from audit import make_engine, write_refusal
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.db_setup import open_database
from tests.conftest import IDLE_MODEL, bearer

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def pg_url(postgres_server):
    url = postgres_server.fresh_database("ready")
    yield url
    postgres_server.drop_database(url)


def read_only(url: str, on: bool) -> None:
    """Make ``url``'s database read-only (or not) for the sessions that begin after this.

    Said from the server's maintenance database: a session of a read-only database cannot undo it.
    """
    engine = make_engine(make_url(url).set(database="postgres").render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(
                f'ALTER DATABASE "{make_url(url).database}" SET default_transaction_read_only = '
                + ("on" if on else "off")))
    finally:
        engine.dispose()


def test_write_refusal_names_a_read_only_postgresql_and_nothing_on_a_writable_one(pg_url):
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert write_refusal(conn) is None
        read_only(pg_url, True)
        engine.dispose()  # the next connection is a new session: read-only
        with engine.connect() as conn:
            assert write_refusal(conn) == "its transactions are read-only (default_transaction_read_only is on)"
    finally:
        engine.dispose()
        read_only(pg_url, False)


def test_write_refusal_says_nothing_about_sqlite(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with engine.connect() as conn:
            assert write_refusal(conn) is None
    finally:
        engine.dispose()


async def test_a_read_only_database_refuses_requests_and_readiness_says_why(settings, pg_url):
    own = settings.with_(database_url=pg_url)
    engine = open_database(own)
    key = KeyStore(engine).create("rita", team="ops", roles=["admin"]).secret
    engine.dispose()
    app = create_app(own)
    try:
        async with AsyncTestClient(app, timeout=60) as client:
            before = await client.get("/readyz")
            read_only(pg_url, True)
            app.state.components.db_engine.dispose()  # its pooled sessions predate the change
            response = await client.post("/v1/chat/completions", headers=bearer(key),
                                         json={"model": IDLE_MODEL, "messages": HELLO})
            during = await client.get("/readyz")
            read_only(pg_url, False)
            app.state.components.db_engine.dispose()
            after = await client.get("/readyz")
    finally:
        read_only(pg_url, False)
    assert before.json()["checks"]["database"] == "ok"
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "audit_unavailable"
    assert during.status_code == 503
    assert during.json()["checks"]["database"] == (
        "error: refuses writes: its transactions are read-only (default_transaction_read_only is on)")
    assert during.json()["missing"][0] == "database"
    assert after.json()["checks"]["database"] == "ok"
