"""kombu's Redis transport with one redis-py client per channel instead of one per call.

kombu's Redis ``Channel.conn_or_acquire`` builds a new ``redis.Redis`` (over
the channel's shared pool) for every publish, ack, reject and unacked
update; with redis-py 8 a client costs about 0.1 ms of CPU to build, three or
more times per task on the worker's main process. This channel keeps one
client over the same pool and hands it out instead (a ``redis.Redis`` is safe
to share; each command takes a pooled connection). Nothing else changes: the
same keys and acknowledgement rules.

Its channel takes jobs with :mod:`workers.contract.take`'s script instead of
kombu's BRPOP: the job leaves its list and lands in the worker's unacked
hash, with its time, in one atomic step, so there is no moment at which a job is
in neither and a worker frozen or killed right after taking it loses it:
the restore scan (``QoS.restore_visible`` below) hands it back. A take that
finds nothing leaves an idle token and the channel BRPOPs its queues' bells
instead, which a push rings (see that module).

The ack removes the bookkeeping with one ``HDEL`` (payload and time are
fields of one hash under a worker's own keys: ``workers/contract/delivery_owners.py``;
until 2026-12-02 the time was an index entry, a ``ZADD`` in the take and a
``ZREM`` in the ack) instead of kombu's MULTI…EXEC transaction (a
``basic_get`` delivery, which the take does not book, is booked so too).
kombu's restore_by_tag WATCHes the payload hash, so a restore racing an ack
either sees the payload gone or has its transaction aborted by the ack's
HDEL. Under kombu's shared keys (no owner) the ack is kombu's two commands,
payload first, then its index entry, so an index entry never leads a
restore to a payload that should not be restored. Restores themselves stay
kombu's (a WATCH/MULTI/EXEC transaction).

The ack's removal rides on the next take: the ack sends that take at once
(:meth:`Channel.poll_now`) with the acknowledged tag, and the script removes
the payload and its time (or, under kombu's shared keys, its index entry)
before it pops, in the same atomic step. An ack that sends no take (the
channel is not consuming, a poll is already out) sends the removal on its
own without waiting for its replies
(:mod:`workers.contract.deferred_replies`), read when next needed (the next
ack, a reject, a restore). A take that fails carries its removals to the
next one; a removal that never runs leaves only a served delivery in the
unacked hash, which the visibility timeout restores and the worker then
ends without running again (its job key says it ran), as after a worker
that died between its terminal entry and its ack.

On the solo pool the take the ack sends also carries the output's
hand-over of the job just run (:mod:`workers.contract.handover`): the job
leaves it with the channel that delivered it (:meth:`Channel.carry`), the
take runs it before the removal, and an ack that sends no take sends it on
its own first. A take that fails with hand-overs aboard has them sent on
their own again (the job's output is kept until then), and a job whose
hand-over Redis refuses records its end itself, as before.

Its channel also serves fair share (``workers/contract/fair_queues.py``): the
worker consumes only ``model.<name>``, but its take looks at the model's
plain lists first, then the fair lists in the order the script makes
(:mod:`workers.contract.fair_order`'s functions, charging the job it takes).
A job taken from a fair list is delivered to the consumer of
``model.<name>``; its message keeps the fair queue as routing key, so
kombu's restore (redelivery, reject-requeue, visibility timeout) puts it
back on its own list, which the restore here registers again. See
docs/architecture.md, "Fair share".

It is used through the transport name :data:`TRANSPORT_NAME` in the broker
URL (``workers.contract.jobs.celery_redis_url``), registered in kombu's
transport aliases when this module is imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import socket
import uuid
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
from workers.contract import take as take_script
from workers.contract.deferred_replies import DeferredReplies, ignore_reply
from workers.contract.delivery_owners import (LEGACY_KEYS, ORPHAN_SCAN_INTERVAL_S, OWNERS_KEY, TIME_MARK, Owner,
                                              delivery_times, is_dead, orphaned_nodes, owner_from_node, owner_keys,
                                              process_started_at, this_process, time_field)
from workers.contract.handover import CarriedHandOver, delivering
from workers.contract.fair_queues import (PART_SEP, PLAIN_HINT, REGISTRY_COPY, FairQueue, parse_fair_queue,
                                          registry_key, tags_key, waiting_key, wake_key)
from workers.contract.liveness import LIVE_SCRIPT, WORKERS_KEY
from workers.contract.queue_layout import DEFAULT_PRIORITY, bell_key, idle_key
from workers.contract.redis_refusal import RedisRefusesWrites, write_refusal
from workers.contract.repick import Ticket, offering
from workers.contract.take import TakeQueue, take_command

log = logging.getLogger(__name__)

#: The broker URL scheme of this transport (``govgate-redis://``, ``govgate-redis+socket://``).
TRANSPORT_NAME = "govgate-redis"
#: Transport option naming the worker whose deliveries a channel keeps under keys of its own
#: (``workers/contract/delivery_owners.py``); absent, kombu's shared keys.
OWNER_OPTION = "govgate_owner"
#: Transport option (with an owner) saying the worker's fair jobs may give way at their start (the solo pool,
#: ``GOVGATE_FAIR_GIVE_WAY``): its takes note each fair job taken for the pushes to mark
#: (``workers/contract/repick.py``).
GIVE_WAY_OPTION = "govgate_give_way"


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS with its per-task bookkeeping sent as ordered pipelines, not transactions."""

    #: When the sweep next looks for owners' keys without a registration (the first sweep does).
    _next_orphan_scan: float = 0.0

    def append(self, message: Any, delivery_tag: Any) -> None:
        """A delivery the take script booked has its bookkeeping in Redis already (written with the pop);
        any other (``basic_get``) has it sent, not waited for: the delivery goes on at once."""
        if delivery_tag in self.channel._booked:
            self.channel._booked.discard(delivery_tag)
            VirtualQoS.append(self, message, delivery_tag)
            return
        delivery = message.delivery_info
        payload = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        if self.channel.owner is not None:
            commands = [("HSET", self.unacked_key, delivery_tag, payload, time_field(delivery_tag), repr(time()))]
        else:
            commands = [("HSET", self.unacked_key, delivery_tag, payload),
                        ("ZADD", self.unacked_index_key, repr(time()), delivery_tag)]
        self.channel.send_deferred(commands, [ignore_reply] * len(commands))
        VirtualQoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        """The next take goes out at once, carrying the bookkeeping's removal; without one, the removal
        goes on its own and is not waited for.

        ``served`` first: the job's service time joins the corrections the next take applies before it
        orders the lists. The removal inside the take saves a send of its own between two jobs (measured
        in ``bench/fairness.py``: docs/performance.md); it is safe to leave to a later take, or unread
        (:meth:`_forget`). The previous deferred removal's replies are read first (they arrived long ago),
        so no more than one ack's are ever outstanding.

        A job that gave way at its start (``workers/contract/repick.py``) is back on its list with its
        bookkeeping gone and its charge undone: its ack only sends the next take."""
        self.channel.settle_deferred()
        if self.channel.gave_way(delivery_tag):
            VirtualQoS.ack(self, delivery_tag)
            self.channel.poll_now()
            self.channel.hand_overs_alone()
            return
        self.channel.served(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)
        if self.channel.poll_now(acked=delivery_tag):
            return
        self.channel.hand_overs_alone()  # a handed-over output is out before its bookkeeping goes
        self._forget(delivery_tag, deferred=True)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self.channel.gave_way(delivery_tag):  # already back on its list (the task failed after?)
            VirtualQoS.ack(self, delivery_tag)
            return
        self.channel.settle_deferred()
        self.channel.hand_overs_alone()
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
                self._restore_owned(client, hash_key, index_key, max(visible_before, mine.since), None)
            elif owner is not None and is_dead(owner, live, host=host, now=now):
                # every delivery, also one whose time never arrived (an older worker that died between)
                self._restore_owned(client, hash_key, index_key, float("inf"), None, untimed=True)
                self._forget_owner(client, node, hash_key, index_key)
            else:
                self._restore_owned(client, hash_key, index_key, visible_before, num)
        self._restore_older(client, *LEGACY_KEYS, visible_before, num)

    def _restore_owned(self, client: Any, hash_key: str, index_key: str, before: float, num: int | None, *,
                       untimed: bool = False) -> None:
        """Hand back an owner's deliveries made before ``before``, oldest last as kombu's (at most ``num``;
        None: all), and with ``untimed`` those whose time is not known. One ``HGETALL`` (a worker holds a
        few deliveries), and the index of an older worker only when a delivery has no time in the hash."""
        fields = {bytes_to_str(k): bytes_to_str(v) for k, v in client.hgetall(hash_key).items()}
        if not fields:
            return
        index: dict[str, float] = {}
        if any(not name.startswith(TIME_MARK) and time_field(name) not in fields for name in fields):
            index = {bytes_to_str(tag): score for tag, score in client.zrange(index_key, 0, -1, withscores=True)}
        times = delivery_times(fields, index)
        due = sorted((tag for tag, at in times.items() if (at is None and untimed) or (at is not None and at < before)),
                     key=lambda tag: times[tag] or 0.0, reverse=True)
        for tag in due[:num] if num else due:
            self._restore_from(client, tag, hash_key, index_key)

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
            pipe.hdel(hash_key, tag, time_field(bytes_to_str(tag)))
            if payload:
                message, exchange, routing_key = loads(bytes_to_str(payload))
                self.channel._do_restore_message(message, exchange, routing_key, pipe, False)

        client.transaction(restore_transaction, hash_key)

    @staticmethod
    def _forget_owner(client: Any, node: str, hash_key: str, index_key: str) -> None:
        """A dead owner whose deliveries are all back (a time field left alone is no delivery): its
        registration and keys go."""
        if all(bytes_to_str(name).startswith(TIME_MARK) for name in client.hkeys(hash_key)):
            # in one step: an older worker's orphan scan that found the keys without their registration
            # would register them in its own form and read the time fields left as payloads
            with client.pipeline(transaction=True) as pipe:
                pipe.hdel(OWNERS_KEY, node)
                pipe.delete(hash_key, index_key)
                pipe.execute()

    def _forget(self, delivery_tag: Any, *, deferred: bool = False) -> None:
        """The payload first: from then on no restore can bring the delivery back.

        ``deferred`` (the ack): sent on the channel's deferred connection, replies read when next needed.
        Safe to leave unread: a removal that fails leaves a delivery that was served in the unacked
        index, which the visibility timeout restores and the worker then ends without running it again
        (its job key says it ended), as after a worker that died between its terminal entry and its ack."""
        if self.channel.owner is not None:  # payload and time in one hash: one HDEL
            commands: list[tuple[Any, ...]] = [("HDEL", self.unacked_key, delivery_tag, time_field(delivery_tag))]
        else:
            commands = [("HDEL", self.unacked_key, delivery_tag), ("ZREM", self.unacked_index_key, delivery_tag)]
        if deferred:
            try:
                self.channel.send_deferred(commands, [ignore_reply] * len(commands))
                return
            except redis.RedisError:  # the deferred connection was lost: as before, on the shared client
                pass
        with self.channel.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                pipe.execute()

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        """kombu's (its restore's removal, inside the restore's transaction); under an owner's keys the
        payload and its time, one ``HDEL``."""
        if self.channel.owner is None:
            return super()._remove_from_indices(delivery_tag, pipe)
        with self.pipe_or_acquire(pipe) as pipe:
            return pipe.hdel(self.unacked_key, delivery_tag, time_field(bytes_to_str(delivery_tag)))


