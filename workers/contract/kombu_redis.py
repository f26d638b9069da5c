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

The delivery's bookkeeping, a fair job's pick and the ack's removal of the
bookkeeping are sent without waiting for their replies
(:mod:`workers.contract.deferred_replies`): the job goes on to the pool
process at once, and after an ack the next BRPOP goes out at once. Everything
that depends on them (the ack, a reject, a restore, a synchronous pick, and
the next BRPOP when a pick's reply, its order, is outstanding) reads the
outstanding replies first, and all of them travel on one connection, so
Redis applies them in the order they were sent and before anything that
depends on them. The next BRPOP does not wait for an ack's removal: it
touches other keys, and a removal that failed leaves only a served
delivery in the unacked index, which the visibility timeout restores and
the worker then ends without running again (its job key says it ran), as
after a worker that died between its terminal entry and its ack.

Its channel also serves fair share (``workers/contract/fair_queues.py``): the
worker consumes only ``model.<name>``, but BRPOPs the model's plain lists
first, then the fair lists in the order :mod:`workers.contract.fair_order`'s
script returns, then the model's wake list. A job popped from a fair list is
delivered to the consumer of ``model.<name>``; its message keeps the fair
queue as routing key, so kombu's restore (redelivery, reject-requeue,
visibility timeout) puts it back on its own list, which the restore here
registers again. See docs/architecture.md, "Fair share".

It is used through the transport name :data:`TRANSPORT_NAME` in the broker
URL (``workers.contract.jobs.celery_redis_url``), registered in kombu's
transport aliases when this module is imported.
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time
from typing import Any, Iterator

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.redis import Mutex, MutexHeld
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from redis.exceptions import NoScriptError

from workers.contract import fair_order
from workers.contract.deferred_replies import DeferredReplies, ignore_reply
from workers.contract.delivery_owners import (LEGACY_KEYS, ORPHAN_SCAN_INTERVAL_S, OWNERS_KEY, Owner, is_dead,
                                              orphaned_nodes, owner_from_node, owner_keys, process_started_at,
                                              this_process)
from workers.contract.fair_queues import PART_SEP, parse_fair_queue, registry_key, waiting_key, wake_key
from workers.contract.liveness import LIVE_SCRIPT, WORKERS_KEY

log = logging.getLogger(__name__)

