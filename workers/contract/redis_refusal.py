"""Whether an error is Redis refusing a write (it cannot persist, has too few replicas, is a replica, is full).

A worker's consumer meets such a refusal on its next take and Celery stops
the worker as an "Unrecoverable error" (exit 1), which ``govgate up``
counted as a crash of the model, and gave the model up after five within a
minute (for a Redis whose disk filled for a while). The refusal passes once
Redis writes again, so the worker exits with :data:`EXIT_REDIS_REFUSED`
instead (``workers/runtime.py``), and ``govgate up`` waits and starts it
again without counting a crash (``govgate/launcher.py``).

A refusal met while kombu makes a channel (the worker's channel registers
its owner, a write) is raised as :class:`RedisRefusesWrites`: kombu counts
redis-py's ``ResponseError`` among the errors a new connection recovers from
and retries making the channel forever, so a control command's reply (a
ping) met that way held the worker until Redis wrote again, making a new
connection every second, instead of letting it exit.

Imports only redis-py's exceptions: the worker's main process loads it.
"""

from __future__ import annotations

import os
import re
from typing import Final

import redis.exceptions

#: The worker's exit status when Redis refused its writes: EX_TEMPFAIL ("try again later").
EXIT_REDIS_REFUSED: Final = os.EX_TEMPFAIL

#: Redis's error codes that refuse a write for a state of the server that may pass.
REFUSAL_CODES: Final = ("MISCONF", "NOREPLICAS", "READONLY", "OOM")
#: A refusal met by a command inside a Lua script, which Redis reports wrapped ("… @user_script: 2: -MISCONF …").
_WRAPPED = re.compile(r"-(?P<code>" + "|".join(REFUSAL_CODES) + r") (?P<message>[^\n]*)")
#: redis-py's own classes for two of them, whose text lacks the code.
_CLASSES: Final = ((redis.exceptions.ReadOnlyError, "READONLY"), (redis.exceptions.OutOfMemoryError, "OOM"))


class RedisRefusesWrites(Exception):
    """Redis refused a write for a state of the server that may pass (raised from redis-py's error).

    Not a redis-py or kombu error class on purpose: kombu retries those forever where it makes a channel.
    """


def write_refusal(exc: BaseException) -> str | None:
    """``"CODE message"`` when ``exc`` (or what it was raised from) is Redis refusing a write, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _refusal(current)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _refusal(exc: BaseException) -> str | None:
    if isinstance(exc, RedisRefusesWrites):
        return str(exc)
    if not isinstance(exc, redis.exceptions.ResponseError):
        return None
    text = " ".join(str(exc).split())
    for cls, code in _CLASSES:
        if isinstance(exc, cls):
            return text if text.startswith(code) else f"{code} {text}"
    for code in REFUSAL_CODES:
        if text.startswith(code + " ") or text == code:
            return text
    wrapped = _WRAPPED.search(text)
    return f"{wrapped['code']} {wrapped['message']}" if wrapped else None
