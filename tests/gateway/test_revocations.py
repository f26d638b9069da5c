"""Revoking a key ends that key's requests in flight (probe s56 B-F1), on a real key store and a real Redis.

:class:`AdmittedKeys` asks the key store whether a changed key is revoked (a change may be a new role or
team), ends only that key's requests, remembers the revocation for a request that registers after it, and
looks again at every key when told the key-change subscription came back. The listener passes it every
change and every resumed subscription, also with the principal cache off.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import pytest
import redis
import redis.asyncio as aioredis

from gateway.auth import KeyChangeListener, KeyStore, PrincipalCache
from gateway.auth.key_changes import KeyChangeAnnouncer
from gateway.auth.revocations import AdmittedKeys, revoked_in
from gateway.components import open_database
from tests.gateway.test_key_change_listener import redis_process, until  # noqa: F401  (redis_process: fixture)
from workers.contract.jobs import cancel_key

pytestmark = pytest.mark.anyio


async def looked(keys: AdmittedKeys) -> None:
    """Wait for the looks under way (each a task of its own) to finish."""
    await until(lambda: not keys._looks, "the looks finished")


@pytest.fixture
def store(settings, tmp_path) -> KeyStore:
    made = KeyStore(open_database(settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}")))
    yield made
    made.engine.dispose()


def key(store: KeyStore, user: str) -> str:
    return store.create(user, team="research", roles=["analyst"]).key.key_id


def watching(store: KeyStore, **requests: str) -> tuple[AdmittedKeys, list[str]]:
    """A registry on ``store`` watching one request per name (its key id), and the names of those ended."""
    keys, ended = AdmittedKeys(revoked_in(store)), []
    for name, key_id in requests.items():
        keys.watch(key_id, lambda name=name: ended.append(name))
    return keys, ended


async def test_a_revoked_key_s_requests_are_ended_and_no_other_s(store):
    ann, bob = key(store, "ann"), key(store, "bob")
    keys, ended = watching(store, ann_1=ann, ann_2=ann)
    leave_bob = keys.watch(bob, lambda: ended.append("bob"))
    assert keys.in_flight == 3

    store.set_roles(ann, ["analyst", "reviewer"])
    keys.changed(ann)  # a change that is not a revocation ends nothing
    await looked(keys)
    assert ended == [] and keys.in_flight == 3

    assert store.revoke(ann)
    keys.changed(ann)
    await until(lambda: len(ended) == 2, "ann's requests ended")
    assert sorted(ended) == ["ann_1", "ann_2"] and keys.in_flight == 1
    # a request authenticated just before the revocation, registering after the look: ended as it registers
    leave_late = keys.watch(ann, lambda: ended.append("ann-late"))
    assert ended[-1] == "ann-late" and keys.in_flight == 1
    leave_late()
    leave_bob()
    leave_bob()  # a leave may be called twice
    assert keys.in_flight == 0
    await keys.aclose()


async def test_a_key_store_that_cannot_answer_ends_nothing_and_says_so(store, caplog):
    keys, ended = watching(store, ann=(ann := key(store, "ann")))
    database = str(store.engine.url.database)
    with sqlite3.connect(database) as raw:
        raw.execute("ALTER TABLE api_keys RENAME TO api_keys_away")
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.auth.revocations"):
            keys.changed(ann)
            await looked(keys)
    finally:
        with sqlite3.connect(database) as raw:
            raw.execute("ALTER TABLE api_keys_away RENAME TO api_keys")
    assert ended == [] and keys.in_flight == 1
    assert any("cannot be read" in record.getMessage() and ann in record.getMessage() for record in caplog.records)
    await keys.aclose()


async def test_a_resumed_subscription_has_every_key_in_flight_looked_at(store):
    """A revocation published while the subscription was down is found when it comes back."""
    keys, ended = watching(store, ann=key(store, "ann"), bob=(bob := key(store, "bob")))
    assert store.revoke(bob)  # its message missed
    keys.resumed()
    await until(lambda: ended == ["bob"], "bob's request ended")
    await looked(keys)
    assert ended == ["bob"] and keys.in_flight == 1
    await keys.aclose()


async def test_the_listener_passes_changes_and_resumed_sessions_on_even_with_the_cache_off(redis_process):
    client = aioredis.Redis.from_url(redis_process.url, socket_connect_timeout=2)
    changed: list[str] = []
    resumed: list[int] = []
    listener = KeyChangeListener(client, PrincipalCache(ttl_s=0, max_entries=1), on_change=changed.append,
                                 on_resumed=lambda: resumed.append(listener.sessions))
    await listener.start()
    try:
        await until(lambda: resumed == [1], "the first session")
        announcer = KeyChangeAnnouncer(redis_process.url)
        await asyncio.to_thread(announcer, "0123456789ab")
        assert announcer.failure is None and announcer.receivers == 1
        await until(lambda: changed == ["0123456789ab"], "the change passed on")
        admin = redis.Redis.from_url(redis_process.url)
        try:
            assert admin.client_kill_filter(_type="pubsub") >= 1
        finally:
            admin.close()
        await until(lambda: resumed == [1, 2], "the new session told")
    finally:
        await listener.aclose()
        await client.aclose()


async def test_a_request_admitted_on_a_stale_read_of_a_revoked_key_is_ended_before_it_is_queued(
        settings, tmp_path, audit_store):
    """The race the remembered revocation closes: a request authenticated on a read of its key made before the
    revocation was committed (here, the principal cache, whose own signal is withheld), registered after the
    look found the key revoked. It is ended as it registers and, once admitted, before its job is queued: 401
    ``invalid_api_key``, one ``cancelled`` end naming the revocation, nothing queued. In-process (Litestar's
    test client), on the session's database and Redis; no worker is needed, as nothing is queued."""
    from litestar.testing import AsyncTestClient

    from gateway.app import create_app
    from tests.conftest import bearer
    from workers.contract.registry import TINY_MODEL_NAME

    store = KeyStore(open_database(settings))
    issued = store.create("rae", team="ops", roles=["admin"])
    try:
        app = create_app(settings.with_(auth_cache_ttl_s=600.0))
        async with AsyncTestClient(app, timeout=60) as client:
            components = app.state.components
            await until(lambda: components.auth.cache.serving, "the cache's lease")
            assert (await client.get("/v1/models", headers=bearer(issued.secret))).status_code == 200  # cached
            assert store.revoke(issued.key.key_id)  # committed, its signal not sent: the cache still has it
            keys = components.completions.admitted_keys
            keys.changed(issued.key.key_id)
            await looked(keys)
            response = await client.post("/v1/completions", headers=bearer(issued.secret),
                                          json={"model": TINY_MODEL_NAME, "prompt": "Hi", "max_tokens": 3})
            assert keys.in_flight == 0
    finally:
        store.engine.dispose()
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    request_id = response.headers["x-govgate-request-id"]
    entries = audit_store.entries_for(request_id)
    assert [entry.kind for entry in entries] == ["request", "cancelled"]
    assert entries[-1].body["error"] == {
        "code": "cancelled", "message": "the request's API key was revoked before a worker took the request"}
    plain = redis.Redis.from_url(settings.redis_url)
    try:  # never queued: a job taken back from its queue would have had its cancel key written first
        assert plain.exists(cancel_key(request_id)) == 0
    finally:
        plain.close()
