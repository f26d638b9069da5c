"""A PostgreSQL server that stops answering (every process SIGSTOPped): a served gateway refuses 503, then recovers.

A frozen server's kernel still accepts connections and ACKs segments, so
nothing but govgate's own bounds ends a wait on it: the kept writer's
transaction (:mod:`audit.stall_watch`), every wait on a pooled session,
the pool's pre-ping included (:mod:`audit.answer_watch`), and the connect
timeout (``?connect_timeout=2`` in the URL here) for a new session, the
writer's included (it connects beside the pool). Requests arrive while it
is frozen, a few at once and one after another (each later one reconnects),
one with a key the gateway has not cached (the key look-up reads through
the pool): each is answered with an OpenAI-shaped 503, none is held. After
SIGCONT the same gateway serves again, and the audit says only what was
served: each accepted request once with one terminal entry, the chain
whole. The server is this test's own (``GOVGATE_TEST_POSTGRES_URL``'s is
not ours to freeze), and SIGCONT comes in a ``finally``.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from audit import AuditStore, make_engine, verify_chain
from audit.kinds import KEY_KINDS, TERMINAL_KINDS
from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.settings import Settings
from govgate.processes import stop_process
from tests.conftest import POSTGRES_MODEL, bearer, serving, spawn_cli, wait_for_worker
from tests.postgres_server import PostgresServer, own_postgres  # noqa: F401 - fixture

#: Short, so the test does not wait long for the bounds (their lengths are never asserted).
BUSY_S = 1.0
#: Only a guard against hanging the suite when a bound is missing: far beyond every bound here.
HANG_GUARD_S = 60.0


def server_pids(postmaster: int) -> list[int]:
    """The postmaster and its children (every backend and auxiliary process)."""
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if ppid == postmaster:
                pids.append(int(entry))
    return pids


def _chat(base: str, key: str, content: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers=bearer(key), timeout=HANG_GUARD_S,
                      json={"model": POSTGRES_MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": 4, "temperature": 0})


def _refused(response: httpx.Response, code: str) -> bool:
    """A 503 in OpenAI's error shape with ``code``."""
    if response.status_code != 503:
        return False
    error = response.json().get("error") or {}
    return error.get("code") == code and bool(error.get("message")) and bool(error.get("type"))


def test_a_frozen_postgresql_server_refuses_requests_in_bounded_time_and_service_returns_with_it(
        settings: Settings, own_postgres: PostgresServer, tmp_path: Path) -> None:
    if own_postgres.process is None:
        pytest.skip("GOVGATE_TEST_POSTGRES_URL: the server is not ours to freeze")
    url = own_postgres.fresh_database("frozen")
    own = settings.with_(database_url=f"{url}?connect_timeout=2", database_busy_timeout_s=BUSY_S,
                         auth_cache_ttl_s=600.0)
    keys = KeyStore(open_database(own))
    cached = keys.create("fern", team="ops", roles=["admin"]).secret
    uncached = keys.create("ugo", team="ops", roles=["admin"]).secret
    second = keys.create("sid", team="ops", roles=["admin"]).secret
    keys.engine.dispose()

    worker = spawn_cli(own, "worker", "--model", POSTGRES_MODEL, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, POSTGRES_MODEL, worker)
            before = _chat(base, cached, "before")  # the key is cached from here on; the writer has its session
            # A look-up after the writer connected leaves an idle session in the pool: the frozen server's
            # session that a pooled read (or a writer reconnecting through the pool) would pre-ping first.
            before_second = _chat(base, second, "before, second")
            frozen = server_pids(own_postgres.process.pid)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(3) as pool:  # arriving together: one appends, the others wait for it
                    together = list(pool.map(lambda n: _chat(base, cached, f"together {n}"), range(3)))
                later = [_chat(base, cached, f"later {n}") for n in range(2)]  # each reconnects to the frozen server
                unknown = _chat(base, uncached, "who am I")  # the key look-up reads through the pool
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            after = _chat(base, cached, "after")
            after_unknown = _chat(base, uncached, "after, who am I")
    finally:
        stop_process(worker, timeout_s=30)

    assert before.status_code == 200, before.text
    assert before_second.status_code == 200, before_second.text
    for response in (*together, *later):
        assert _refused(response, "audit_unavailable"), (response.status_code, response.text)
    assert _refused(unknown, "auth_unavailable"), (unknown.status_code, unknown.text)
    assert after.status_code == 200, after.text
    assert after_unknown.status_code == 200, after_unknown.text

    store = AuditStore(make_engine(url))
    try:
        entries = [e for e in store.iter_entries() if e.kind not in KEY_KINDS][1:]  # after chain_format
        served = [r.headers["x-govgate-request-id"] for r in (before, before_second, after, after_unknown)]
        assert [e.request_id for e in entries if e.kind == "request"] == served  # nothing of a refused one
        for request_id in served:  # every accepted request ended exactly once
            assert [e.kind for e in entries if e.request_id == request_id and e.kind in TERMINAL_KINDS] == [
                "completion"], request_id
        assert len(entries) == 2 * len(served)
        assert verify_chain(store).ok
    finally:
        store.engine.dispose()
