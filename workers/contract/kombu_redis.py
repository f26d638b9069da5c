"""kombu's Redis transport with one redis-py client per channel instead of one per call.

kombu's Redis ``Channel.conn_or_acquire`` builds a new ``redis.Redis`` (over
the channel's shared pool) for every publish, ack, reject and unacked-index
update; with redis-py 8 a client costs about 0.1 ms of CPU to build, three or
more times per task on the worker's main process. This channel keeps one
client over the same pool and hands it out instead (a ``redis.Redis`` is safe
to share; each command takes a pooled connection). Nothing else changes: the
same keys and acknowledgement rules.

Its QoS also writes the unacked bookkeeping of a delivery (payload and index
entry) and removes it at the ack as plain two-command pipelines instead of
kombu's MULTI…EXEC transactions: 4 Redis commands per task instead of 8.
Atomicity is not what redelivery rests on; the order is. The payload is
written before its index entry and deleted before it, so an index entry
never leads a restore to a payload that should not be restored: kombu's
``restore_by_tag`` WATCHes the payload hash, so a restore racing an ack
either sees the payload gone or has its transaction aborted by the ack's
HDEL, and a restore that reads an index entry whose payload is gone only
drops the entry. A delivery is restored only after the visibility timeout,
so a restore never races the bookkeeping of a fresh delivery. Restores
themselves stay kombu's (a WATCH/MULTI/EXEC transaction).

It is used through the transport name :data:`TRANSPORT_NAME` in the broker
URL (``workers.contract.jobs.celery_redis_url``), registered in kombu's
transport aliases when this module is imported.
"""

from __future__ import annotations

from contextlib import contextmanager
from time import time
from typing import Any, Iterator

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.json import dumps

#: The broker URL scheme of this transport (``govgate-redis://``, ``govgate-redis+socket://``).
TRANSPORT_NAME = "govgate-redis"


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS with its per-task bookkeeping sent as ordered pipelines, not transactions."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        delivery = message.delivery_info
        payload = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                pipe.hset(self.unacked_key, delivery_tag, payload)
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
                pipe.execute()
        VirtualQoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        self._forget(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._forget(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def _forget(self, delivery_tag: Any) -> None:
        """The payload first: from then on no restore can bring the delivery back."""
        with self.channel.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                pipe.hdel(self.unacked_key, delivery_tag)
                pipe.zrem(self.unacked_index_key, delivery_tag)
                pipe.execute()


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that reuses one synchronous client."""

    QoS = QoS
    _shared_client: redis.Redis | None = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:  # kombu replaces the pool on reconnect
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(TRANSPORT_NAME, f"{__name__}:Transport")