#: The model queues' prefix (``workers.contract.jobs.queue_for``).
_MODEL_PREFIX = "model."
#: Most deliveries whose service time is awaited (a bound, not a limit reached: prefetch is one).
_MAX_IN_SERVICE = 1024

#: A correction as the channel keeps it: the fair list, its service ms, the ms charged, its batch (0: not
#: sent yet).
Correction = tuple[str, float, float, int]

#: Per worker node: the corrections a closed channel had not seen applied (those unsent, and those of a take
#: still out, which may have run), with the name and last batch it sent them under. Celery replaces the
#: connection, and so the channel, after a connection error; the node's next channel that consumes a model
#: queue takes them over, before its first take, and sends them under that name and batch: the tags' record
#: says whether the lost take applied them.
_LEFT_BY_CLOSED: dict[str, tuple[str, int, dict[str, list[Correction]]]] = {}


def _model_of(queue: str) -> str | None:
    """The model a consumed queue serves (``model.<name>``), or None for any other queue."""
    if queue.startswith(_MODEL_PREFIX) and PART_SEP not in queue:
        return queue[len(_MODEL_PREFIX):]
    return None


def _ring_target(routing_key: str) -> str:
    """The consumed queue whose idle workers a job on ``routing_key`` (a plain or fair queue) wakes."""
    fair = parse_fair_queue(routing_key)
    return fair.model_queue if fair is not None else routing_key


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that reuses one synchronous client and takes jobs with the take script
    (:mod:`workers.contract.take`): atomically into its unacked hash, in fair-share order."""

    QoS = QoS
    _shared_client: redis.Redis | None = None
    #: delivery tag → (fair queue, ms charged, monotonic time of delivery, a warm-up), until acked or rejected
    _in_service: dict[Any, tuple[str, float, float, bool]]
    #: fair jobs this channel took
    _taken: int = 0
    #: model queue → [(fair queue, service ms, ms charged, batch)] for the model's next take
    _corrections: dict[str, list[Correction]]
    #: the corrections the take in flight carries (given back if it fails)
    _sent_corrections: dict[str, list[Correction]]
    #: the name this channel's batches of corrections are recorded under in the tags, and the last batch
    #: number given (a batch goes with each take that carries new corrections; 0: not sent yet)
    _writer: str
    _batch: int
    #: the worker node whose keys these are ('' none: a Celery client's channel)
    _node: str = ""
    #: commands sent whose replies are read when next needed (the ack's removal of the bookkeeping)
    _deferred: DeferredReplies
    #: delivery tags whose bookkeeping the take wrote (the QoS writes none for them)
    _booked: set[Any]
    #: delivery tags whose job gave way at its start (back on its list: ``workers/contract/repick.py``)
    _gave_way: set[Any]
    #: queues whose consumer does not acknowledge
    _no_ack: set[str]
    #: queue → whether this channel's idle token is out on its idle list
    _idle_out: dict[str, bool]
    #: bell key → its queue
    _bells: dict[str, str]
    #: what the next poll sends: a take, or (after a take found nothing) a BRPOP on the bells
    _take_next: bool = True
    #: the poll out is a take (else a BRPOP on the bells; None: kombu's BRPOP, no model queue consumed)
    _polling_take: bool | None = False
    #: a take's reply was lost: before the next take, what this worker's hash holds undelivered goes back
    _lost_take: bool = False
    #: the queues the poll out was sent for
    _poll_queues: list[str] = []
    #: a bell woke this channel (its take passes the bell on if jobs remain)
    _woken: bool = False
    #: a wake token woke it (its take clears the wake lists)
    _clear_wake: bool = False
    #: acknowledged delivery tags whose bookkeeping the next take removes (a failed take gives them back)
    _acked_out: list[Any]
    #: the tags the take in flight removes
    _sent_acked: list[Any]
    #: outputs handed over that the next take carries (solo pool: ``workers/contract/handover.py``)
    _hand_overs_out: list[CarriedHandOver]
    #: the hand-overs the take in flight carries (sent on their own if it fails)
    _sent_hand_overs: list[CarriedHandOver]

    #: The worker whose deliveries this channel keeps under keys of its own (None: kombu's shared keys).
    owner: Owner | None = None
    #: This channel's name in the fair jobs its takes note for the pushes to mark ('' notes none: its jobs'
    #: starts do not give way, or it has no keys of its own).
    noted_as: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._in_service, self._corrections, self._sent_corrections = {}, {}, {}
        self._writer, self._batch = uuid.uuid4().hex[:16], 0
        self._booked, self._idle_out, self._bells, self._no_ack = set(), {}, {}, set()
        self._gave_way = set()
        self._acked_out, self._sent_acked = [], []
        self._hand_overs_out, self._sent_hand_overs = [], []
        self._deferred = DeferredReplies()
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:  # the take script names its keys itself
            raise ValueError("the govgate-redis transport does not support global_keyprefix")
        node = self.connection.client.transport_options.get(OWNER_OPTION)
        self._node = node or ""
        if node:
            self.unacked_key, self.unacked_index_key = owner_keys(node)
            try:
                self.owner = self._register(this_process(node))
            except Exception as exc:
                # kombu made this channel's connections and put it in its poller: a channel kombu never gets
                # would keep them open (kombu retries making a channel: one more each second).
                self.close()
                why = write_refusal(exc)
                if why is not None:  # kombu would retry this forever: a worker must stop (exit 75) instead
                    raise RedisRefusesWrites(why) from exc
                raise
            if self.connection.client.transport_options.get(GIVE_WAY_OPTION):
                self.noted_as = hashlib.sha1(self.unacked_key.encode()).hexdigest()[:12]

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

    def carry(self, hand_over: CarriedHandOver) -> None:
        """Leave an output's hand-over to the next take (the ack's), or to the ack itself when none goes."""
        self._hand_overs_out.append(hand_over)

    def hand_overs_alone(self, *, sent: bool = False) -> None:
        """Send the hand-overs no take carried (``sent``: those of the take that failed) on their own now,
        each ending its request itself if Redis refuses it (``CarriedHandOver.alone``)."""
        if sent:
            waiting, self._sent_hand_overs = self._sent_hand_overs, []
        else:
            waiting, self._hand_overs_out = self._hand_overs_out, []
        for hand_over in waiting:
            hand_over.send_alone()

    def close(self) -> None:
        self._leave_corrections()  # first: memory only, whatever the steps below meet on a dead connection
        # a take still out may have run them, or not: again (a gateway records the first report it hears)
        self.hand_overs_alone(sent=True)
        self.hand_overs_alone()
        self.settle_deferred()
        self._unregister_idle()
        self._forget_acked()
        super().close()

    def _forget_acked(self) -> None:
        """Remove the bookkeeping of acknowledged deliveries no take carried yet (at close; best effort:
        what stays is restored after the visibility timeout and ended without running again). A take
        still out was sent: Redis runs its removals whether or not its reply is read."""
        acked, self._acked_out = self._acked_out, []
        if not acked or self.closed:
            return
        try:
            tags = [bytes_to_str(tag) if isinstance(tag, bytes) else str(tag) for tag in acked]
            with self.conn_or_acquire() as client:
                with client.pipeline(transaction=False) as pipe:
                    if self.owner is not None:  # payloads and their times, one hash
                        pipe.hdel(self.unacked_key, *tags, *[time_field(tag) for tag in tags])
                    else:
                        pipe.hdel(self.unacked_key, *tags)
                        pipe.zrem(self.unacked_index_key, *tags)
                    pipe.execute()
        except Exception:  # noqa: BLE001 - Redis gone: the visibility timeout restores them, ended unrun
            log.debug("acknowledged deliveries' bookkeeping not removed at close", exc_info=True)

    def _unregister_idle(self) -> None:
        """A channel that goes away while registered idle takes its tokens back (best effort: a token
        left behind only wakes some worker for nothing)."""
        out = [queue for queue, registered in self._idle_out.items() if registered]
        self._idle_out.clear()
        if not out or self.closed:
            return
        try:
            with self.conn_or_acquire() as client:
                with client.pipeline(transaction=False) as pipe:
                    for queue in out:
                        pipe.rpop(idle_key(queue))
                    pipe.execute()
        except Exception:  # noqa: BLE001 - Redis gone: the tokens stay, harmless
            log.debug("idle tokens not taken back", exc_info=True)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:  # kombu replaces the pool on reconnect
            shared = self._shared_client = self._create_client()
        yield shared

    def poll_now(self, acked: Any = None) -> bool:
        """Send the next take now, as the event loop's next poll would (an ack just freed a slot); True
        when a take went out carrying the bookkeeping's removal of ``acked`` (its delivery tag).

        Otherwise it waits for the rest of the ack and Celery's own
        bookkeeping of the finished task; sent
        here, Redis answers meanwhile. Measured over three alternating pairs
        of ``bench/fairness.py`` runs with a per-job trace (then a BRPOP):
        ack to BRPOP 0.18 → 0.08 ms at the median, the whole hand-over
        between two jobs 1.69 → 1.63 ms (median) and 1.91 → 1.79 ms (mean).
        The same call and conditions as kombu's ``on_poll_start`` (a channel
        consuming queues, with credit); a poll already out (an ack inside a
        delivery's callback) is not doubled, and a failure is left to that poll.
        """
        cycle = getattr(self.connection, "cycle", None)
        if (cycle is None or self not in getattr(cycle, "_channels", ()) or self.closed or self._in_poll
                or not self.active_queues or not self.qos.can_consume()):
            return False
        if acked is not None:
            self._acked_out.append(acked)
        sent = True
        try:
            cycle._register_BRPOP(self)
        except Exception:  # noqa: BLE001 - the loop's next poll sends it (and reports what fails)
            log.debug("early poll not sent; the next poll sends it", exc_info=True)
            sent = False
        if not sent and self._sent_hand_overs:  # not out: the ack sends them on its own
            self._hand_overs_out[:0] = self._sent_hand_overs
            self._sent_hand_overs = []
        if acked is None:
            return False
        if sent and acked in self._sent_acked:
            return True
        for carried in (self._acked_out, self._sent_acked):  # not carried: the caller removes it itself
            with contextlib.suppress(ValueError):
                carried.remove(acked)
        return False

    # ---------------------------------------------------------------- taking jobs

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Instead of kombu's BRPOP over the job lists: the take script, or, after a take found nothing,
        a BRPOP on the queues' bells and the models' wake lists (with kombu's timeout, after which the
        next poll takes again)."""
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if not any(_model_of(queue) is not None for queue in queues):
            # A Celery client reading a reply queue (a ping, `celery inspect`): no job to keep, no model
            # to order, and no idle token left behind by a short-lived client: kombu's BRPOP as it was.
            self._polling_take = None
            super()._brpop_start(timeout)
            return
        if self._lost_take:
            self._restore_undelivered()
        if self._take_next:
            command = self._take_command(queues)
        else:
            keys: list[Any] = []
            for queue in queues:
                self._bells[bell_key(queue)] = queue
                keys.append(bell_key(queue))
            keys += [wake_key(model) for model in map(_model_of, queues) if model is not None]
            command = ("BRPOP", *keys, timeout or 0)
        self._polling_take, self._poll_queues = self._take_next, list(queues)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)

    def _take_command(self, queues: list[str]) -> tuple[str, ...]:
        """The take of ``queues`` (their corrections leave with it; given back if it fails)."""
        spec = []
        batch = self._batch + 1  # the new corrections' batch (given back ones keep theirs: sent again)
        for queue in queues:
            model = _model_of(queue)
            corrections = self._corrections.pop(queue, []) if model is not None else []
            if corrections:
                corrections = [(fair, actual, charged, number or batch) for fair, actual, charged, number in corrections]
                if any(number == batch for *_, number in corrections):
                    self._batch = batch
                self._sent_corrections.setdefault(queue, []).extend(corrections)
            spec.append(TakeQueue(idle_key(queue), bell_key(queue),
                                  [self._q_for_pri(queue, pri) for pri in self.priority_steps], model, corrections,
                                  writer=self._writer))
        acked, self._acked_out = self._acked_out, []
        self._sent_acked.extend(acked)
        self._sent_hand_overs.extend(self._hand_overs_out)
        self._hand_overs_out = []
        command = take_command(self.unacked_key, None if self.owner is not None else self.unacked_index_key, spec,
                               woken=self._woken,
                               registered=[self._idle_out.get(queue, False) for queue in queues],
                               book=[queue not in self._no_ack for queue in queues],
                               clear_wake=self._clear_wake, default_place=self._default_place(),
                               acked=[bytes_to_str(tag) if isinstance(tag, bytes) else str(tag)
                                      for tag in self._sent_acked],
                               hand_overs=[(h.request_id, h.fallback, h.reply_to, h.message)
                                           for h in self._sent_hand_overs],
                               noted_as=self.noted_as)
        self._woken = self._clear_wake = False
        return command

    def basic_consume(self, queue: Any, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        """kombu's, noting a consumer that does not acknowledge: the take writes no bookkeeping for its
        jobs (a pidbox reply's, say), which nothing would remove. A channel that consumes a model queue
        takes over the corrections its worker's closed channel left (before its first take)."""
        if no_ack:
            self._no_ack.add(queue)
        else:
            self._no_ack.discard(queue)
        if _model_of(queue) is not None:
            self._take_over_corrections()
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _take_over_corrections(self) -> None:
        """The corrections the worker's previous channel closed without seeing applied (a connection error:
        Celery reconnects with a new channel), sent with this channel's takes under that channel's name and
        batches, so that those its lost take applied are not applied again. Only before this channel's
        first batch: its own batches go under its own name."""
        node = self._node
        if not node or self._batch or self._sent_corrections or node not in _LEFT_BY_CLOSED:
            return
        self._writer, self._batch, left = _LEFT_BY_CLOSED.pop(node)
        for queue, corrections in left.items():
            self._corrections.setdefault(queue, [])[:0] = corrections
        log.debug("took over %d service corrections its worker's closed channel left",
                  sum(map(len, left.values())))

    def _leave_corrections(self) -> None:
        """At close: the corrections not seen applied (a take still out may have run them, or not) are left
        for the worker's next channel (:meth:`_take_over_corrections`); without an owner they are lost, as
        they always were."""
        node = self._node
        left: dict[str, list[Correction]] = {}
        for queue, corrections in (*self._sent_corrections.items(), *self._corrections.items()):
            left.setdefault(queue, []).extend(corrections)
        self._sent_corrections, self._corrections = {}, {}
        if node and any(left.values()):
            _LEFT_BY_CLOSED[node] = (self._writer, self._batch, left)

    def _default_place(self) -> int:
        """Where the default priority's list is among a queue's plain lists (its lists are looked at first)."""
        try:
            return list(self.priority_steps).index(self.priority(DEFAULT_PRIORITY))
        except ValueError:
            return 0

    def _restore_undelivered(self) -> None:
        """A take whose reply was lost (the connection dropped) may have run: its job is in this worker's
        hash but was never delivered. What the hash holds that this channel did not deliver goes back to
        its queue now instead of after the visibility timeout. Only under keys of this worker's own
        (kombu's shared keys hold other consumers' deliveries)."""
        if self.owner is None:
            self._lost_take = False
            return
        try:
            self.settle_deferred()
            # acknowledged deliveries are delivered no more (kombu keeps them until its next append): a job
            # that gave way at its start and was acknowledged may be in the hash again, taken by the lost take
            self.qos._flush()
            acked = {bytes_to_str(t) if isinstance(t, bytes) else str(t) for t in self._acked_out}
            with self.conn_or_acquire() as client:
                for tag in client.hkeys(self.unacked_key):
                    if bytes_to_str(tag) in acked:  # served and acknowledged: its removal is still to go
                        continue
                    if not bytes_to_str(tag).startswith(TIME_MARK) and bytes_to_str(tag) not in self.qos._delivered:
                        self.qos._restore_from(client, tag, self.unacked_key, self.unacked_index_key)
                        log.warning("a job taken as the connection dropped went back to its queue")
        except Exception:  # noqa: BLE001 - Redis still away: tried again before the next take
            log.debug("undelivered jobs not restored yet", exc_info=True)
            return
        self._lost_take = False

    def _corrections_back(self) -> None:
        """A take that failed: the corrections and removals it carried go with the next one (a removal
        that did run is harmless to repeat; corrections keep their batch, which the take applies only if
        the model's tags do not record it applied)."""
        for queue, corrections in self._sent_corrections.items():
            self._corrections.setdefault(queue, [])[:0] = corrections
        self._sent_corrections = {}
        self._acked_out[:0] = self._sent_acked
        self._sent_acked = []

    def _brpop_read(self, **options: Any) -> bool:
        """Read the take's reply (deliver its job) or the bell's (take next).

        The poll counts as answered (``_in_poll`` cleared) once its reply is read, before the job is
        delivered, not after as in kombu: with the solo pool the job runs inside the delivery, and its
        ack sends the next take at once (:meth:`poll_now`) instead of after the delivery returns to the
        event loop. A poll sent so is left standing here (the loop sees it out and sends no other)."""
        taking = self._polling_take
        if taking is None:
            return super()._brpop_read(**options)
        answered = False
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVALSHA" if taking else "BRPOP",
                                                   **options)
            except NoScriptError:  # a new Redis, or SCRIPT FLUSH: load it, the next poll takes
                answered = True
                self._in_poll = None
                self._corrections_back()
                self.hand_overs_alone(sent=True)  # the take did not run
                with self.conn_or_acquire() as client:
                    take_script.load_script(client)
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                self._corrections_back()
                if taking:  # the take may have run: its job would sit in this worker's hash
                    self._lost_take = True
                self.hand_overs_alone(sent=True)  # it may have run them, or not: again
                raise
            except redis.ResponseError as exc:
                answered = True
                self._in_poll = None
                self._corrections_back()
                if not self._sent_hand_overs:
                    raise
                # refused at their HSETNX (a full Redis, a wrong key), or failed after them: again, on their
                # own; the next poll takes without them (a take that fails then raises as any would)
                log.warning("a take carrying %d hand-overs failed (%s): sent on their own",
                            len(self._sent_hand_overs), exc)
                self.hand_overs_alone(sent=True)
                raise Empty() from None
            answered = True
            self._in_poll = None
            self._flush_brpop_reauth()
            if not taking:
                self._take_next = True
                if reply:
                    queue = self._bells.get(bytes_to_str(reply[0]))
                    if queue is not None:  # a bell: its token is this channel's now
                        self._idle_out[queue] = False
                        self._woken = True
                    else:  # a model's wake list (a gateway from before the bells registered a new list)
                        self._clear_wake = True
                raise Empty()
            self._sent_corrections = {}
            self._sent_acked = []
            self._sent_hand_overs = []
            queues = self._poll_queues
            taken = take_script.parse_take(reply)
            if taken is None:  # the take left an idle token for each queue that had none out
                self._take_next = False
                for queue in queues:
                    self._idle_out[queue] = True
                raise Empty()
            for queue in queues:  # the take took back any token out
                self._idle_out[queue] = False
            message = loads(taken.item)
            tag = message.get("properties", {}).get("delivery_tag")
            queue = taken.key.rsplit(self.sep, 1)[0]
            fair = parse_fair_queue(queue)
            if fair is not None:
                self._begin_service(tag, queue, taken.charged_ms, monotonic())
                queue = fair.model_queue
            if taken.booked:
                self._booked.add(tag)
            ticket = self._ticket(tag, fair, taken, message) if fair is not None else None
            self._queue_cycle.rotate(queue)
            # the solo pool runs the job in here: its hand-over rides on the next take, and its start may
            # give way to a fairer job (its ticket)
            with delivering(self), offering(ticket):
                self.connection._deliver(message, queue)
            return True
        finally:
            if not answered:
                self._in_poll = None
                self._flush_brpop_reauth()

    # ---------------------------------------------------------------- fair share

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

    def _ticket(self, tag: Any, fair: FairQueue, taken: take_script.Taken, message: dict[str, Any]) -> Ticket | None:
        """What the job's start needs to give way (``workers/contract/repick.py``): only a fair job booked
        under this worker's own keys, whose charge the take recorded."""
        task_id = (message.get("headers") or {}).get("id")
        if self.owner is None or not taken.booked or not taken.undo or not isinstance(tag, str) \
                or not isinstance(task_id, str):
            return None
        return Ticket(task_id, tag, time_field(tag), self.unacked_key, fair.model_queue[len(_MODEL_PREFIX):],
                      taken.key, taken.item, taken.undo, functools.partial(self._put_back, tag))

    def _put_back(self, tag: Any) -> None:
        """The delivery ``tag`` gave way at its start: no service to correct (its charge was undone), no
        bookkeeping to remove (it went with the job). Nothing ran: a warm-up's place goes to the next job
        taken, the first this process runs."""
        begun = self._in_service.pop(tag, None)
        if begun is not None and begun[3]:
            self._taken -= 1
        self._gave_way.add(tag)

    def gave_way(self, delivery_tag: Any) -> bool:
        """True (once) if the delivery gave way at its start (its ack or reject is Celery's alone)."""
        if delivery_tag in self._gave_way:
            self._gave_way.discard(delivery_tag)
            self._booked.discard(delivery_tag)
            return True
        return False

    def served(self, delivery_tag: Any) -> None:
        """A delivery ended (acked or rejected): its real service time corrects its team's tags in the next
        take, which applies it before it orders the lists."""
        self._booked.discard(delivery_tag)
        begun = self._in_service.pop(delivery_tag, None)
        if begun is None:
            return
        queue, charged_ms, started, warm_up = begun
        fair = parse_fair_queue(queue)
        if fair is None:
            return
        actual_ms = fair_order.NOT_MEASURED if warm_up else (monotonic() - started) * 1000.0
        self._corrections.setdefault(fair.model_queue, []).append((queue, actual_ms, charged_ms, 0))

    # ---------------------------------------------------------------- putting jobs back

    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:
        """kombu's publish (Celery clients: the gateway writes its own), then a ring for an idle worker."""
        super()._put(queue, message, **kwargs)
        with self.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                self._ring(queue, pipe)
                pipe.execute()

    @staticmethod
    def _ring(routing_key: str, pipe: Any) -> None:
        """A job went onto ``routing_key``'s list: the plain lists' hint when it is a plain queue of a
        model, and a ring for an idle worker of its queue (``workers/contract/take.py``)."""
        target = _ring_target(routing_key)
        model = _model_of(routing_key)
        if model is not None:
            pipe.hset(tags_key(model), PLAIN_HINT, 1)
        pipe.rpoplpush(idle_key(target), bell_key(target))

    def _do_restore_message(self, payload: Any, exchange: Any, routing_key: Any, pipe: Any,
                            leftmost: bool = False) -> None:
        """kombu's, and a ring for an idle worker of the job's queue; a job going back to a fair list
        also registers that list again and counts as waiting (the registry may have dropped it meanwhile),
        and puts a token on the model's wake list (for workers from before the take script). It marks no
        taken job for a look again (as a gateway's push does, ``workers/contract/repick.py``): a job taken
        meanwhile does not give way to it (a restore is rare: a worker died, or a job was rejected)."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        if exchange or not routing_key:
            return
        self._ring(routing_key, pipe)
        fair = parse_fair_queue(routing_key)
        if fair is None:
            return
        model = fair.model_queue[len(_MODEL_PREFIX):]
        key = self._q_for_pri(routing_key, self._get_message_priority(payload, reverse=False))
        pipe.zadd(registry_key(model), {key: time()}, gt=True)
        pipe.hdel(tags_key(model), REGISTRY_COPY)  # the takes' copy of the registry: read again
        pipe.hincrby(waiting_key(model), fair.team, 1)
        pipe.lpush(wake_key(model), "1")
        pipe.ltrim(wake_key(model), 0, 63)


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(TRANSPORT_NAME, f"{__name__}:Transport")
