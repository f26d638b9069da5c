"""The key-change subscription against a real Redis: signals drop keys, a lost connection stops the cache.

Each test has a Redis of its own (stopping it must spare the session's) and
waits for states by polling with a generous deadline; nothing asserts how
long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable

import pytest
import redis
import redis.asyncio as aioredis

from gateway.auth import KeyChangeListener, Principal, PrincipalCache
from gateway.auth.key_changes import KEYS_CHANGED_CHANNEL, KeyChangeAnnouncer
from govgate.redis_server import RedisProcess

pytestmark = pytest.mark.anyio


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def alice(key_id: str = "aaaaaaaaaaaa") -> Principal:
    return Principal(id="alice", team="research", roles=("analyst",), key_id=key_id)


@pytest.fixture
def redis_process(short_tmp) -> RedisProcess:
    server = RedisProcess.start(short_tmp("gg-kc-"), persist=False)
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def listening(url: str) -> AsyncIterator[tuple[PrincipalCache, KeyChangeListener]]:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2)
    cache = PrincipalCache(ttl_s=60.0, max_entries=100)
    listener = KeyChangeListener(client, cache)
    await listener.start()
    try:
        yield cache, listener
    finally:
        await listener.aclose()
        await client.aclose()


async def test_the_cache_serves_once_subscribed_and_a_signal_drops_the_key(redis_process):
    async with listening(redis_process.url) as (cache, listener):
        await until(lambda: cache.serving, "a lease")
        assert cache.put("d1", alice("k1"), cache.ticket()) and cache.put("d2", alice("k2"), cache.ticket())
        announcer = KeyChangeAnnouncer(redis_process.url)
        await asyncio.to_thread(announcer, "k1")
        assert announcer.failure is None and announcer.receivers == 1
        await until(lambda: cache.get("d1") is None, "k1 dropped")
        assert cache.get("d2") is not None


async def test_redis_going_away_stops_the_cache_and_a_new_subscription_starts_empty(redis_process, short_tmp):
    async with listening(redis_process.url) as (cache, listener):
        await until(lambda: cache.serving, "a lease")
        cache.put("d1", alice(), cache.ticket())
        redis_process.stop()
        await until(lambda: not cache.serving, "the lease revoked")
        assert len(cache) == 0 and cache.get("d1") is None
        assert not cache.put("d1", alice(), cache.ticket())  # reads made meanwhile are not kept either
        # Redis comes back on the same socket: the listener subscribes again, and only then serves.
        again = RedisProcess.start(redis_process.data_dir, persist=False)
        try:
            await until(lambda: cache.serving, "a lease on the new subscription")
            assert listener.sessions == 2
        finally:
            again.stop()


async def test_a_killed_subscription_empties_the_cache_even_if_redis_py_reconnects_by_itself(redis_process):
    """A signal published while the connection was being re-made is lost; the entries it would drop go too."""
    async with listening(redis_process.url) as (cache, listener):
        await until(lambda: cache.serving, "a lease")
        cache.put("d1", alice(), cache.ticket())
        admin = redis.Redis.from_url(redis_process.url)
        try:
            assert admin.client_kill_filter(_type="pubsub") >= 1
        finally:
            admin.close()
        await until(lambda: listener.sessions == 2 and cache.serving, "a new subscription")
        assert cache.get("d1") is None


async def test_an_unanswered_ping_revokes_the_lease(redis_process):
    """A connection that hangs (no error, no answers) must not keep the cache serving."""
    async with listening(redis_process.url) as (cache, listener):
        await until(lambda: cache.serving, "a lease")
        cache.put("d1", alice(), cache.ticket())
        admin = redis.Redis.from_url(redis_process.url)
        try:
            admin.execute_command("CLIENT", "PAUSE", "4000", "ALL")  # Redis answers nobody for 4 s
            await until(lambda: not cache.serving, "the lease lapsed while Redis is silent")
            assert cache.get("d1") is None
        finally:
            admin.close()
        # The silence counted as a lost subscription: a new one is made, and it starts empty.
        await until(lambda: cache.serving, "a lease once Redis answers again")
        assert listener.sessions == 2 and cache.get("d1") is None


async def test_a_cache_that_is_off_subscribes_to_nothing(redis_process):
    client = aioredis.Redis.from_url(redis_process.url)
    cache = PrincipalCache(ttl_s=0, max_entries=1)
    listener = KeyChangeListener(client, cache)
    await listener.start()
    try:
        await asyncio.sleep(0.2)
        assert await client.pubsub_numsub(KEYS_CHANGED_CHANNEL) == [(KEYS_CHANGED_CHANNEL.encode(), 0)]
    finally:
        await listener.aclose()
        await client.aclose()


def test_the_announcer_reports_a_redis_it_cannot_reach(short_tmp):
    announcer = KeyChangeAnnouncer(f"unix://{short_tmp('gg-kc-')}/absent.sock")
    announcer("k1")
    assert announcer.failure is not None and "did not take the signal" in announcer.failure
    nowhere = KeyChangeAnnouncer("")
    nowhere("k1")
    assert nowhere.failure is not None and "no Redis is configured" in nowhere.failure


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "not a url"])
def test_the_announcer_reports_a_url_that_is_not_redis_instead_of_raising(url):
    announcer = KeyChangeAnnouncer(url)
    announcer("k1")  # the change is committed before: only its signal is lost
    assert announcer.failure is not None and announcer.failure.startswith(f"{url!r} is not a Redis URL (")
    assert announcer.receivers == 0


class ScriptedPubSub:
    """A pub/sub whose connection redis-py re-makes under the listener: a second "subscribe" arrives.

    redis-py re-subscribes by itself when a command it retries reconnects;
    that moment cannot be caused on purpose against a real Redis, so this
    stand-in plays it: SUBSCRIBE confirmed, PINGs answered, and, when the
    test says so, the confirmation of a subscription made again.
    """

    def __init__(self) -> None:
        self._messages: asyncio.Queue = asyncio.Queue()

    async def subscribe(self, channel: str) -> None:
        self._messages.put_nowait({"type": "subscribe", "channel": channel, "data": 1})

    async def ping(self) -> None:
        self._messages.put_nowait({"type": "pong", "channel": None, "data": b""})

    def remade(self) -> None:
        self._messages.put_nowait({"type": "subscribe", "channel": KEYS_CHANGED_CHANNEL, "data": 1})

    async def get_message(self, timeout: float) -> dict | None:
        try:
            return await asyncio.wait_for(self._messages.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def aclose(self) -> None:
        pass


class ScriptedClient:
    def __init__(self) -> None:
        self.made: list[ScriptedPubSub] = []

    def pubsub(self) -> ScriptedPubSub:
        self.made.append(ScriptedPubSub())
        return self.made[-1]


async def test_a_subscription_re_made_under_the_listener_ends_its_session_and_empties_the_cache():
    client = ScriptedClient()
    cache = PrincipalCache(ttl_s=60.0, max_entries=10)
    listener = KeyChangeListener(client, cache, ping_interval_s=0.05, grace_s=5.0)
    await listener.start()
    try:
        await until(lambda: cache.serving, "a lease")
        assert cache.put("d1", alice(), cache.ticket())
        client.made[0].remade()
        await until(lambda: len(client.made) == 2 and cache.serving, "a new session")
        assert cache.get("d1") is None
        assert listener.sessions == 2
    finally:
        await listener.aclose()


async def test_closing_always_ends_even_when_a_cancel_is_lost_in_a_read_timeout(redis_process):
    """The hang the suite met: a cancel landing as redis-py's read timeout expires was lost (Python 3.11).

    With a ping every 10 ms the listener sits in that race often (before the
    fix, about one close in eight never ended); every close must now end.
    """
    client = aioredis.Redis.from_url(redis_process.url, socket_connect_timeout=2)
    try:
        for round_ in range(150):
            cache = PrincipalCache(ttl_s=60.0, max_entries=10)
            listener = KeyChangeListener(client, cache, ping_interval_s=0.01, grace_s=1.0)
            await listener.start()
            await asyncio.sleep((round_ % 7) * 0.004)
            await asyncio.wait_for(listener.aclose(), timeout=30)
            assert listener._task.done() and not cache.serving
    finally:
        await client.aclose()
