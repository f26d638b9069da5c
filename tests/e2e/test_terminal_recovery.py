"""Every accepted request ends in a terminal entry, whoever dies or whatever is locked.

A gateway killed while its jobs wait in the queue, a database locked for
longer than its busy timeout: each test breaks the real part and waits for
the terminal entries the promise requires. The locked-database tests own
their database and give it a short busy timeout (``GOVGATE_DATABASE_BUSY_TIMEOUT_S``),
so a lock held "longer than the busy timeout" costs seconds, not half a minute each.
"""

from __future__ import annotations

import asyncio
import json
import contextlib
import os
import signal
import sqlite3
import threading
import time
from typing import Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from audit import AuditStore, make_engine, verify_chain
from audit.db import MIGRATIONS_DIR, VERSION_TABLE
from audit.migration_heads import at_head

from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.limits import UsageCounters
from govgate.processes import stop_process
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.e2e.test_crash_safety import started_jobs
from tests.gateway.test_fail_closed import queued
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.pending_terminals import PENDING_KEY
from workers.contract.registry import TINY_MODEL_NAME

#: The busy timeout of the locked-database tests' own stores (the default is 30 s): what they hold
#: the lock longer than. Short, yet long enough that a busy machine's ordinary writes never hit it.
SHORT_BUSY_TIMEOUT_S = 3.0
#: The locked-database test's generation: long enough that the lock, taken as soon as the job is seen
#: starting (milliseconds), is held before the generation ends (about a second and more on a busy machine);
#: 4000 tokens cost ~5 s a run for nothing more.
LOCKED_MAX_TOKENS = 1000


def wait_terminals(audit_store, request_ids: list[str], timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    found: dict = {}
    while time.monotonic() < deadline and len(found) < len(request_ids):
        for request_id in request_ids:
            if request_id not in found and (entry := audit_store.terminal_for(request_id)) is not None:
                found[request_id] = entry
        time.sleep(0.2)
    missing = [r for r in request_ids if r not in found]
    assert not missing, f"no terminal entry for {missing}"
    return found


def own_key(settings, user: str) -> str:
    """A key of a principal no other test uses, so its audit entries are this test's alone."""
    engine = open_database(settings)
    try:
        return KeyStore(engine).create(user, team="ops", roles=["admin"]).secret
    finally:
        engine.dispose()


def test_jobs_queued_by_a_killed_gateway_are_recorded_as_expired(own_redis, audit_store, tmp_path):
    # Long enough for three requests to be queued and their gateway killed before any times out (well under
    # a second here); the test then waits it out.
    own = own_redis.with_(request_timeout_s=5.0)
    key = own_key(own, "expiry-user")
    before = audit_store.head().seq if audit_store.head() else 0
    answered: list[int] = []
    with serving(own, tmp_path / "serve.log") as base:
        def ask(n: int) -> None:
            try:
                answered.append(httpx.post(f"{base}/v1/completions", headers=bearer(key), timeout=60,
                                           json={"model": TINY_MODEL_NAME, "prompt": f"expiry {n}",
                                                 "max_tokens": 4, "stream": n == 0}).status_code)
            except httpx.HTTPError:  # the gateway died under the request
                pass

        sent = time.monotonic()
        askers = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
        for thread in askers:
            thread.start()
        deadline = time.monotonic() + 30
        while queued(own, TINY_MODEL_NAME) < 3:
            assert time.monotonic() < deadline, "the requests were never queued"
            time.sleep(0.05)
        os.kill(base.process.pid, signal.SIGKILL)
        for thread in askers:
            thread.join(30)
    assert answered == []  # nobody was answered: the gateway died with all three waiting
    ids = [e.request_id for e in audit_store.iter_entries(before)
           if e.kind == "request" and e.principal == "expiry-user"]
    assert len(ids) == 3 and all(audit_store.terminal_for(i) is None for i in ids)
    time.sleep(max(0.0, sent + own.request_timeout_s + 1 - time.monotonic()))  # past every deadline
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    try:
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
        terminals = wait_terminals(audit_store, ids)
    finally:
        stop_process(worker, timeout_s=30)
    for entry in terminals.values():
        assert entry.kind == "timed_out" and entry.body["error"]["code"] == "expired"
        assert entry.payload["output"] == ""


def first_started(client: redis.Redis, within_s: float = 60) -> str:
    """The request id of the first job seen starting (the locked tests take the lock as soon as it is)."""
    deadline = time.monotonic() + within_s
    while not (started := list(started_jobs(client))):
        assert time.monotonic() < deadline, "the generation was never seen starting"
        time.sleep(0.01)
    return started[0].decode().rsplit(":", 1)[1]


@contextlib.contextmanager
def locked(database_url: str) -> Iterator[sqlite3.Connection]:
    """Hold the SQLite database's write lock (as a long transaction elsewhere would) until the block ends."""
    conn = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None, timeout=60)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture(params=[True, False], ids=["gateway-records", "worker-records"])
