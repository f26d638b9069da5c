"""When a dependency fails, the gateway refuses clearly and audits what it can.

Each test breaks one real part (the database schema, the policy, Redis) or
starves a request of a worker, and checks that the client gets a designed
error, that nothing reached a worker, and that the audit trail says what
happened.
"""

from __future__ import annotations

import re
import shutil
import sqlite3

import pytest
import redis
from litestar.testing import AsyncTestClient

from audit import AuditStore, make_engine, verify_chain
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.redis_server import RedisProcess
from tests.conftest import IDLE_MODEL, bearer
from tests.own_redis import OUT_OF_MEMORY
from workers.contract.queue_layout import queue_keys
from workers.contract.fair_queues import registry_key
from workers.contract.jobs import queue_for
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Hello"}]


def queued(settings, model: str) -> int:
    """Jobs waiting for ``model``: on its plain lists (fifo mode) and on its registered fair lists."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        keys = [*queue_keys(queue_for(model)), *client.zrange(registry_key(model), 0, -1)]
        return sum(client.llen(key) for key in keys)
    finally:
        client.close()


@pytest.fixture
def own_database(settings, tmp_path):
    """Settings with a database of their own (so breaking it spares the session's) and a key in it."""
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'own.db'}")
    engine = open_database(own)
    key = KeyStore(engine).create("olga", team="ops", roles=["admin"]).secret
    engine.dispose()
    return own, key


async def test_audit_store_failure_refuses_with_503_and_queues_nothing(own_database):
    own, key = own_database
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        before = queued(own, IDLE_MODEL)
        db_file = own.effective_database_url.removeprefix("sqlite:///")
        with sqlite3.connect(db_file) as raw:  # the audit table disappears under the running gateway
            raw.execute("DROP TABLE audit_entries")
        response = await client.post("/v1/chat/completions", headers=bearer(key),
                                     json={"model": IDLE_MODEL, "messages": HELLO})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "audit_unavailable"
        assert queued(own, IDLE_MODEL) == before


@pytest.mark.parametrize("body", [{"model": IDLE_MODEL, "messages": HELLO, "max_tokens": -1},  # 422 with an entry
                                  {"model": "no-such-model", "messages": HELLO},                 # 404
                                  {"model": IDLE_MODEL, "messages": HELLO, "frobnicate": 1}],    # 400
                         ids=["invalid-value", "unknown-model", "unknown-field"])
async def test_a_refusal_whose_rejected_entry_cannot_be_written_is_a_503(own_database, body):
    """A bad body was answered its 4xx with its ``rejected`` entry only logged as missing (a probe held
    SQLite's write lock past the busy timeout: 32 of 48 refusals left no entry): nothing is answered
    unaudited, so it is a 503 ``audit_unavailable``, and the client's retry gets its refusal."""
    own, key = own_database
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        refused = await client.post("/v1/chat/completions", headers=bearer(key), json=body)
        assert 400 <= refused.status_code < 500, refused.text  # with the store up: its refusal, and its entry
        db_file = own.effective_database_url.removeprefix("sqlite:///")
        with sqlite3.connect(db_file) as raw:
            assert raw.execute("SELECT count(*) FROM audit_entries WHERE request_id = ? AND kind = 'rejected'",
                               (refused.headers["x-govgate-request-id"],)).fetchone() == (1,)
            raw.execute("DROP TABLE audit_entries")
        response = await client.post("/v1/chat/completions", headers=bearer(key), json=body)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "audit_unavailable"
        assert response.headers["x-govgate-request-id"]


async def test_policy_error_denies_and_is_audited(settings, keyring, audit_store, tmp_path):
    broken = tmp_path / "policies"
    shutil.copytree(settings.policy_dir, broken, ignore=shutil.ignore_patterns("*_test.rego"))
    rego = broken / "govgate.rego"
    # Loads (an empty trial input leaves it undefined), then fails on every real request: a division by zero.
    source = rego.read_text()
    assert '"max_tokens": granted_max_tokens,' in source
    rego.write_text(source.replace('"max_tokens": granted_max_tokens,',
                                   '"max_tokens": granted_max_tokens / (count(input.request.text) * 0),'))
    async with AsyncTestClient(create_app(settings.with_(policy_dir=broken)), timeout=60) as client:
        before = queued(settings, IDLE_MODEL)
        response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                     json={"model": IDLE_MODEL, "messages": HELLO})
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "policy_denied"
    assert [r["code"] for r in error["reasons"]] == ["policy_error"]
    # the newest request entry: a start's chain_anomaly (judged up to 5 s after it began) may follow it
    entry = [e for e in audit_store.tail(5) if e.kind == "request"][-1]
    assert entry.body["decision"]["allow"] is False
    assert queued(settings, IDLE_MODEL) == before


