"""The gateway's own task message is the one Celery's ``send_task`` writes (real Redis).

The gateway queues jobs with one LPUSH (``gateway/dispatch/celery_message.py``);
a worker must read it exactly as it reads a message Celery sent. The fields
that differ by design or by send (the delivery tag, the sender's node name,
Celery's own reply queue) are left out of the comparison.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis

from gateway.dispatch.celery_message import task_message
from workers.contract.celery_config import make_celery
from workers.contract.queue_layout import DEFAULT_PRIORITY, queue_keys
from workers.contract.jobs import GENERATE_TASK

_PER_SEND = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "origin"),
             # send_task copies these options into the properties too; no worker reads them there.
             ("properties", "argsrepr"), ("properties", "kwargsrepr"),
             # Celery leaves it unset; the gateway says True (the outcome travels on the reply channel).
             ("headers", "ignore_result")}


def _comparable(raw: bytes | str) -> dict:
    message = json.loads(raw)
    for part, name in _PER_SEND:
        message[part].pop(name, None)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


@pytest.mark.parametrize("priority", [None, 0, 3, 9])
def test_the_gateway_writes_what_send_task_writes(redis_server, priority):
    queue = f"model.msgtest-{uuid.uuid4().hex[:8]}"
    args = [{"request_id": "req-1", "model": "m", "reply_to": "govgate:gateway:x", "sealed": "c2VhbGVk"}]
    argsrepr = "(<sealed job req-1>,)"
    app = make_celery(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    try:
        # None is the default priority. (send_task left it unset, which kombu reads as 0: served first.)
        app.send_task(GENERATE_TASK, args=args, argsrepr=argsrepr, kwargsrepr="{}", task_id="req-1", queue=queue,
                      priority=DEFAULT_PRIORITY if priority is None else priority, retry=False)
        celery_keys = [key for key in queue_keys(queue) if client.llen(key)]
        assert len(celery_keys) == 1
        key, message = task_message(GENERATE_TASK, "req-1", args, queue=queue, priority=priority, argsrepr=argsrepr)
        assert key == celery_keys[0]
        assert _comparable(message) == _comparable(client.lpop(key))
        assert json.loads(message)["headers"]["ignore_result"] is True
    finally:
        client.delete(*queue_keys(queue))
        client.close()
        app.close()


def _job(request_id: str, model: str, team: str | None):
    from workers.contract.jobs import GenerateJob
    from workers.contract.sampling import SamplingParams

    return GenerateJob(request_id=request_id, model=model, endpoint="completions", params=SamplingParams(1),
                       principal="pat", team=team, policy_revision="r", prompt="Hi", reply_to="govgate:gateway:x")


@pytest.mark.parametrize("team", ["research", "eu:ops/1", None])
def test_in_fair_mode_the_message_is_send_tasks_on_the_team_and_principals_queue(redis_server, team):
    """Byte-compatible with ``send_task`` apart from the queue, which is also the routing key (so a
    redelivery goes back to the same list), and the push counts the team's job and registers its list."""
    import asyncio
    import os

    import redis.asyncio as aioredis

    from gateway.dispatch.queue import Dispatcher
    from workers.contract.fair_queues import job_queue, registry_key, team_field, waiting_key, wake_key
    from workers.contract.sealing import Sealer

    model = f"msgfair-{uuid.uuid4().hex[:8]}"
    queue = job_queue(model, team, "pat")
    client = redis.Redis.from_url(redis_server.url)
    app = make_celery(redis_server.url)

    async def enqueue() -> None:
        async_client = aioredis.Redis.from_url(redis_server.url)
        try:
            dispatcher = Dispatcher(async_client, expires_s=60, sealer=Sealer(os.urandom(32)))
            await dispatcher.enqueue(_job("req-f1", model, team), priority=2)
            await dispatcher.enqueue(_job("req-f2", model, team), priority=2)
        finally:
            await async_client.aclose()

    try:
        asyncio.run(enqueue())
        key = queue_keys(queue)[2]
        assert client.llen(key) == 2
        assert client.hgetall(waiting_key(model)) == {team_field(team).encode(): b"2"}
        assert client.zrange(registry_key(model), 0, -1) == [key.encode()]
        assert client.llen(wake_key(model)) == 1  # registered once: one worker woken
        ours = json.loads(client.rpop(key))
        assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
        args = json.loads(base64.b64decode(ours["body"]))[0]
        app.send_task(GENERATE_TASK, args=args, argsrepr="(<sealed job req-f1>,)", kwargsrepr="{}",
                      task_id="req-f1", queue=queue, priority=2, retry=False)
        theirs = client.lpop(key)  # the newest: req-f2 still waits behind it
        assert _comparable(json.dumps(ours)) == _comparable(theirs)
    finally:
        client.delete(*queue_keys(queue), registry_key(model), waiting_key(model), wake_key(model))
        client.close()
        app.close()


