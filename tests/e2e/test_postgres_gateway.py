"""The whole product on PostgreSQL: ``govgate serve`` and a real Celery worker with ``GOVGATE_DATABASE_URL``
pointing at the session's PostgreSQL (tests/postgres_server.py), a fresh database of its own.

Both packages' migrations run there (the gateway's API keys, the audit table
and its triggers), the gateway appends the request entries, the worker the
completion entry, and the chain they build together verifies. And when the
server goes away, requests are refused (503, nothing queued, nothing half
written) until it is back, when they work again without a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from audit import AuditStore, make_engine, verify_chain
from audit.kinds import KEY_KINDS
from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.settings import Settings
from govgate.processes import stop_process
from tests.conftest import POSTGRES_MODEL, bearer, serving, spawn_cli, wait_for_worker
from tests.postgres_server import PostgresServer, own_postgres  # noqa: F401 - fixture


@pytest.fixture
def pg_settings(settings: Settings, postgres_server: PostgresServer) -> Iterator[Settings]:
    url = postgres_server.fresh_database("e2e")
    yield settings.with_(database_url=url)
    postgres_server.drop_database(url)


def _chat(base: str, key: str, content: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers=bearer(key), timeout=120,
                      json={"model": POSTGRES_MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": 8, "temperature": 0})


def test_a_gateway_and_worker_on_postgresql_audit_completions_and_denials_there(
        pg_settings: Settings, tmp_path: Path) -> None:
    url = pg_settings.effective_database_url
    assert url.startswith("postgresql+psycopg://")
    keys = KeyStore(open_database(pg_settings))
    admin = keys.create("pat", team="ops", roles=["admin"]).secret
    viewer = keys.create("val", team="research", roles=["viewer"]).secret
    keys.engine.dispose()

    worker = spawn_cli(pg_settings, "worker", "--model", POSTGRES_MODEL, log=tmp_path / "worker.log")
    try:
        with serving(pg_settings, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(pg_settings.redis_url, POSTGRES_MODEL, worker)
            done = _chat(base, admin, "Hello from PostgreSQL")
            denied = _chat(base, viewer, "Hello again")
    finally:
        stop_process(worker, timeout_s=30)
    assert done.status_code == 200, done.text
    # the viewer may see no model: answered as an unknown one, audited as the denial
    assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found", denied.text

    store = AuditStore(make_engine(url))
    try:
        done_id, denied_id = done.headers["x-govgate-request-id"], denied.headers["x-govgate-request-id"]
        request, completion = store.entries_for(done_id)
        assert (request.kind, request.principal, request.model) == ("request", "pat", POSTGRES_MODEL)
        assert request.body["decision"]["allow"] is True
        assert completion.kind == "completion" and store.terminal_for(done_id) == completion
        assert request.payload["messages"] == [{"role": "user", "content": "Hello from PostgreSQL"}]
        assert completion.payload["output"] == done.json()["choices"][0]["message"]["content"]
        [refusal] = store.entries_for(denied_id)
        assert (refusal.kind, refusal.principal) == ("request", "val")
        assert refusal.body["decision"]["allow"] is False and store.terminal_for(denied_id) is None

        entries = list(store.iter_entries())
        assert entries[0].kind == "chain_format"  # a new store's first entry
        keys = [e for e in entries[1:] if e.kind in KEY_KINDS]  # the test's keys, created on the chain
        assert [e.kind for e in keys] == ["key_created", "key_created"]
        assert {e.request_id for e in entries[1:] if e.kind not in KEY_KINDS} == {done_id, denied_id}
        result = verify_chain(store)
        assert result.ok and result.checked == len(entries) == 1 + 2 + 3
    finally:
        store.engine.dispose()

    plain = create_engine(url)  # the keys and both schemas' histories live in the same database
    try:
        with plain.connect() as conn:
            users = set(conn.execute(text('SELECT "user" FROM api_keys')).scalars())
            audit_version = conn.execute(text("SELECT version_num FROM alembic_version_audit")).scalar_one()
            gateway_version = conn.execute(text("SELECT version_num FROM alembic_version_gateway")).scalar_one()
    finally:
        plain.dispose()
    assert users == {"pat", "val"}
    assert audit_version.startswith("audit_") and gateway_version.startswith("gateway_")


def test_a_postgresql_outage_fails_requests_closed_and_service_returns_with_it(
        settings: Settings, own_postgres: PostgresServer, tmp_path: Path) -> None:
    if own_postgres.process is None:
        pytest.skip("GOVGATE_TEST_POSTGRES_URL: the server is not ours to stop")
    url = own_postgres.fresh_database("outage")
    own = settings.with_(database_url=url, auth_cache_ttl_s=600.0)  # the key from cache: the audit is what fails
    keys = KeyStore(open_database(own))
    admin = keys.create("olga", team="ops", roles=["admin"]).secret
    keys.engine.dispose()

    worker = spawn_cli(own, "worker", "--model", POSTGRES_MODEL, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, POSTGRES_MODEL, worker)
            before = _chat(base, admin, "before")
            own_postgres.pause()
            try:
                during = _chat(base, admin, "during")
            finally:
                own_postgres.resume()
            after = _chat(base, admin, "after")
    finally:
        stop_process(worker, timeout_s=30)
    assert before.status_code == 200, before.text
    assert during.status_code == 503 and during.json()["error"]["code"] == "audit_unavailable", during.text
    assert after.status_code == 200, after.text

    store = AuditStore(make_engine(url))
    try:
        entries = list(store.iter_entries())
        ids = [response.headers["x-govgate-request-id"] for response in (before, after)]
        assert [(e.kind, e.request_id) for e in entries[1:] if e.kind not in KEY_KINDS] == [
            ("request", ids[0]), ("completion", ids[0]), ("request", ids[1]), ("completion", ids[1])]
        assert verify_chain(store).ok  # nothing of the refused request, and no gap
    finally:
        store.engine.dispose()


def test_a_lock_held_on_the_audit_table_refuses_requests_after_the_busy_timeout_and_readiness_says_so(
        pg_settings: Settings, tmp_path: Path) -> None:
    """A reviewer's ``LOCK TABLE`` (or a long transaction's strong lock) held every request with no end."""
    own = pg_settings.with_(database_busy_timeout_s=2.0, auth_cache_ttl_s=600.0)
    url = own.effective_database_url
    keys = KeyStore(open_database(own))
    admin = keys.create("lena", team="ops", roles=["admin"]).secret
    keys.engine.dispose()
    reviewer = psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    worker = spawn_cli(own, "worker", "--model", POSTGRES_MODEL, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, POSTGRES_MODEL, worker)
            before = _chat(base, admin, "before")
            reviewer.execute("LOCK TABLE audit_entries IN ACCESS EXCLUSIVE MODE")
            try:
                during = _chat(base, admin, "during")
                ready_during = httpx.get(f"{base}/readyz", timeout=30)
            finally:
                reviewer.rollback()
            after = _chat(base, admin, "after")
            ready_after = httpx.get(f"{base}/readyz", timeout=30)
    finally:
        reviewer.close()
        stop_process(worker, timeout_s=30)
    assert before.status_code == 200, before.text
    assert during.status_code == 503 and during.json()["error"]["code"] == "audit_unavailable", during.text
    assert ready_during.json()["checks"]["database"] == (
        "error: refuses writes: another session holds a lock on the audit table (appends wait for it, then fail)")
    assert "database" in ready_during.json()["missing"]
    assert after.status_code == 200, after.text
    assert ready_after.json()["checks"]["database"] == "ok"

    store = AuditStore(make_engine(url))
    try:
        ids = [response.headers["x-govgate-request-id"] for response in (before, after)]
        assert [(e.kind, e.request_id) for e in store.iter_entries() if e.kind not in KEY_KINDS][1:] == [
            ("request", ids[0]), ("completion", ids[0]), ("request", ids[1]), ("completion", ids[1])]
        assert verify_chain(store).ok
    finally:
        store.engine.dispose()
