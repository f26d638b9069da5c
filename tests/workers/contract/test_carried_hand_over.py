"""The solo pool's hand-over rides on the take the ack sends (``workers/contract/handover.py``).

A real Redis and the real transport channel; the job's side is played by the
test: inside a delivery it leaves a hand-over with the channel, as
``workers/streams.py`` does, whose ``alone`` only records that it was asked
(what ``alone`` does then, the job's output handed over on its own or recorded
unchecked, is tested with a real model and store in
``tests/workers/test_output_verdict.py``). Each failure of the take that
carries it (refused by a full Redis, its reply lost with its connection, Redis
killed) must have ``alone`` asked exactly once; a take that ran it must not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import redis as redis_py
from kombu.exceptions import OperationalError

from govgate.redis_server import RedisProcess
from tests.own_redis import module_redis_server  # noqa: F401  (fixture: a Redis of this module's own)
from tests.reply_listener import Listener
from tests.workers.contract.test_kombu_redis import _declared_with, _fair_model, _fetched_one, _until
from workers.contract import handover
from workers.contract.celery_config import make_celery
from workers.contract.handover import PENDING_KEY, CarriedHandOver


def _hand_over(listener: Listener, asked: list, *, report: bytes = b"report",
               when_alone: Callable[[], Any] = lambda: None) -> CarriedHandOver:
    request_id = uuid.uuid4().hex

    def alone() -> None:
        asked.append((request_id, when_alone()))

    return CarriedHandOver(request_id, b"fallback of " + request_id.encode(), listener.channel, report, alone)


def _consume_one(connection, queue: str, handle: Callable[[Any], None]) -> None:
    """Consume ``queue`` at prefetch 1 (as the solo worker) until one delivery was handled (the consumer
    stays)."""
    channel = connection.default_channel
    channel.basic_qos(0, 1, False)
    handled: list = []

    def run(message) -> None:
        handle(message)
        handled.append(message)

    channel.basic_consume(queue, no_ack=False, callback=run, consumer_tag="carry-test")
    deadline = time.monotonic() + 10
    while not handled and time.monotonic() < deadline:
        try:
            connection.drain_events(timeout=1)
        except socket.timeout:
            pass
    assert handled


def _drain_once(connection) -> BaseException | None:
    """One turn of the event loop (the take's reply read); what it raised."""
    try:
        connection.drain_events(timeout=1)
    except socket.timeout:
        return None
    except Exception as exc:  # noqa: BLE001 - the test looks at what the transport raised
        return exc
    return None


@contextlib.contextmanager
def _carrying(redis_server, prefix: str, *bodies: str) -> Iterator[SimpleNamespace]:
    """A fair model of its own with ``bodies`` queued, its channel and queue, a reply-channel listener and
    the list ``alone`` records into (``client``, ``connection``, ``channel``, ``queue``, ``listener``,
    ``asked``); the listener is closed after."""
    with _fair_model(redis_server, prefix) as (model, client, connection):
        channel = connection.default_channel
        queue = f"model.{model}"
        _declared_with(channel, queue, *bodies)
        listener = Listener(client)
        try:
            yield SimpleNamespace(client=client, connection=connection, channel=channel, queue=queue,
                                  listener=listener, asked=[])
        finally:
            listener.close()


def test_a_hand_over_rides_on_the_acks_take_and_runs_before_its_removal(redis_server):
    """Left with the channel inside its delivery, the hand-over goes with the take the ack sends: the
    fallback kept (never over one already kept) and the report published, by that one script; nothing is
    sent on its own. Outside a delivery no channel carries anything."""
    assert handover.current() is None
    with _carrying(redis_server, "kcarry", "one") as carrying:
        client, connection, channel, queue = carrying.client, carrying.connection, carrying.channel, carrying.queue
        listener, asked = carrying.listener, carrying.asked
        fresh, kept = _hand_over(listener, asked), _hand_over(listener, asked, report=b"second")
        client.hset(PENDING_KEY, kept.request_id, b"kept before")
        seen: list = []

        def handle(message) -> None:
            seen.append(handover.current() is channel)
            channel.carry(fresh)
            channel.carry(kept)
            message.ack()
            seen.append([h.request_id for h in channel._sent_hand_overs])  # on the take the ack sent

        try:
            _consume_one(connection, queue, handle)
            assert _drain_once(connection) is None  # the take's reply: nothing taken
            assert seen == [True, [fresh.request_id, kept.request_id]]
            assert listener.heard() == [b"report", b"second"]
            assert client.hget(PENDING_KEY, fresh.request_id) == fresh.fallback
            assert client.hget(PENDING_KEY, kept.request_id) == b"kept before"
            assert asked == [] and channel._sent_hand_overs == [] and channel._hand_overs_out == []
            assert _until(lambda: client.hlen(channel.unacked_key) == 0)
            assert handover.current() is None
        finally:
            client.hdel(PENDING_KEY, fresh.request_id, kept.request_id)
            channel.basic_cancel("carry-test")


def test_an_ack_that_sends_no_take_hands_over_on_its_own_before_the_removal(redis_server):
    """A delivery fetched with ``basic_get`` (nothing consumed, so no take goes out at the ack): the ack
    sends the hand-over on its own, and only then removes the bookkeeping."""
    with _fetched_one(redis_server, "model.kombu-carry-get") as (client, channel, message):
        listener = Listener(client)
        asked: list = []
        tag = message.delivery_tag
        channel.carry(_hand_over(listener, asked,
                                 when_alone=lambda: client.hget(channel.unacked_key, tag) is not None))
        message.ack()
        assert [booked for _, booked in asked] == [True]  # asked once, before the removal went
        channel.settle_deferred()
        assert client.hget(channel.unacked_key, tag) is None and channel._hand_overs_out == []
        listener.close()


def test_a_take_a_full_redis_refuses_runs_none_of_it_and_the_hand_over_goes_on_its_own(redis_server):
    """Redis refuses writes (maxmemory under noeviction) when the ack's take carries a hand-over: its
    ``HSETNX`` is the script's first write, so nothing of the take ran (no fallback, no report); the
    hand-over is sent on its own, once (here only recorded), the consumer goes on (not an error of its
    own), and the next take carries the removal and takes the next job."""
    with _carrying(redis_server, "kfull", "one", "two") as carrying:
        client, connection, channel, queue = carrying.client, carrying.connection, carrying.channel, carrying.queue
        listener, asked = carrying.listener, carrying.asked
        hand_over = _hand_over(listener, asked)
        tags: list = []

        def handle(message) -> None:
            tags.append(message.delivery_tag)
            if len(tags) == 1:
                channel.carry(hand_over)
                client.config_set("maxmemory", "1")
            message.ack()

        try:
            _consume_one(connection, queue, handle)
            raised = _drain_once(connection)
            client.config_set("maxmemory", "0")
            assert raised is None  # not the consumer's failure: the next poll takes without it
            assert [request_id for request_id, _ in asked] == [hand_over.request_id]
            assert listener.heard() == [] and client.hget(PENDING_KEY, hand_over.request_id) is None
            assert channel._sent_hand_overs == [] and channel._hand_overs_out == []
            for _ in range(10):  # the next poll takes the second job, carrying the first one's removal
                if len(tags) == 2:
                    break
                _drain_once(connection)
            assert len(tags) == 2 and len(asked) == 1
            assert _until(lambda: client.hget(channel.unacked_key, tags[0]) is None)
        finally:
            client.config_set("maxmemory", "0")
            channel.basic_cancel("carry-test")


def test_a_take_whose_reply_is_lost_has_its_hand_over_sent_again(redis_server, monkeypatch):
    """The take ran (the fallback is kept, the report heard), then its reply was lost with its connection
    (the read fails, as when the connection drops between the two): the channel cannot tell it ran, so
    the hand-over is sent on its own once more (a gateway records the first report it hears; the
    fallback's ``HSETNX`` changes nothing)."""
    with _carrying(redis_server, "klost", "one") as carrying:
        client, connection, channel, queue = carrying.client, carrying.connection, carrying.channel, carrying.queue
        listener, asked = carrying.listener, carrying.asked
        hand_over = _hand_over(listener, asked)

        def lost(connection_: Any, *args: Any, **kwargs: Any) -> Any:
            connection_.disconnect()
            raise redis_py.ConnectionError("Connection closed by server.")

        def handle(message) -> None:
            channel.carry(hand_over)
            message.ack()
            assert _until(lambda: client.hget(PENDING_KEY, hand_over.request_id) is not None)  # it ran
            monkeypatch.setattr(channel.client, "parse_response", lost)

        try:
            _consume_one(connection, queue, handle)
            raised = _drain_once(connection)
            assert isinstance(raised, (redis_py.ConnectionError, OperationalError)), raised
            assert [request_id for request_id, _ in asked] == [hand_over.request_id]
            assert listener.heard() == [b"report"]  # the take's; alone here only records that it was asked
            assert channel._sent_hand_overs == []
        finally:
            client.hdel(PENDING_KEY, hand_over.request_id)


def test_a_take_out_when_redis_dies_has_its_hand_over_sent_on_its_own(tmp_path):
    """Redis is killed with the ack's take unanswered (stopped first, so the take cannot have run): its
    reply never comes, so the hand-over is sent on its own (``alone``, which ends the request itself when
    that is refused too)."""
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-ch-"))
    server = RedisProcess.start(redis_dir, persist=False)
    app = make_celery(server.url)
    client = redis_py.Redis.from_url(server.url)
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            queue = f"model.kdead-{uuid.uuid4().hex[:6]}"
            _declared_with(channel, queue, "one")
            listener = Listener(client)
            asked: list = []
            hand_over = _hand_over(listener, asked)

            def handle(message) -> None:
                channel.carry(hand_over)
                listener.close()
                os.kill(server.process.pid, signal.SIGSTOP)  # the take is sent, never run
                message.ack()
                assert channel._sent_hand_overs == [hand_over]
                os.kill(server.process.pid, signal.SIGKILL)
                server.process.wait(timeout=10)

            _consume_one(connection, queue, handle)
            raised = _drain_once(connection)
            assert raised is not None
            assert [request_id for request_id, _ in asked] == [hand_over.request_id]
            assert channel._sent_hand_overs == [] and channel._hand_overs_out == []
    finally:
        client.close()
        app.close()
        server.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