async def test_redis_down_refuses_with_503_and_ends_the_request(settings, keyring, audit_store, short_tmp):
    own_redis = RedisProcess.start(short_tmp("gg-r-"), persist=False)
    try:
        async with AsyncTestClient(create_app(settings.with_(redis_url=own_redis.url)), timeout=60) as client:
            own_redis.stop()
            response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                         json={"model": TINY_MODEL_NAME, "messages": HELLO})
            health = await client.get("/readyz")
    finally:
        own_redis.stop()
    # The usage counters are the first to need Redis: the request is refused before any queueing.
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "usage_unavailable"
    request_entry = audit_store.tail(1)[0]
    assert request_entry.kind == "request"
    assert request_entry.body["decision"]["allow"] is False
    assert [r["code"] for r in request_entry.body["decision"]["reasons"]] == ["usage_unavailable"]
    assert audit_store.terminal_for(request_entry.request_id) is None  # never accepted, so no terminal entry
    assert health.status_code == 503
    assert health.json()["checks"]["redis"].startswith("error")
    assert health.json()["missing"][0] == "redis"


async def test_full_redis_refuses_with_503_and_readiness_says_why(settings, keyring, audit_store, short_tmp):
    """A Redis that answers reads but refuses writes (full, under ``noeviction``) refuses every request;
    readiness must not call it ready (its probe read only, once: "redis ok" beside 503s)."""
    own_redis = RedisProcess.start(short_tmp("gg-r-"), persist=False)
    try:
        async with AsyncTestClient(create_app(settings.with_(redis_url=own_redis.url)), timeout=60) as client:
            ready_before = await client.get("/readyz")
            raw = redis.Redis.from_url(own_redis.url)
            try:
                raw.config_set("maxmemory", "1")  # below what it holds: every write is refused (OOM)
                response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                             json={"model": TINY_MODEL_NAME, "messages": HELLO})
                health = await client.get("/readyz")
                raw.config_set("maxmemory", "0")  # room again: ready as far as Redis goes
                healed = await client.get("/readyz")
            finally:
                raw.close()
    finally:
        own_redis.stop()
    assert ready_before.json()["checks"]["redis"] == "ok"
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "usage_unavailable"
    request_entry = audit_store.tail(1)[0]
    assert request_entry.kind == "request"
    # The usage snapshot is a read, so the policy decided; the reservation, a write, was refused.
    assert request_entry.body["admission"]["admitted"] is False
    assert request_entry.body["admission"]["code"] == "usage_unavailable"
    assert re.search(OUT_OF_MEMORY, request_entry.body["admission"]["message"])
    assert audit_store.terminal_for(request_entry.request_id) is None
    assert health.status_code == 503
    redis_check = health.json()["checks"]["redis"]
    assert redis_check.startswith("error: refuses writes: OutOfMemoryError: command not allowed"), redis_check
    assert health.json()["missing"][0] == "redis"
    assert health.json()["checks"]["workers"] != "error: unknown (Redis unreadable)"
    assert healed.json()["checks"]["redis"] == "ok"


async def test_no_worker_in_time_is_504_with_one_timed_out_entry(settings, keyring, audit_store):
    async with AsyncTestClient(create_app(settings.with_(request_timeout_s=0.5)), timeout=60) as client:
        response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                     json={"model": IDLE_MODEL, "messages": HELLO})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timed_out"
    request_entry, terminal = audit_store.tail(2)
    assert (request_entry.kind, terminal.kind) == ("request", "timed_out")
    assert audit_store.terminal_for(request_entry.request_id).kind == "timed_out"
    assert verify_chain(audit_store).ok


def test_chain_in_own_database_is_separate(own_database):
    own, _ = own_database
    store = AuditStore(make_engine(own.effective_database_url))
    # Only the creation of its own key is on it (key changes are audited), none of the session's requests.
    assert [entry.kind for entry in store.tail(10) if entry.kind != "chain_format"] == ["key_created"]


