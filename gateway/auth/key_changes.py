"""Telling running gateways that a key changed: one Redis channel, key ids as messages.

The writer is whoever changes a key (``govgate keys revoke``, through
:class:`gateway.auth.keys.KeyStore`'s ``on_change``); the readers are the
gateways' :class:`gateway.auth.key_change_listener.KeyChangeListener`, which
drop the key from their principal cache. A message is published only after
the change is committed, so a gateway that reads the key again after the
message sees the change.
"""

from __future__ import annotations

import redis
from redis.exceptions import RedisError

from gateway.settings import without_password

#: The channel; each message is the id of a key whose access was narrowed.
KEYS_CHANGED_CHANNEL = "govgate:keys:changed"


class KeyChangeAnnouncer:
    """PUBLISHes changed key ids (synchronously, for the CLI); remembers why one was not delivered.

    A failure does not raise: the change itself is already committed, and
    the caller decides what to tell the operator (:attr:`failure`).
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.failure: str | None = None
        self.receivers = 0

    def __call__(self, key_id: str) -> None:
        if not self.redis_url:
            self.failure = "no Redis is configured (GOVGATE_REDIS_URL is empty and no embedded Redis is running)"
            return
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)
        except ValueError as exc:  # not a Redis URL: the change is committed all the same
            self.failure = f"{without_password(self.redis_url)!r} is not a Redis URL ({exc})"
            return
        try:
            self.receivers += int(client.publish(KEYS_CHANGED_CHANNEL, key_id))
        except (RedisError, OSError) as exc:
            self.failure = f"Redis at {without_password(self.redis_url)} did not take the signal ({type(exc).__name__}: {exc})"
        finally:
            client.close()