def own_everything(own_redis, tmp_path, request):
    """A database and Redis of their own, a key in that database, and a tiny-model worker on both, started (the
    test waits for it once its gateway is starting too); with the output rules on the gateway records a
    completion's end (handed over), with them off its worker does."""
    own = own_redis.with_(database_url=f"sqlite:///{tmp_path / 'own.db'}", request_timeout_s=120.0,
                          database_busy_timeout_s=SHORT_BUSY_TIMEOUT_S, output_rules=request.param)
    key = own_key(own, "locked-user")
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    try:
        yield own, key, worker
    finally:
        stop_process(worker, timeout_s=30)


def test_a_terminal_entry_refused_by_a_locked_database_is_written_when_it_is_back(own_everything, tmp_path):
    own, key, worker = own_everything
    store = AuditStore(make_engine(own.effective_database_url))
    client = redis.Redis.from_url(own.redis_url)
    outcome: dict = {}
    with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
        def ask() -> None:
            outcome["response"] = httpx.post(
                f"{base}/v1/completions", headers=bearer(key), timeout=300,
                json={"model": TINY_MODEL_NAME, "prompt": "Tell", "max_tokens": LOCKED_MAX_TOKENS,
                      "temperature": 0})

        asker = threading.Thread(target=ask)
        asker.start()
        request_id = first_started(client)
        with locked(own.effective_database_url):  # longer than the busy timeout of worker and gateway
            asker.join(280)
            response = outcome["response"]
            assert store.terminal_for(request_id) is None
            assert client.hexists(PENDING_KEY, request_id)  # kept, to be written later
        terminal = wait_terminals(store, [request_id], timeout_s=60)[request_id]
        deadline = time.monotonic() + 30
        while client.hexists(PENDING_KEY, request_id):
            assert time.monotonic() < deadline, "the written entry stayed pending"
            time.sleep(0.1)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "audit_unavailable"
    assert terminal.kind == "failed" and terminal.body["error"]["code"] == "audit_unavailable"
    assert terminal.body["ended_as"] == "completion"
    # what was generated
    assert terminal.body["usage"]["completion_tokens"] == LOCKED_MAX_TOKENS and terminal.payload["output"]
    assert [e.kind for e in store.entries_for(request_id)] == ["request", "failed"]
    assert verify_chain(store).ok
    usage = principal_usage(own.redis_url, "locked-user", "ops")
    assert usage["in_flight"] == 0
    assert usage["tokens_today"] == terminal.body["usage"]["total_tokens"]  # the model ran: charged, not free
    store.engine.dispose()


def principal_usage(redis_url: str, principal: str, team: str) -> dict:
    """The principal's counters as admission reads them."""
    async def read() -> dict:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return (await UsageCounters(client).snapshot(principal, team))["principal"]
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_a_worker_started_while_the_database_is_locked_waits_for_it_when_it_must_migrate(own_redis, tmp_path):
    """The schema is not there yet: the worker's migration needs the write lock, and it waits for it."""
    own = own_redis.with_(database_url=f"sqlite:///{tmp_path / 'own.db'}",
                          database_busy_timeout_s=SHORT_BUSY_TIMEOUT_S)
    with make_engine(own.effective_database_url).connect():  # the file, in WAL mode, without any table
        pass
    log = tmp_path / "worker.log"
    with locked(own.effective_database_url):
        worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=log)
        try:
            deadline = time.monotonic() + 120
            while "waiting for it" not in log.read_text():
                assert worker.poll() is None, f"the worker exited with {worker.returncode}"
                assert time.monotonic() < deadline, "the worker never said it waits for the database"
                time.sleep(0.5)
        except BaseException:
            stop_process(worker, timeout_s=30)
            raise
    try:
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker, timeout_s=120)
    finally:
        stop_process(worker, timeout_s=30)
    engine = make_engine(own.effective_database_url)
    try:
        with engine.connect() as conn:  # the worker migrated once the lock was gone
            assert at_head(conn, MIGRATIONS_DIR / "versions", VERSION_TABLE)
    finally:
        engine.dispose()


