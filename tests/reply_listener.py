"""A gateway's reply channel that only listens, for worker tests that check what a hand-over published."""

from __future__ import annotations

import uuid

import redis


class Listener:
    """Subscribed to a fresh ``govgate:gateway:<hex>`` channel: :meth:`heard` returns what was published on it
    so far (a fence message of its own marks the end, so nothing waits for a report that never comes)."""

    def __init__(self, client: redis.Redis) -> None:
        self.channel = f"govgate:gateway:{uuid.uuid4().hex}"
        self._client = client
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(self.channel)
        self._pubsub.get_message(timeout=5)  # the subscribe confirmation

    def heard(self) -> list[bytes]:
        fence = uuid.uuid4().hex.encode()
        self._client.publish(self.channel, fence)
        messages: list[bytes] = []
        while (message := self._pubsub.get_message(ignore_subscribe_messages=True, timeout=10)) is not None:
            if message["data"] == fence:
                break
            messages.append(message["data"])
        return messages

    def close(self) -> None:
        self._pubsub.close()
