"""Fair-share weights go from the policy's data to Redis: at load, on a reload, and again after Redis heals.

A real Redis of the test's own (``SHARES_KEY`` is one key for the whole
deployment, so the suite's shared Redis is left alone) and the real embedded
engine reloading a copied policy folder.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import redis.asyncio as aioredis

from gateway.policy import EmbeddedPolicyEngine
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.policy.shares import ANY_TEAM, SharePublisher, team_shares, weight_text
from govgate.redis_server import RedisProcess
from tests.conftest import policy_copy
from workers.contract.fair_queues import SHARES_KEY, encode_name
from tests.policy.test_config_at_load import break_data

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0


@pytest.fixture
def shares_redis() -> Iterator[RedisProcess]:
    folder = Path(tempfile.mkdtemp(prefix="gg-sh-"))
    server = RedisProcess.start(folder, persist=False)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _shares(support: float | None = None, default: float | None = None):
    def change(config: dict) -> None:
        if support is not None:
            config["teams"]["support"]["share"] = support
        if default is not None:
            config["teams"]["default"] = {"share": default}
    return change


async def _open(folder: Path) -> EmbeddedPolicyEngine:
    return await asyncio.to_thread(EmbeddedPolicyEngine.load, folder, TIMEOUT_S)


async def _hash(client: aioredis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await client.hgetall(SHARES_KEY)).items()}


def test_shares_come_from_the_teams_entries_and_the_default_entry() -> None:
    assert team_shares({}) == {ANY_TEAM: 1.0}
    assert team_shares({"govgate_config": {"teams": {"research": {"models": ["*"]}}}}) == {ANY_TEAM: 1.0}
    data = {"govgate_config": {"teams": {"support": {"share": 3}, "a:b/c": {"share": 0.5},
                                         "default": {"share": 2}, "odd": "not an object"}}}
    assert team_shares(data) == {ANY_TEAM: 2.0, "support": 3.0, encode_name("a:b/c"): 0.5, "default": 2.0}
    assert encode_name("a:b/c") == "a%3Ab%2Fc"  # the name as the queues and the waiting hash spell it
    # values the load-time check refuses are never published, whatever reaches here
    assert team_shares({"govgate_config": {"teams": {"x": {"share": 0}, "y": {"share": True},
                                                    "z": {"share": "2"}}}}) == {ANY_TEAM: 1.0}
    assert [weight_text(w) for w in (3.0, 0.5, 1000.0, 1 / 3)] == ["3", "0.5", "1000", repr(1 / 3)]


async def test_a_reload_with_a_changed_share_rewrites_the_hash_without_a_restart(shares_redis, tmp_path) -> None:
    folder = policy_copy(tmp_path, _shares(support=3))
    client = aioredis.Redis.from_url(shares_redis.url)
    await client.hset(SHARES_KEY, mapping={"stale-team": "9"})  # left by an older revision: must go
    reloading = ReloadingPolicyEngine(await _open(folder), lambda: _open(folder), policy_dir=folder)
    publisher = SharePublisher(client, reloading, tick_s=60)  # a long tick: only the reload's poke can write
    reloading.on_reload(publisher.poke)
    try:
        await publisher.start()
        async with asyncio.timeout(15):
            while await _hash(client) != {ANY_TEAM: "1", "support": "3"}:
                await asyncio.sleep(0.05)
        first = publisher.published_revision
        assert first == reloading.revision

        break_data(folder, _shares(support=1.5, default=2))
        result = await reloading.reload()
        assert result.changed
        async with asyncio.timeout(15):
            while await _hash(client) != {ANY_TEAM: "2", "support": "1.5", "default": "2"}:
                await asyncio.sleep(0.05)
        assert publisher.published_revision == reloading.revision != first
    finally:
        await publisher.aclose()
        await reloading.aclose()
        await client.aclose()


async def test_a_broken_share_keeps_the_running_policy_and_its_shares(shares_redis, tmp_path) -> None:
    folder = policy_copy(tmp_path, _shares(support=4))
    client = aioredis.Redis.from_url(shares_redis.url)
    reloading = ReloadingPolicyEngine(await _open(folder), lambda: _open(folder), policy_dir=folder)
    publisher = SharePublisher(client, reloading, tick_s=60)
    try:
        assert await publisher.publish_if_due()
        break_data(folder, _shares(support=-1))
        result = await reloading.reload()
        assert not result.changed and "teams.support.share" in (result.error or "")
        assert not await publisher.publish_if_due()  # same revision, written just now
        assert await _hash(client) == {ANY_TEAM: "1", "support": "4"}
    finally:
        await reloading.aclose()
        await client.aclose()


async def test_redis_down_does_not_block_the_load_and_the_next_tick_heals(shares_redis, tmp_path) -> None:
    folder = policy_copy(tmp_path, _shares(support=3))
    client = aioredis.Redis.from_url(shares_redis.url, socket_timeout=2, socket_connect_timeout=2)
    reloading = ReloadingPolicyEngine(await _open(folder), lambda: _open(folder), policy_dir=folder)
    publisher = SharePublisher(client, reloading, tick_s=0.1)
    reloading.on_reload(publisher.poke)
    server = shares_redis
    try:
        server.stop()
        break_data(folder, _shares(support=5))
        result = await reloading.reload()  # the load goes on without Redis
        assert result.changed and reloading.revision == result.revision
        assert not await publisher.publish_if_due()  # refused, logged, not raised
        assert publisher.published_revision is None

        await publisher.start()  # the loop keeps trying, every tick
        server = RedisProcess.start(shares_redis.data_dir, persist=False)  # same socket: Redis is back, empty
        async with asyncio.timeout(15):
            while await _hash(client) != {ANY_TEAM: "1", "support": "5"}:
                await asyncio.sleep(0.05)
        assert publisher.published_revision == reloading.revision
    finally:
        await publisher.aclose()
        await reloading.aclose()
        await client.aclose()
        server.stop()


async def test_a_flushed_redis_gets_the_shares_again_within_the_republish_time(shares_redis, tmp_path) -> None:
    folder = policy_copy(tmp_path, _shares(support=2))
    client = aioredis.Redis.from_url(shares_redis.url)
    reloading = ReloadingPolicyEngine(await _open(folder), lambda: _open(folder), policy_dir=folder)
    publisher = SharePublisher(client, reloading, tick_s=0.05, republish_s=0.2)
    try:
        assert await publisher.publish_if_due()
        assert not await publisher.publish_if_due()  # nothing changed and it is fresh
        await client.flushall()
        await publisher.start()
        async with asyncio.timeout(15):
            while await _hash(client) != {ANY_TEAM: "1", "support": "2"}:
                await asyncio.sleep(0.05)
    finally:
        await publisher.aclose()
        await reloading.aclose()
        await client.aclose()