async def test_gateway_recovers_when_redis_comes_back(settings, keyring, audit_store, short_tmp):
    """Refuse while Redis is gone; serve again once it is back, without a restart."""
    from tests.conftest import spawn_cli, wait_for_worker

    redis_dir = short_tmp("gg-rr-")
    own_redis = RedisProcess.start(redis_dir, persist=False)
    own = settings.with_(redis_url=own_redis.url)
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=redis_dir / "worker.log")
    request = {"model": TINY_MODEL_NAME, "messages": HELLO, "max_tokens": 3, "temperature": 0}
    try:
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
        async with AsyncTestClient(create_app(own), timeout=60) as client:
            first = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]), json=request)
            own_redis.stop()
            down = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]), json=request)
            own_redis = RedisProcess.start(redis_dir, persist=False)
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
            back = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]), json=request)
    finally:
        from govgate.processes import stop_process

        stop_process(worker, timeout_s=30)
        own_redis.stop()
    assert first.status_code == 200, first.text
    assert down.status_code == 503 and down.json()["error"]["code"] == "usage_unavailable"
    assert back.status_code == 200, back.text
    # Greedy decoding, same prompt: the same text before and after the outage.
    assert back.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert audit_store.terminal_for(back.headers["x-govgate-request-id"]).kind == "completion"
    # The worker lost its broker and said so, without Celery's warning about a setting govgate chose
    # (workers/contract/celery_config.py, worker_cancel_long_running_tasks_on_connection_loss).
    worker_log = (redis_dir / "worker.log").read_text()
    assert "Connection to broker lost" in worker_log
    assert "worker_cancel_long_running_tasks_on_connection_loss" not in worker_log


async def test_readiness_names_a_policy_that_cannot_decide(settings, keyring):
    """Every evaluator dead (each is replaced when next handed a decision): readiness says the policy cannot
    decide now instead of "ok" because a revision is loaded."""
    import os
    import signal

    import anyio

    app = create_app(settings)
    async with AsyncTestClient(app, timeout=60) as client:
        assert (await client.get("/readyz")).json()["checks"]["policy"] == "ok"
        engine = app.state.components.policy.current
        for pid in engine.evaluator_pids:
            os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(30):  # a bound against a hang, no speed check
            while engine._pool.alive:
                await anyio.sleep(0.01)
        health = await client.get("/readyz")
    assert health.status_code == 503
    assert health.json()["checks"]["policy"] == "error: no policy evaluator is running"
    assert "policy" in health.json()["missing"]


async def test_a_model_its_worker_could_not_load_is_refused_at_once(settings, keyring, audit_store, worker):
    """Its last worker wrote why it could not load the model and none lives: 503 model_unavailable with the
    reason at once, audited, nothing queued (it was queued and ended 504 after the whole request timeout). A
    model with a live worker is served whatever such a key says; without the key a request is queued as before."""
    import anyio

    from workers.contract.liveness import model_failed_key

    raw = redis.Redis.from_url(settings.redis_url)
    reason = "model file /srv/m.gguf is not a valid GGUF file (tensor data runs past the end); is it truncated?"
    before = queued(settings, IDLE_MODEL)
    try:
        raw.set(model_failed_key(IDLE_MODEL), reason)
        raw.set(model_failed_key(TINY_MODEL_NAME), "an older worker's failure")  # a worker lives: no effect
        app = create_app(settings.with_(request_timeout_s=30))
        async with AsyncTestClient(app, timeout=60) as client:
            refused = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                        json={"model": IDLE_MODEL, "messages": HELLO})
            served = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                       json={"model": TINY_MODEL_NAME, "messages": HELLO, "max_tokens": 2})
            raw.delete(model_failed_key(IDLE_MODEL))  # a worker loaded it (or an operator cleared it)
            health = app.state.components.completions.admission.model_health
            with anyio.fail_after(30):  # a bound against a hang, no speed check
                while health.unservable(IDLE_MODEL) is not None:
                    await anyio.sleep(0.05)
    finally:
        raw.delete(model_failed_key(IDLE_MODEL), model_failed_key(TINY_MODEL_NAME))
        raw.close()
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_unavailable" and reason in error["message"]
    assert refused.headers["retry-after"] == "60"  # for a client that polls
    assert refused.headers["x-should-retry"] == "false"  # OpenAI's clients would retry twice, ~2 minutes, in vain
    entry = audit_store.entries_for(refused.headers["x-govgate-request-id"])
    assert [e.kind for e in entry] == ["request"]  # refused before queueing: no terminal entry to wait for
    assert entry[0].body["admission"] == {"admitted": False, "code": "model_unavailable", "model": IDLE_MODEL,
                                          "reason": reason}
    assert queued(settings, IDLE_MODEL) == before
    assert served.status_code == 200, served.text
    assert verify_chain(audit_store).ok