#: The broker URL scheme of this transport (``govgate-redis://``, ``govgate-redis+socket://``).
TRANSPORT_NAME = "govgate-redis"
#: Transport option naming the worker whose deliveries a channel keeps under keys of its own
#: (``workers/contract/delivery_owners.py``); absent, kombu's shared keys.
OWNER_OPTION = "govgate_owner"


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS with its per-task bookkeeping sent as ordered pipelines, not transactions."""

    #: When the sweep next looks for owners' keys without a registration (the first sweep does).
    _next_orphan_scan: float = 0.0

    def append(self, message: Any, delivery_tag: Any) -> None:
        """The bookkeeping is sent, not waited for: the delivery goes on to the pool at once."""
        delivery = message.delivery_info
        payload = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self.channel.send_deferred(
            [("HSET", self.unacked_key, delivery_tag, payload),
             ("ZADD", self.unacked_index_key, repr(time()), delivery_tag)],
            [ignore_reply, ignore_reply])
        VirtualQoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        """The next BRPOP goes out at once, then the bookkeeping's removal, which is not waited for.

        ``served`` first: it reads the outstanding pick (its charge is what the service time corrects)
        and may run a synchronous pick, both before the next BRPOP's order is made. The BRPOP before
        the removal: it touches other keys, and sending the removal takes about as long as Redis takes
        to answer the BRPOP (the removal is safe to leave unread: :meth:`_forget`)."""
        self.channel.settle_deferred()
        self.channel.served(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)
        self.channel.poll_now()
        self._forget(delivery_tag, deferred=True)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self.channel.settle_deferred()
        self.channel.served(delivery_tag)  # the worker's time was spent, whatever became of the job
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._forget(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        self.channel.settle_deferred()
        super().restore_unacked(client)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        self.channel.settle_deferred()
        super().restore_by_tag(tag, client, leftmost)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's sweep, per owner: a dead worker's deliveries go back at once, a live one's after the
        visibility timeout (``workers/contract/delivery_owners.py``); then kombu's shared keys, as kombu's."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        self.channel.settle_deferred()
        with self.channel.conn_or_acquire() as client:
            try:
                with Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    self._sweep(client, num)
            except MutexHeld:
                pass

    def _sweep(self, client: Any, num: int) -> None:
        now = time()
        visible_before = now - self.visibility_timeout
        mine = self.channel.owner
        owners = client.hgetall(OWNERS_KEY)
        if mine is not None and mine.node.encode() not in owners:  # Redis lost it (restarted): register again
            client.hsetnx(OWNERS_KEY, mine.node, mine.record())
            owners[mine.node.encode()] = mine.record().encode()
        if now >= self._next_orphan_scan:  # keys no registration names: registered for the node they name
            self._next_orphan_scan = now + ORPHAN_SCAN_INTERVAL_S
            for node in orphaned_nodes(client, {bytes_to_str(n) for n in owners}):
                record = owner_from_node(node, now).record()
                client.hsetnx(OWNERS_KEY, node, record)
                owners[node.encode()] = record.encode()
                log.warning("unacknowledged deliveries of %s had no registration: registered now", node)
        live = {bytes_to_str(m).split("\n", 1)[-1] for m in client.eval(LIVE_SCRIPT, 1, WORKERS_KEY)} \
            if owners else set()
        host = socket.gethostname()
        for raw_node, raw in owners.items():
            node = bytes_to_str(raw_node)
            owner = Owner.parse(node, raw)
            hash_key, index_key = owner_keys(node)
            if mine is not None and node == mine.node:
                # what the keys held before this process registered is a predecessor's of the same name
                self._restore_older(client, hash_key, index_key, max(visible_before, mine.since), None)
            elif owner is not None and is_dead(owner, live, host=host, now=now):
                self._restore_older(client, hash_key, index_key, float("inf"), None)
                for tag in client.hkeys(hash_key):  # a payload whose index entry never arrived (died between)
                    self._restore_from(client, tag, hash_key, index_key)
                self._forget_owner(client, node, hash_key, index_key)
            else:
                self._restore_older(client, hash_key, index_key, visible_before, num)
        self._restore_older(client, *LEGACY_KEYS, visible_before, num)

    def _restore_older(self, client: Any, hash_key: str, index_key: str, before: float, num: int | None) -> None:
        """Hand back the deliveries of one owner's keys indexed before ``before`` (at most ``num``; None: all)."""
        while True:
            batch = num if num else 100
            tags = client.zrange(index_key, "(" + repr(before) if before != float("inf") else "+inf", 0,
                                 desc=True, byscore=True, offset=0, num=batch)
            for tag in tags:
                self._restore_from(client, tag, hash_key, index_key)
            if num or len(tags) < batch:
                return

    def _restore_from(self, client: Any, tag: Any, hash_key: str, index_key: str) -> None:
        """kombu's ``restore_by_tag`` on an owner's keys: a transaction WATCHing the payload."""

        def restore_transaction(pipe: Any) -> None:
            payload = pipe.hget(hash_key, tag)
            pipe.multi()
            pipe.zrem(index_key, tag)
            pipe.hdel(hash_key, tag)
            if payload:
                message, exchange, routing_key = loads(bytes_to_str(payload))
                self.channel._do_restore_message(message, exchange, routing_key, pipe, False)

        client.transaction(restore_transaction, hash_key)

    @staticmethod
    def _forget_owner(client: Any, node: str, hash_key: str, index_key: str) -> None:
        """A dead owner whose deliveries are all back: its registration and keys go."""
        if client.zcard(index_key) == 0 and client.hlen(hash_key) == 0:
            client.hdel(OWNERS_KEY, node)
            client.delete(hash_key, index_key)

    def _forget(self, delivery_tag: Any, *, deferred: bool = False) -> None:
        """The payload first: from then on no restore can bring the delivery back.

        ``deferred`` (the ack): sent on the channel's deferred connection, replies read when next needed.
        Safe to leave unread: a removal that fails leaves a delivery that was served in the unacked
        index, which the visibility timeout restores and the worker then ends without running it again
        (its job key says it ended), as after a worker that died between its terminal entry and its ack."""
        if deferred:
            try:
                self.channel.send_deferred([("HDEL", self.unacked_key, delivery_tag),
                                            ("ZREM", self.unacked_index_key, delivery_tag)],
                                           [ignore_reply, ignore_reply])
                return
            except redis.RedisError:  # the deferred connection was lost: as before, on the shared client
                pass
        with self.channel.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                pipe.hdel(self.unacked_key, delivery_tag)
                pipe.zrem(self.unacked_index_key, delivery_tag)
                pipe.execute()


