"""Handing a job's outcome back to the gateway that waits for it.

The outcome goes straight onto the gateway's own reply channel (the job names
it) and is stored once under a short-lived key, in one round trip: the
publish is what the gateway normally reads, the key is for a gateway whose
pub/sub connection was down at that moment (it reads stored outcomes after
reconnecting). This replaces Celery's result backend, which cost a
SUBSCRIBE/UNSUBSCRIBE pair per request on the gateway and a GET/SET/PUBLISH
on the worker. See docs/architecture.md, "The request path".
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from workers.contract.jobs import REPLY_RESULT, RESULT_TTL_S, reply_message, result_key
from workers.contract.unsettled import note_unsettled

log = logging.getLogger(__name__)

#: Outcome statuses, as the gateway reads them (the names Celery's result meta used).
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"


def success(sealed_result: dict[str, Any]) -> dict[str, Any]:
    """The outcome of a task that returned (its result is sealed: status in clear, the rest not)."""
    return {"status": SUCCESS, "result": sealed_result}


def failure(exc: BaseException) -> dict[str, Any]:
    """The outcome of a task that raised: the exception's type and message only (no job text is in them)."""
    return {"status": FAILURE, "result": {"exc_type": type(exc).__name__, "exc_message": str(exc)}}


def deliver(client: redis.Redis, request_id: str, reply_to: str, outcome: dict[str, Any]) -> bool:
    """Store ``outcome`` for ``request_id`` and publish it on ``reply_to``; False if Redis refused.

    Never raises: the terminal entry is already written (or kept), and a
    gateway that hears nothing ends its wait on its own timeout, where the
    database's unique constraint hands it the worker's entry. A publish that
    reached no subscriber (its gateway is gone) names the request for any
    gateway to settle its usage (:mod:`workers.contract.unsettled`).
    """
    data = json.dumps(outcome)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.set(result_key(request_id), data, ex=RESULT_TTL_S)
            if reply_to:
                pipe.publish(reply_to, reply_message(REPLY_RESULT, request_id, data))
            replies = pipe.execute()
    except (redis.RedisError, OSError) as exc:
        log.error("cannot hand the outcome of %s back to its gateway: %s", request_id, exc)
        return False
    if reply_to and replies[-1] == 0:
        note_unsettled(client, request_id)
    return True
