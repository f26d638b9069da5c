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
from workers.contract.celery_config import DEFAULT_PRIORITY, make_celery, queue_keys
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