def test_a_worker_started_while_the_database_is_locked_serves_when_its_schema_is_current(own_redis, tmp_path):
    """A current schema is told by reading it (WAL: readers pass a writer's lock), so nothing waits for the
    lock at start: the worker is up while the lock is still held (its appends have their own way past a
    locked database: the pending terminal entries)."""
    own = own_redis.with_(database_url=f"sqlite:///{tmp_path / 'own.db'}",
                          database_busy_timeout_s=SHORT_BUSY_TIMEOUT_S)
    open_database(own).dispose()
    log = tmp_path / "worker.log"
    with locked(own.effective_database_url):
        worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=log)
        try:
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker, timeout_s=120)
        finally:
            stop_process(worker, timeout_s=30)
    assert "waiting for it" not in log.read_text()


def test_a_checked_stream_whose_end_is_kept_pending_gets_its_delivered_entry_once_the_end_is_written(
        own_redis, tmp_path):
    """A checked stream ends while the database is locked: its worker's end is kept pending, and the stream
    ends with ``audit_unavailable`` instead of its last window, so the client got less than the verdict's
    text (which the kept end held as ``client_output`` until 2026-12-05; now none). The gateway's
    ``delivered`` entry cannot find the end, so it
    waits in the gateway's memory; once the lock is gone and the worker's retry wrote the end, the
    gateway's next look appends it with what the client did receive. Real parts: gateway and worker
    processes, their Redis, a SQLite file locked by a transaction elsewhere."""
    own = own_redis.with_(database_url=f"sqlite:///{tmp_path / 'own.db'}", request_timeout_s=120.0,
                          database_busy_timeout_s=SHORT_BUSY_TIMEOUT_S, output_rules=True,
                          terminal_retry_interval_s=0.5)
    key = own_key(own, "locked-stream-user")
    serve_log = tmp_path / "serve.log"
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    store = AuditStore(make_engine(own.effective_database_url))
    client = redis.Redis.from_url(own.redis_url)
    received: list[str] = []
    try:
        with serving(own, serve_log) as base:
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)

            def ask() -> None:
                with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=300,
                                  json={"model": TINY_MODEL_NAME, "prompt": "Tell", "stream": True,
                                        "max_tokens": LOCKED_MAX_TOKENS, "temperature": 0}) as response:
                    received.extend(line for line in response.iter_lines() if line.startswith("data: "))

            asker = threading.Thread(target=ask)
            asker.start()
            request_id = first_started(client)
            with locked(own.effective_database_url):  # longer than the busy timeout of worker and gateway
                asker.join(280)
                assert not asker.is_alive()
                assert store.terminal_for(request_id) is None and client.hexists(PENDING_KEY, request_id)
                deadline = time.monotonic() + 30
                while "waits for the request's end" not in serve_log.read_text():
                    assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
                    time.sleep(0.1)
            terminal = wait_terminals(store, [request_id], timeout_s=60)[request_id]
            deadline = time.monotonic() + 30
            while f"what the client of {request_id} received is recorded now" not in serve_log.read_text():
                assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
                time.sleep(0.1)
    finally:
        stop_process(worker, timeout_s=30)
        client.close()
    events = [json.loads(line.removeprefix("data: ")) for line in received if line != "data: [DONE]"]
    assert events[-1]["error"]["code"] == "audit_unavailable", events[-1]
    text = "".join(e["choices"][0]["text"] for e in events if "choices" in e)
    assert text and terminal.kind == "failed" and terminal.body["error"]["code"] == "audit_unavailable"
    # the kept end does not claim the verdict's text (the client's and the window it never got) reached it
    assert "client_output" not in terminal.payload and terminal.payload["output"].startswith(text)
    entries = store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "failed", "delivered"]
    assert entries[-1].body["terminal_seq"] == terminal.seq and entries[-1].payload["client_output"] == text
    assert verify_chain(store).ok
    store.engine.dispose()
