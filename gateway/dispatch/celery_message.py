"""A Celery task message, written the way kombu's Redis transport writes it.

The gateway queues a job with one LPUSH on its async Redis client instead of
``Celery.send_task``: that call blocks (so it ran in a worker thread, a hand-off
each way), builds a new Redis client per publish, and spends more CPU on
building the message than the rest of the send. What the worker consumes is
only this envelope: protocol-2 headers, a base64 JSON body
``[args, kwargs, embed]`` and the delivery properties, LPUSHed on the list of
the queue's priority (``tests/gateway/test_celery_message.py`` holds it equal
to what ``send_task`` writes, and every end-to-end test runs through it).
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from typing import Any

import msgspec

from workers.contract.queue_layout import DEFAULT_PRIORITY, PRIORITY_STEPS, queue_keys

#: Celery's ``origin`` header (``anon_nodename()``): who sent the task.
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def queue_key(queue: str, priority: int | None) -> str:
    """The Redis list of ``queue`` that holds messages of ``priority`` (None: the default)."""
    step = DEFAULT_PRIORITY if priority is None else min(max(int(priority), PRIORITY_STEPS[0]), PRIORITY_STEPS[-1])
    return queue_keys(queue)[PRIORITY_STEPS.index(step)]


def task_message(task: str, task_id: str, args: list[Any], *, queue: str, priority: int | None,
                 argsrepr: str) -> tuple[str, str]:
    """``(list key, message)`` for one task: LPUSH the message on the key to queue it.

    ``priority`` None is :data:`DEFAULT_PRIORITY` (``send_task`` left it unset,
    which kombu reads as 0, the first served).

    ``argsrepr`` is what Celery logs and shows for the arguments; the caller
    says it, so no repr of the arguments is ever made.
    """
    step = DEFAULT_PRIORITY if priority is None else priority
    body = msgspec.json.encode([args, {}, _EMBED])
    headers = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": "{}", "origin": _ORIGIN, "ignore_result": True,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": step,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return queue_key(queue, priority), msgspec.json.encode(message).decode()
