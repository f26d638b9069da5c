"""The gateway's principal cache, in-process: hits skip the key store, and without a lease nothing is cached.

Each test has a database of its own; the ones that stop Redis have a Redis
of their own too. ``GET /v1/models`` is the authenticated request: it needs
no worker. States are waited for by polling, never timed.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.redis_server import RedisProcess
from tests.conftest import bearer

pytestmark = pytest.mark.anyio


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


class CountingStore:
    """The real key store, counting the lookups that reach it."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self.lookups = 0

    def authenticate(self, presented: str):
        self.lookups += 1
        return self._store.authenticate(presented)


@pytest.fixture
def own(settings, tmp_path):
    return settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}")


def new_keys(settings, count: int) -> tuple[KeyStore, list]:
    """A store on ``settings``' database and ``count`` fresh keys in it (the caller disposes the engine)."""
    store = KeyStore(open_database(settings))
    return store, [store.create(f"user{n}", team="research", roles=["analyst"]) for n in range(count)]


@pytest.mark.parametrize("ttl_s, lookups", [(60.0, 1), (0.0, 4)])
async def test_a_cached_key_is_answered_without_the_key_store(own, ttl_s, lookups):
    store, (key,) = new_keys(own, 1)
    try:
        app = create_app(own.with_(auth_cache_ttl_s=ttl_s))
        async with AsyncTestClient(app, timeout=60) as client:
            auth = app.state.components.auth
            if ttl_s:
                await until(lambda: auth.cache.serving, "the cache's lease")
            counting = auth.store = CountingStore(auth.store)
            for _ in range(4):
                response = await client.get("/v1/models", headers=bearer(key.secret))
                assert response.status_code == 200, response.text
            assert counting.lookups == lookups
    finally:
        store.engine.dispose()


async def test_unknown_and_malformed_keys_are_not_cached(own):
    store, (key,) = new_keys(own, 1)
    try:
        app = create_app(own)
        async with AsyncTestClient(app, timeout=60) as client:
            auth = app.state.components.auth
            await until(lambda: auth.cache.serving, "the cache's lease")
            counting = auth.store = CountingStore(auth.store)
            unknown = key.secret[:-4] + ("AAAA" if not key.secret.endswith("AAAA") else "BBBB")
            for presented in (unknown, unknown, "gk_not-a-key"):
                response = await client.get("/v1/models", headers=bearer(presented))
                assert response.status_code == 401, response.text
            assert counting.lookups == 2  # each unknown key asked the store; the malformed one never did
            assert len(auth.cache) == 0
    finally:
        store.engine.dispose()


async def test_the_cache_holds_at_most_auth_cache_size_principals(own):
    store, keys = new_keys(own, 3)
    try:
        app = create_app(own.with_(auth_cache_size=2))
        async with AsyncTestClient(app, timeout=60) as client:
            auth = app.state.components.auth
            await until(lambda: auth.cache.serving, "the cache's lease")
            for key in keys:
                assert (await client.get("/v1/models", headers=bearer(key.secret))).status_code == 200
            assert len(auth.cache) == 2
            counting = auth.store = CountingStore(auth.store)
            assert (await client.get("/v1/models", headers=bearer(keys[0].secret))).status_code == 200
            assert counting.lookups == 1  # the first key was the least recently used: it had left
    finally:
        store.engine.dispose()


async def test_a_change_no_signal_reached_is_bounded_by_the_ttl(own):
    store, (key,) = new_keys(own, 1)
    try:
        app = create_app(own.with_(auth_cache_ttl_s=1.0))
        async with AsyncTestClient(app, timeout=60) as client:
            auth = app.state.components.auth
            await until(lambda: auth.cache.serving, "the cache's lease")
            assert (await client.get("/v1/models", headers=bearer(key.secret))).status_code == 200
            assert store.revoke(key.key.key_id)  # straight in the database: no signal is sent
            deadline = asyncio.get_running_loop().time() + 30
            while (await client.get("/v1/models", headers=bearer(key.secret))).status_code != 401:
                assert asyncio.get_running_loop().time() < deadline, "the revoked key was accepted past its TTL"
                await asyncio.sleep(0.1)
    finally:
        store.engine.dispose()


async def test_without_the_subscription_the_database_decides(own, short_tmp):
    """A revocation whose signal was lost is refused once the gateway cannot prove it would have heard it."""
    store, (key,) = new_keys(own, 1)
    own_redis = RedisProcess.start(short_tmp("gg-ac-"), persist=False)
    try:
        app = create_app(own.with_(redis_url=own_redis.url, auth_cache_ttl_s=300.0))
        async with AsyncTestClient(app, timeout=60) as client:
            auth = app.state.components.auth
            await until(lambda: auth.cache.serving, "the cache's lease")
            assert (await client.get("/v1/models", headers=bearer(key.secret))).status_code == 200
            assert store.revoke(key.key.key_id)  # no signal: the cached principal is stale now
            stale = await client.get("/v1/models", headers=bearer(key.secret))
            assert stale.status_code == 200  # served from the cache (this is what the TTL bounds)
            own_redis.stop()
            await until(lambda: not auth.cache.serving, "the lease revoked with Redis gone")
            response = await client.get("/v1/models", headers=bearer(key.secret))
            assert response.status_code == 401, response.text
    finally:
        own_redis.stop()
        store.engine.dispose()
