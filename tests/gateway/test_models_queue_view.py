"""GET /v1/models shows each model's queue as the caller may see it: every team for admins, one's own place
for others, nothing of other teams, and ``"queue": null`` (not an error) while Redis is down.

The real app in-process on a Redis of the test's own; the team shares come
from the policy's data through the gateway's publisher, the waiting counts
are seeded as the queue core keeps them (push +1, pick -1).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import anyio
import pytest
import redis
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.limits.fair_share import team_field
from govgate.redis_server import RedisProcess
from tests.conftest import bearer, policy_copy
from workers.contract.queue_layout import queue_keys
from workers.contract.fair_queues import SHARES_KEY, tags_key, waiting_key
from workers.contract.liveness import WORKERS_KEY, member
from workers.contract.jobs import queue_for
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


@pytest.fixture
def view_redis() -> Iterator[RedisProcess]:
    folder = Path(tempfile.mkdtemp(prefix="gg-mv-"))
    server = RedisProcess.start(folder, persist=False)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _research_weighs_three(config: dict) -> None:
    config["teams"]["research"]["share"] = 3


async def _published(client: redis.Redis) -> None:
    with anyio.fail_after(15):
        while client.hget(SHARES_KEY, "research") != b"3":
            await anyio.sleep(0.05)


async def test_admins_see_every_team_others_their_own_place(settings, keyring, view_redis, tmp_path) -> None:
    own = settings.with_(redis_url=view_redis.url, queue_mode="fair", max_queued_per_model=64,
                         policy_dir=policy_copy(tmp_path, _research_weighs_three))
    raw = redis.Redis.from_url(view_redis.url)
    raw.hset(waiting_key(TINY_MODEL_NAME), mapping={team_field("research"): 1, team_field("support"): 6,
                                                    team_field("ops"): 0})
    raw.hset(tags_key(TINY_MODEL_NAME), "svc", "400")
    raw.zadd(WORKERS_KEY, {member(TINY_MODEL_NAME, "w1"): 2**40, member(TINY_MODEL_NAME, "gone"): 1})
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        await _published(raw)
        admin = (await client.get("/v1/models", headers=bearer(keyring["admin"]))).json()
        analyst = await client.get("/v1/models", headers=bearer(keyring["analyst"]))
        one = (await client.get(f"/v1/models/{TINY_MODEL_NAME}", headers=bearer(keyring["analyst"]))).json()
    raw.close()
    queues = {m["id"]: m["queue"] for m in admin["data"]}
    assert queues[TINY_MODEL_NAME] == {"waiting": 7, "limit": 64, "teams": {
        "research": {"waiting": 1, "share": 0.75}, "support": {"waiting": 6, "share": 0.25}}}
    assert all(q == {"waiting": 0, "limit": 64, "teams": {}} for name, q in queues.items() if name != TINY_MODEL_NAME)
    assert analyst.status_code == 200
    mine = {m["id"]: m["queue"] for m in analyst.json()["data"]}[TINY_MODEL_NAME]
    # research weighs 3 of the waiting 4: its 2nd job comes about 2 × 4 / 3 → 3rd; one live worker at 0.4 s
    assert mine == {"waiting": 7, "limit": 64, "your_team_waiting": 1, "position": 3, "estimated_wait_s": 1.2}
    assert one["queue"] == mine
    assert "support" not in analyst.text and "teams" not in analyst.text  # never another team's name


async def test_a_team_with_nothing_waiting_and_a_principal_without_a_team(settings, keyring, view_redis,
                                                                          tmp_path) -> None:
    own = settings.with_(redis_url=view_redis.url, queue_mode="fair", max_queued_per_model=64,
                         policy_dir=policy_copy(tmp_path, _research_weighs_three))
    raw = redis.Redis.from_url(view_redis.url)
    raw.hset(waiting_key(TINY_MODEL_NAME), mapping={team_field("support"): 30})
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        await _published(raw)
        analyst = (await client.get(f"/v1/models/{TINY_MODEL_NAME}", headers=bearer(keyring["analyst"]))).json()
    raw.close()
    # research (3) next to support (1): its first job comes about 1 × 4 / 3 → 2nd; no svc measured: 1 s a job,
    # no live worker: one assumed
    assert analyst["queue"] == {"waiting": 30, "limit": 64, "your_team_waiting": 0, "position": 2,
                                "estimated_wait_s": 2.0}


async def test_fifo_mode_keeps_the_total_and_redis_down_gives_a_null_queue(settings, keyring, view_redis,
                                                                           tmp_path) -> None:
    own = settings.with_(redis_url=view_redis.url, queue_mode="fifo", max_queued_per_model=5)
    raw = redis.Redis.from_url(view_redis.url)
    raw.rpush(queue_keys(queue_for(TINY_MODEL_NAME))[5], b"job", b"job")  # the plain list at priority 5
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        listed = (await client.get("/v1/models", headers=bearer(keyring["analyst"]))).json()
        assert {m["id"]: m["queue"] for m in listed["data"]}[TINY_MODEL_NAME] == {"waiting": 2, "limit": 5}
        view_redis.stop()
        down = await client.get("/v1/models", headers=bearer(keyring["analyst"]))
        one = await client.get(f"/v1/models/{TINY_MODEL_NAME}", headers=bearer(keyring["analyst"]))
    raw.close()
    assert down.status_code == 200 and one.status_code == 200, down.text
    assert [m["queue"] for m in down.json()["data"]] == [None] * len(listed["data"]) and one.json()["queue"] is None