#: The model queues' prefix (``workers.contract.jobs.queue_for``).
_MODEL_PREFIX = "model."
#: How long a fair order is used before it is asked for again when no job was popped meanwhile.
ORDER_FRESH_S = 1.0
#: A job whose service time is more than this many times its charge, or less than its charge over this,
#: is corrected at its ack (one more script call) instead of with the next pick: the next job's order was
#: made before, and a tag off by more than a job would favour the wrong team (one charged too much looks
#: behind the others). Off by less, the error is within what fair queueing's own bound allows.
CORRECT_AT_ONCE = 2.0
#: Most deliveries whose service time is awaited (a bound, not a limit reached: prefetch is one).
_MAX_IN_SERVICE = 1024


def _model_of(queue: str) -> str | None:
    """The model a consumed queue serves (``model.<name>``), or None for any other queue."""
    if queue.startswith(_MODEL_PREFIX) and PART_SEP not in queue:
        return queue[len(_MODEL_PREFIX):]
    return None


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that reuses one synchronous client and takes jobs in fair-share order."""

    QoS = QoS
    _shared_client: redis.Redis | None = None
    #: model queue → (monotonic time, fair lists in order, wake list last)
    _orders: dict[str, tuple[float, list[str]]]
    #: wake list → model queue
    _wakes: dict[str, str]
    #: delivery tag → (fair queue, ms charged, monotonic time of delivery, a warm-up), until acked or rejected
    _in_service: dict[Any, tuple[str, float, float, bool]]
    #: fair jobs this channel took
    _taken: int = 0
    #: model queue → [(fair queue, service ms, ms charged)] for the model's next pick
    _corrections: dict[str, list[tuple[str, float, float]]]
    #: commands sent whose replies are read when next needed (the bookkeeping, its removal at the ack, a fair
    #: job's pick)
    _deferred: DeferredReplies

    #: picks sent whose replies (the next order) have not been read
    _picks_outstanding: int = 0

    #: The worker whose deliveries this channel keeps under keys of its own (None: kombu's shared keys).
    owner: Owner | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._orders, self._wakes, self._in_service, self._corrections = {}, {}, {}, {}
        self._deferred = DeferredReplies()
        super().__init__(*args, **kwargs)
        node = self.connection.client.transport_options.get(OWNER_OPTION)
        if node:
            self.unacked_key, self.unacked_index_key = owner_keys(node)
            self.owner = self._register(this_process(node))

    def _register(self, owner: Owner) -> Owner:
        """Say whose keys these are before the first delivery (an owner registered once keeps its first time)."""
        with self.conn_or_acquire() as client:
            if not client.hsetnx(OWNERS_KEY, owner.node, owner.record()):
                known = Owner.parse(owner.node, client.hget(OWNERS_KEY, owner.node) or b"")
                started = process_started_at(owner.pid) or owner.since
                if known is not None and (known.host, known.pid) == (owner.host, owner.pid) \
                        and known.since >= started - 1.0:
                    return known  # another channel of this process registered first
                client.hset(OWNERS_KEY, owner.node, owner.record())  # a predecessor of the same name
        return owner

    def send_deferred(self, commands: list[tuple[Any, ...]], handlers: list[Any]) -> None:
        """Send ``commands`` on the channel's deferred connection; each reply goes to its handler later."""
        self._deferred.send(self.pool, commands, handlers)

    def settle_deferred(self) -> None:
        """Read the outstanding replies (before anything that depends on what they answer)."""
        if self._deferred.outstanding:
            self._deferred.settle()

    def close(self) -> None:
        self.settle_deferred()
        super().close()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:  # kombu replaces the pool on reconnect
            shared = self._shared_client = self._create_client()
        yield shared

    def poll_now(self) -> None:
        """Send the next BRPOP now, as the event loop's next poll would (an ack just freed a slot).

        Otherwise it waits for the rest of the ack (sending the bookkeeping's
        removal) and Celery's own bookkeeping of the finished task; sent
        here, Redis answers meanwhile. Measured over three alternating pairs
        of ``bench/fairness.py`` runs with a per-job trace: ack to BRPOP
        0.18 → 0.08 ms at the median, the whole hand-over between two jobs
        1.69 → 1.63 ms (median) and 1.91 → 1.79 ms (mean). The same call and
        conditions as kombu's ``on_poll_start`` (a channel consuming queues,
        with credit); a BRPOP already out (an ack inside a delivery's
        callback) is not doubled, and a failure is left to that poll.
        """
        cycle = getattr(self.connection, "cycle", None)
        if (cycle is None or self not in getattr(cycle, "_channels", ()) or self.closed or self._in_poll
                or not self.active_queues or not self.qos.can_consume()):
            return
        try:
            cycle._register_BRPOP(self)
        except Exception:  # noqa: BLE001 - the loop's next poll sends it (and reports what fails)
            log.debug("early BRPOP not sent; the next poll sends it", exc_info=True)

    # ---------------------------------------------------------------- fair share

    def _brpop_start(self, timeout: float | None = None) -> None:
        """kombu's, with each model queue's fair lists and wake list after its plain ones."""
        if timeout is None:
            timeout = self.brpop_timeout
        if self._picks_outstanding:  # the order the last pick returned (an ack's removal need not be read)
            self.settle_deferred()
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys: list[Any] = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        for queue in queues:
            if _model_of(queue) is not None:
                keys.extend(self._fair_order(queue))
        keys.append(timeout or 0)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        command_args = ["BRPOP", *keys]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self.client.connection.send_command(*command_args)

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's, delivering a fair list's job to its model queue's consumer and charging it at once.

        Unlike kombu's, the BRPOP counts as answered (``_in_poll`` cleared) once its reply is read, before
        the job is delivered, not after: with the solo pool the job runs inside the delivery, and its ack
        sends the next BRPOP at once (:meth:`poll_now`) instead of after the delivery returns to the event
        loop. A BRPOP sent so is left standing here (the loop sees it out and sends no other)."""
        answered = False
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            answered = True
            self._in_poll = None
            self._flush_brpop_reauth()
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            key = bytes_to_str(dest)
            woken = self._wakes.get(key)
            if woken is not None:  # a new fair list: order again (the token is not a job)
                self._orders.pop(woken, None)
                self._order_after(woken, popped=key)
                raise Empty()
            message = loads(bytes_to_str(item))
            queue = key.rsplit(self.sep, 1)[0]
            fair = parse_fair_queue(queue)
            if fair is not None:
                self._charge(fair.model_queue, queue, key, message)
                queue = fair.model_queue
            self._queue_cycle.rotate(queue)
            self.connection._deliver(message, queue)
            return True
        finally:
            if not answered:
                self._in_poll = None
                self._flush_brpop_reauth()

    def _fair_order(self, model_queue: str) -> list[str]:
        """The model's fair lists in order: the cached order if fresh, else a new one (no charge)."""
        cached = self._orders.get(model_queue)
        if cached is not None and monotonic() - cached[0] < ORDER_FRESH_S:
            return cached[1]
        result = self._order_after(model_queue)
        return result.order if result is not None else []

    def _order_after(self, model_queue: str, popped: str | None = None) -> fair_order.Pick | None:
        """Run the pick script for ``model_queue`` (charging ``popped``), cache and return its order.

        Redis errors propagate only when nothing was popped: a popped job must be delivered whatever
        its charge did (the waiting counts heal at the next recount)."""
        self.settle_deferred()
        model = model_queue[len(_MODEL_PREFIX):]
        corrections = self._corrections.pop(model_queue, [])
        try:
            with self.conn_or_acquire() as client:
                result = fair_order.pick(client, model, popped=popped, corrections=corrections)
        except Exception:
            if popped is None:
                self._corrections.setdefault(model_queue, []).extend(corrections)
                raise
            log.warning("fair share: could not charge a job of %s (it is served anyway)", model_queue,
                        exc_info=True)
            self._orders.pop(model_queue, None)
            return None
        self._orders[model_queue] = (monotonic(), result.order)
        self._wakes[wake_key(model)] = model_queue
        return result

    def _charge(self, model_queue: str, queue: str, key: str, message: dict[str, Any]) -> None:
        """Charge the job popped from ``key`` (fair ``queue``) and note when its service began.

        The pick is sent, not waited for: Redis charges the job when the command arrives, before any
        later command of this worker, which is what the model's other workers need; its reply (the
        next order, the ms charged) is read when next needed. A pick that fails is logged and the job
        served anyway (the waiting counts heal at the next recount)."""
        model = model_queue[len(_MODEL_PREFIX):]
        corrections = self._corrections.pop(model_queue, [])
        tag = message.get("properties", {}).get("delivery_tag")
        popped_at = monotonic()

        def on_reply(reply: Any) -> None:
            self._picks_outstanding -= 1
            if isinstance(reply, NoScriptError):  # the script was not run (a SCRIPT FLUSH, a new Redis)
                try:
                    with self.conn_or_acquire() as client:
                        result = fair_order.pick(client, model, popped=key, corrections=corrections)
                except Exception as error:
                    reply = error
                else:
                    reply = result
            if isinstance(reply, Exception):
                log.warning("fair share: the pick charging a job of %s failed or its reply was lost (the job "
                            "is served anyway): %s", model_queue, reply)
                self._orders.pop(model_queue, None)
                return
            result = reply if isinstance(reply, fair_order.Pick) else fair_order.parse_pick(reply)
            self._orders[model_queue] = (monotonic(), result.order)
            self._wakes[wake_key(model)] = model_queue
            self._begin_service(tag, queue, result.charged_ms, popped_at)

        try:
            self.send_deferred([fair_order.pick_command(model, popped=key, corrections=corrections)], [on_reply])
            self._picks_outstanding += 1
        except Exception:
            log.warning("fair share: could not charge a job of %s (it is served anyway)", model_queue,
                        exc_info=True)
            self._orders.pop(model_queue, None)

    def _begin_service(self, tag: Any, queue: str, charged_ms: float | None, popped_at: float) -> None:
        """Note that the delivery ``tag`` of fair ``queue``, charged ``charged_ms``, began at ``popped_at``."""
        if charged_ms is None or tag is None or len(self._in_service) >= _MAX_IN_SERVICE:
            return
        # A pool process's first job carries its warm-up (imports, connections: a second or more on
        # the tiny model's ~20 ms jobs); no team should pay for that. One per pool process: the
        # channel's first prefetch-count deliveries.
        self._taken += 1
        warm_up = self._taken <= max(1, self.qos.prefetch_count or 1)
        self._in_service[tag] = (queue, charged_ms, popped_at, warm_up)

    def served(self, delivery_tag: Any) -> None:
        """A delivery ended (acked or rejected): its real service time corrects its team's tags at the next pick."""
        self.settle_deferred()  # a pick not read yet holds the delivery's charge
        begun = self._in_service.pop(delivery_tag, None)
        if begun is None:
            return
        queue, charged_ms, started, warm_up = begun
        fair = parse_fair_queue(queue)
        if fair is None:
            return
        actual_ms = fair_order.NOT_MEASURED if warm_up else (monotonic() - started) * 1000.0
        self._corrections.setdefault(fair.model_queue, []).append((queue, actual_ms, charged_ms))
        if warm_up or not charged_ms / CORRECT_AT_ONCE <= actual_ms <= charged_ms * CORRECT_AT_ONCE:
            # The next job's order was made before this correction; far off, it would favour the wrong
            # team (a team charged too much looks behind the others), so order again now.
            try:
                self._order_after(fair.model_queue)
            except Exception:  # the correction stays queued for the next pick
                log.warning("fair share: could not correct the tags of %s", fair.model_queue, exc_info=True)

    def _do_restore_message(self, payload: Any, exchange: Any, routing_key: Any, pipe: Any,
                            leftmost: bool = False) -> None:
        """kombu's, and a job going back to a fair list registers that list again and counts as waiting
        (the registry may have dropped the list meanwhile), and wakes a worker."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        fair = parse_fair_queue(routing_key or "") if not exchange else None
        if fair is None:
            return
        model = fair.model_queue[len(_MODEL_PREFIX):]
        key = self._q_for_pri(routing_key, self._get_message_priority(payload, reverse=False))
        pipe.zadd(registry_key(model), {key: time()}, gt=True)
        pipe.hincrby(waiting_key(model), fair.team, 1)
        pipe.lpush(wake_key(model), "1")
        pipe.ltrim(wake_key(model), 0, 63)


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(TRANSPORT_NAME, f"{__name__}:Transport")