@pytest.mark.parametrize("mode", ["fair", "fifo"])
def test_a_push_redis_refuses_is_queue_unavailable(mode):
    """Fail closed: no Redis, no job queued, and the caller learns it as ``QueueUnavailable`` (503)."""
    import asyncio
    import os

    import redis.asyncio as aioredis

    from gateway.dispatch.queue import Dispatcher, QueueUnavailable
    from govgate.processes import free_port
    from workers.contract.sealing import Sealer

    async def enqueue() -> None:
        async_client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
        try:
            dispatcher = Dispatcher(async_client, expires_s=60, sealer=Sealer(os.urandom(32)), mode=mode)
            await dispatcher.enqueue(_job("req-down", "m", "t"))
        finally:
            await async_client.aclose()

    with pytest.raises(QueueUnavailable):
        asyncio.run(enqueue())


@pytest.mark.parametrize("mode", ["fair", "fifo"])
def test_a_push_onto_an_empty_list_rings_one_idle_worker_and_sets_the_plain_hint_in_fifo(redis_server, mode):
    """Workers waiting for jobs block on their queue's bell (workers/contract/take.py): the push that turns a
    list from empty to non-empty moves one idle token onto the bell; a push onto a list that already holds
    jobs rings nothing (no worker can be idle then for want of it). A fifo push also sets the model's plain
    lists' hint, without which a fair-mode take skips them for up to a second."""
    import asyncio
    import os

    import redis.asyncio as aioredis

    from gateway.dispatch.queue import Dispatcher
    from workers.contract.fair_queues import PLAIN_HINT, registry_key, tags_key, waiting_key, wake_key
    from workers.contract.jobs import queue_for
    from workers.contract.queue_layout import bell_key, idle_key
    from workers.contract.sealing import Sealer

    model = f"ring-{uuid.uuid4().hex[:8]}"
    plain = queue_for(model)
    client = redis.Redis.from_url(redis_server.url)
    client.lpush(idle_key(plain), "1", "1")  # two workers idle

    async def enqueue(*ids: str) -> None:
        async_client = aioredis.Redis.from_url(redis_server.url)
        try:
            dispatcher = Dispatcher(async_client, expires_s=60, sealer=Sealer(os.urandom(32)), mode=mode)
            for request_id in ids:
                await dispatcher.enqueue(_job(request_id, model, "research"))
        finally:
            await async_client.aclose()

    try:
        asyncio.run(enqueue("req-r1"))
        assert (client.llen(idle_key(plain)), client.llen(bell_key(plain))) == (1, 1)
        assert client.hget(tags_key(model), PLAIN_HINT) == (b"1" if mode == "fifo" else None)
        asyncio.run(enqueue("req-r2"))
        assert (client.llen(idle_key(plain)), client.llen(bell_key(plain))) == (1, 1)
    finally:
        client.delete(*client.keys(f"model.{model}*"), idle_key(plain), bell_key(plain), tags_key(model),
                      registry_key(model), waiting_key(model), wake_key(model))
        client.close()
