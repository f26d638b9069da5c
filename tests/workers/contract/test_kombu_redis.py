"""The broker transport reuses one redis-py client per channel (``workers/contract/kombu_redis.py``)."""

from __future__ import annotations

import contextlib

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest

from tests.own_redis import module_redis_server  # noqa: F401  (fixture: commands are counted server-wide)
from workers.contract.celery_config import celery_redis_url, make_celery
from workers.contract.kombu_redis import Channel


@pytest.mark.parametrize("url", ["unix:///tmp/gg.sock?db=2", "redis://127.0.0.1:6390/3"])
def test_the_broker_url_names_the_transport_and_keeps_the_address(url):
    app = make_celery(url)
    try:
        with app.connection_for_write() as connection:
            transport = connection.transport
            assert type(transport).Channel is Channel
            if url.startswith("unix"):
                assert celery_redis_url(url) == "govgate-redis+socket:///tmp/gg.sock?virtual_host=2"
            else:
                assert (connection.hostname, connection.port, connection.virtual_host) == ("127.0.0.1", 6390, "3")
    finally:
        app.close()


def test_tls_urls_stay_on_kombus_own_transport():
    assert celery_redis_url("rediss://h:1/0") == "rediss://h:1/0"


def _declared_with(channel, queue: str, *bodies: str) -> None:
    """``queue`` declared on ``channel`` and a message published on it per body (plain, not fair)."""
    channel.queue_declare(queue)
    for body in bodies:
        channel.basic_publish(channel.prepare_message(body), "", queue)


def test_a_channel_hands_out_one_client_and_acks_through_it(redis_server):
    app = make_celery(redis_server.url)
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second
                assert first.ping()
            given = object()
            with channel.conn_or_acquire(given) as passed:
                assert passed is given
            # A message published, fetched and acked over the channel: the unacked index empties again.
            queue = "model.kombu-test"
            _declared_with(channel, queue, "x")
            message = channel.basic_get(queue, no_ack=False)
            assert message is not None
            assert first.zcard(channel.unacked_index_key) >= 1
            message.ack()
            # the removal is sent, its replies not read: the next BRPOP need not wait for them
            assert channel._deferred.outstanding == 2
            channel.settle_deferred()
            assert first.hget(channel.unacked_key, message.delivery_tag) is None
            assert first.zscore(channel.unacked_index_key, message.delivery_tag) is None
            channel.queue_delete(queue)
    finally:
        app.close()


def test_the_unacked_bookkeeping_is_four_commands_and_an_unacked_delivery_is_still_restored(redis_server):
    """Payload and index entry are written and removed without MULTI/EXEC, and a delivery
    nobody acked past the visibility timeout goes back to its queue (what crash redelivery rests on)."""
    import redis as redis_py

    from bench._commandstats import CommandProbe

    app = make_celery(redis_server.url)
    probe = CommandProbe(redis_server.url)
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            queue = "model.kombu-bookkeeping"
            _declared_with(channel, queue, "x", "y")
            with channel.conn_or_acquire() as client:
                client.ping()
            probe.start()
            acked = channel.basic_get(queue, no_ack=False)
            acked.ack()
            channel.settle_deferred()  # Redis has run the ack's removal
            spent = probe.stop()
            # the fetch itself, then HSET+ZADD at delivery and HDEL+ZREM at the ack
            assert {k: v for k, v in spent.items() if k in ("hset", "zadd", "hdel", "zrem", "multi", "exec")} == \
                {"hset": 1, "zadd": 1, "hdel": 1, "zrem": 1}
            lost = channel.basic_get(queue, no_ack=False)  # delivered, never acked: its worker "died"
            client = redis_py.Redis.from_url(redis_server.url)
            assert client.llen(queue) == 0
            assert client.hget(channel.unacked_key, lost.delivery_tag) is not None
            client.zadd(channel.unacked_index_key, {lost.delivery_tag: 1})  # delivered long ago
            channel.qos.restore_visible(num=10, interval=1)
            assert client.llen(queue) == 1
            assert client.hget(channel.unacked_key, lost.delivery_tag) is None
            assert client.zscore(channel.unacked_index_key, lost.delivery_tag) is None
            client.close()
            channel.queue_delete(queue)
    finally:
        app.close()


def _fair_push(client, model: str, team: str, principal: str, n: int, *, priority: int = 5) -> str:
    """A gateway's fair push, done by hand: the task message on the team's list, the list registered."""
    import time

    from gateway.dispatch.celery_message import task_message
    from workers.contract.fair_queues import fair_queue, registry_key, waiting_key

    queue = fair_queue(model, team, principal)
    for i in range(n):
        key, message = task_message("govgate.noop", f"{team}-{i}", [], queue=queue, priority=priority,
                                    argsrepr="()")
        client.lpush(key, message)
    client.zadd(registry_key(model), {key: time.time()})
    client.hincrby(waiting_key(model), team, n)
    return key


def _forget_model(client, model: str) -> None:
    """Delete every key a fair test of ``model`` made: its lists and the fair-share state."""
    from workers.contract.fair_queues import registry_key, tags_key, waiting_key, wake_key

    client.delete(*client.keys(f"model.{model}*"), registry_key(model), tags_key(model), waiting_key(model),
                  wake_key(model))


def _drain(connection, delivered: list, count: int) -> None:
    import socket

    for _ in range(count * 4):
        if len(delivered) >= count:
            return
        try:
            connection.drain_events(timeout=2)
        except socket.timeout:
            pass


@contextmanager
def _fair_model(redis_server, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """A model name of its own, a client of the suite's Redis and a Celery connection; every key of the
    model is deleted after."""
    import uuid

    import redis as redis_py

    model = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client = redis_py.Redis.from_url(redis_server.url)
    app = make_celery(redis_server.url)
    try:
        with app.connection_for_write() as connection:
            yield model, client, connection
    finally:
        _forget_model(client, model)
        client.close()
        app.close()


@contextlib.contextmanager
def _fetched_one(redis_server, queue: str) -> Iterator[tuple[Any, Any, Any]]:
    """A client of the suite's Redis, a Celery channel and one delivery of ``queue`` (one job declared on
    it), fetched with ``basic_get`` (nothing consumed, so no take goes out at its ack) and booked."""
    import redis as redis_py

    app = make_celery(redis_server.url)
    client = redis_py.Redis.from_url(redis_server.url)
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            _declared_with(channel, queue, "x")
            message = channel.basic_get(queue, no_ack=False)
            channel.settle_deferred()
            yield client, channel, message
            channel.queue_delete(queue)
    finally:
        client.close()
        app.close()


def _consume(connection, model: str, count: int, handle: Callable[[Any, list], None]) -> list:
    """Consume ``model.<model>`` until ``count`` deliveries, then cancel: ``handle(message, delivered)``
    appends what it was given to ``delivered`` and acks or not."""
    delivered: list = []
    channel = connection.default_channel
    channel.basic_consume(f"model.{model}", no_ack=False, callback=lambda message: handle(message, delivered),
                          consumer_tag="consume-test")
    _drain(connection, delivered, count)
    channel.basic_cancel("consume-test")
    return delivered


def _acked(message, delivered: list) -> None:
    delivered.append(message.delivery_info["routing_key"])
    message.ack()


def test_the_channel_takes_fair_lists_in_fair_order_and_delivers_to_the_model_queue(redis_server):
    """The consumer of ``model.<name>`` gets the fair lists' jobs, teams alternating though one queued first;
    acks feed the real service time back (``svc``) and the waiting counts go down."""
    import time

    from workers.contract.fair_queues import tags_key, waiting_key, wake_key

    def handle(message, delivered: list) -> None:
        time.sleep(0.01)  # every job takes about as long: the measured times keep the teams even
        _acked(message, delivered)

    with _fair_model(redis_server, "kfair") as (model, client, connection):
        _fair_push(client, model, "a", "ann", 6)
        _fair_push(client, model, "b", "ben", 3)
        delivered = _consume(connection, model, 9, handle)
        assert {key.rsplit("/", 2)[0] for key in delivered} == {f"model.{model}"}
        teams = [key.split("/")[1] for key in delivered]
        # one list each would serve a's six first; fair share brings b in at once and ends it first
        assert "b" in teams[:3] and len(teams) - teams[::-1].index("b") < len(teams), teams
        # each ack's correction went with the next take: the mean service time is known
        assert client.hget(tags_key(model), "svc") is not None
        assert not client.hgetall(waiting_key(model))
        assert client.llen(wake_key(model)) == 0


def test_a_rejected_fair_job_goes_back_to_its_own_list_and_is_registered_again(redis_server):
    """Redelivery in fair mode: the restore puts the message back on its fair list (its routing key),
    registers the list again even if the registry dropped it, counts it as waiting and wakes a worker."""
    from workers.contract.fair_queues import registry_key, waiting_key, wake_key

    with _fair_model(redis_server, "kfair") as (model, client, connection):
        key = _fair_push(client, model, "a", "ann", 1, priority=3)
        delivered: list = []
        channel = connection.default_channel
        channel.basic_consume(f"model.{model}", no_ack=False, callback=delivered.append, consumer_tag="fair-test")
        _drain(connection, delivered, 1)
        assert len(delivered) == 1 and client.llen(key) == 0
        assert not client.hgetall(waiting_key(model))
        client.delete(registry_key(model))  # as if pruned while the job ran
        delivered[0].reject(requeue=True)
        assert client.llen(key) == 1
        assert client.zrange(registry_key(model), 0, -1) == [key.encode()]
        assert client.hgetall(waiting_key(model)) == {b"a": b"1"}
        assert client.llen(wake_key(model)) == 1
        _drain(connection, delivered, 2)  # taken again, from its own list
        assert len(delivered) == 2 and delivered[1].delivery_info["routing_key"] == key.rsplit(":", 1)[0]
        assert delivered[1].headers["redelivered"] is True
        delivered[1].ack()
        channel.basic_cancel("fair-test")


def test_plain_jobs_come_first_and_cost_no_fair_ordering_each(redis_server):
    """A mixed fleet during a rollout: jobs a fifo gateway queued (the model's plain lists) and fair ones are
    both served, the plain ones first; with no fair list registered a take reads only the tags hash, where
    its copy of the registry is empty (no registry after the first, no shares), so a worker with nothing
    registered pays no fair-share ordering per job."""
    from bench._commandstats import CommandProbe
    from gateway.dispatch.celery_message import task_message

    def plain(client, model: str, name: str, count: int, priority: int) -> None:
        for i in range(count):
            key, message = task_message("govgate.noop", f"{name}-{i}", [], queue=f"model.{model}",
                                        priority=priority, argsrepr="()")
            client.lpush(key, message)

    probe = CommandProbe(redis_server.url)
    with _fair_model(redis_server, "kplain") as (model, client, connection):
        plain(client, model, "plain", 20, 5)
        delivered: list = []
        channel = connection.default_channel
        channel.basic_consume(f"model.{model}", no_ack=False, callback=lambda m: _acked(m, delivered),
                              consumer_tag="plain-test")
        probe.start()
        _drain(connection, delivered, 20)
        spent = probe.stop()
        assert delivered == [f"model.{model}"] * 20
        # one take a job (and a last one that found nothing), none of them ordering fair lists
        assert 20 <= spent.get("evalsha", 0) <= 22 and not spent.get("hmget"), spent
        assert spent.get("hgetall", 0) <= spent["evalsha"] and spent.get("zrange", 0) <= 1, spent
        assert not spent.get("brpop", 0) or spent["brpop"] <= 2, spent  # only once idle, on the bell
        _fair_push(client, model, "a", "ann", 2)
        plain(client, model, "late-plain", 2, 9)
        _drain(connection, delivered, 24)
        channel.basic_cancel("plain-test")
        # the plain lists come first in the take, even a plain job of the lowest priority
        assert [key.count("/") for key in delivered[20:]] == [0, 0, 2, 2], delivered[20:]


def test_a_take_refused_for_a_missing_script_loses_no_job(redis_server):
    """Redis lost the take script (SCRIPT FLUSH, a restarted Redis): the take is answered NOSCRIPT before it
    ran, so no job moved; the channel loads the script and the next poll takes the job."""
    with _fair_model(redis_server, "knoscript") as (model, client, connection):
        _fair_push(client, model, "a", "ann", 1)
        delivered = _consume(connection, model, 1, _acked)
        assert len(delivered) == 1
        client.script_flush()
        key = _fair_push(client, model, "a", "ann", 1)
        delivered = _consume(connection, model, 1, _acked)
        assert len(delivered) == 1 and client.llen(key) == 0
        channel = connection.default_channel
        channel.settle_deferred()
        assert client.hlen(channel.unacked_key) == 0


def _until(condition: Callable[[], bool]) -> bool:
    """``condition()`` once it holds, or its last answer after a few seconds (Redis answers another client)."""
    import time

    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_job_arrives_with_its_bookkeeping_and_charge_already_in_redis(redis_server):
    """The take moved the job into the unacked hash and charged it in the same script: when the consumer
    gets the job, Redis already holds both; the ack's removal and its service time go with the next take,
    which the ack sends at once: no reply is left outstanding on the side."""
    import time

    from workers.contract.fair_queues import tags_key, waiting_key

    with _fair_model(redis_server, "kdefer") as (model, client, connection):
        channel = connection.default_channel
        seen: list = []
        carried: list = []

        def handle(message, delivered: list) -> None:
            seen.append((channel._deferred.outstanding, client.hget(channel.unacked_key, message.delivery_tag)
                         is not None, client.zscore(channel.unacked_index_key, message.delivery_tag) is not None,
                         int(client.hget(waiting_key(model), "a") or 0)))
            time.sleep(0.02)
            _acked(message, delivered)
            # no removal of its own: the take the ack sent carries it
            carried.append((channel._deferred.outstanding, message.delivery_tag in channel._sent_acked))

        _fair_push(client, model, "a", "ann", 3)
        _consume(connection, model, 3, handle)
        assert carried == [(0, True)] * 3, carried
        # the last ack's take is out (its reply unread); Redis ran its removal all the same
        assert _until(lambda: client.hlen(channel.unacked_key) == 0 and client.zcard(channel.unacked_index_key) == 0)
        assert seen == [(0, True, True, 2), (0, True, True, 1), (0, True, True, 0)], seen
        # the second job was measured (the first is the pool's warm-up) and corrected in the third's take
        assert 5.0 < float(client.hget(tags_key(model), "svc")) < 1000.0


def test_a_killed_deferred_connection_loses_no_job(redis_server):
    """The connection that carried an ack's removal is killed (CLIENT KILL) while its replies are unread:
    what was sent was applied, the next ack's removal goes out on a new connection, and the next job is
    taken. An ack sends its removal on that connection when no take carries it (here: deliveries
    fetched with ``basic_get``, nothing consumed). (A Redis that dies before replying:
    test_deferred_replies.py.)"""
    queue = "model.kombu-kill"
    with _fair_model(redis_server, "kkill") as (model, client, connection):
        channel = connection.default_channel
        _declared_with(channel, queue, "one", "two", "three")
        held = [channel.basic_get(queue, no_ack=False) for _ in range(3)]
        assert [message.body for message in held] == [b"one", b"two", b"three"] and client.llen(queue) == 0
        for number, message in enumerate(held):
            message.ack()
            if number == 0:
                # the deferred connection is the one whose last command was the first ack's ZREM
                ids = [c["id"] for c in client.client_list() if c["cmd"] == "zrem"]
                assert len(ids) == 1 and channel._deferred.outstanding == 2
                assert client.client_kill_filter(_id=ids[0]) == 1
        channel.settle_deferred()
        assert client.hlen(channel.unacked_key) == 0 and client.zcard(channel.unacked_index_key) == 0
        channel.queue_delete(queue)


def test_an_acks_removal_in_a_take_refused_for_a_missing_script_goes_with_the_next_take(redis_server):
    """The take an ack sent carries that delivery's removal; Redis lost the script (SCRIPT FLUSH) and
    refused the take before it ran: the removal is not lost, the next take (after the script is loaded)
    carries it, and the bookkeeping is gone."""
    with _fair_model(redis_server, "krefused") as (model, client, connection):
        channel = connection.default_channel
        flushed: list = []

        def handle(message, delivered: list) -> None:
            if not flushed:
                client.script_flush()  # the take this ack sends is refused
                flushed.append(message.delivery_tag)
            _acked(message, delivered)

        _fair_push(client, model, "a", "ann", 2)
        delivered = _consume(connection, model, 2, handle)
        assert len(delivered) == 2
        assert _until(lambda: client.hget(channel.unacked_key, flushed[0]) is None)
        assert client.zscore(channel.unacked_index_key, flushed[0]) is None
        assert _until(lambda: client.hlen(channel.unacked_key) == 0 and client.zcard(channel.unacked_index_key) == 0)


def test_an_ack_whose_removal_cannot_be_sent_removes_the_bookkeeping_on_the_shared_client(redis_server, monkeypatch):
    """The ack's removal goes out on the deferred connection; when that send fails, the ack falls back to
    the shared client and the delivery's bookkeeping is still removed before the ack returns."""
    import redis as redis_py

    with _fetched_one(redis_server, "model.kombu-ack-fallback") as (client, channel, message):
        assert client.hget(channel.unacked_key, message.delivery_tag) is not None
        real_send = channel.send_deferred
        refused: list = []

        def send_deferred(commands, handlers):
            if commands[0][0] == "HDEL":
                refused.append(commands)
                raise redis_py.ConnectionError("the deferred connection is gone")
            return real_send(commands, handlers)

        monkeypatch.setattr(channel, "send_deferred", send_deferred)
        message.ack()
        assert refused and channel._deferred.outstanding == 0  # nothing left unread: done synchronously
        assert client.hget(channel.unacked_key, message.delivery_tag) is None
        assert client.zscore(channel.unacked_index_key, message.delivery_tag) is None


def test_an_ack_sends_the_next_brpop_at_once_and_only_one(redis_server):
    """With one delivery held at prefetch 1 no BRPOP is out; its ack sends the next one at once (not at
    the event loop's next poll), a BRPOP already out is not doubled, and a channel that stopped consuming
    sends none."""
    with _fair_model(redis_server, "kpoll") as (model, client, connection):
        channel = connection.default_channel
        queue = f"model.{model}"
        _declared_with(channel, queue, "one", "two", "three")
        channel.basic_qos(0, 1, False)  # as the worker: one job at a time
        held: list = []
        channel.basic_consume(queue, no_ack=False, callback=held.append, consumer_tag="poll-test")
        _drain(connection, held, 1)
        assert len(held) == 1 and not channel._in_poll  # no credit: nothing asked for
        sent: list = []
        real_start = channel._brpop_start

        def brpop_start(*args: Any, **kwargs: Any) -> None:
            sent.append(args)
            real_start(*args, **kwargs)

        channel._brpop_start = brpop_start
        held[0].ack()
        assert len(sent) == 1 and channel._in_poll  # the ack sent it
        _drain(connection, held, 2)  # the poll reads that BRPOP's reply and sends no other before it
        assert [message.body for message in held[:2]] == [b"one", b"two"] and len(sent) == 1
        channel.basic_cancel("poll-test")
        held[1].ack()
        assert len(sent) == 1 and not channel._in_poll  # not consuming any more: nothing sent
        channel.queue_delete(queue)


def test_an_ack_inside_its_delivery_sends_the_next_brpop_at_once_and_only_one(redis_server):
    """The solo pool runs the job inside its delivery, so it is acked there: that ack sends the next BRPOP
    at once, the BRPOP stays out when the delivery returns, and the poll sends no second one."""
    with _fair_model(redis_server, "kpollin") as (model, client, connection):
        channel = connection.default_channel
        queue = f"model.{model}"
        _declared_with(channel, queue, "one", "two", "three")
        channel.basic_qos(0, 1, False)
        sent: list = []
        real_start = channel._brpop_start

        def brpop_start(*args: Any, **kwargs: Any) -> None:
            sent.append(len(delivered))
            real_start(*args, **kwargs)

        delivered: list = []
        sent_by_ack: list = []

        def run_and_ack(message) -> None:  # as the solo pool: the job and its ack inside the delivery
            delivered.append(message.body)
            before = len(sent)
            message.ack()
            sent_by_ack.append(len(sent) - before)

        channel._brpop_start = brpop_start
        channel.basic_consume(queue, no_ack=False, callback=run_and_ack, consumer_tag="poll-in-test")
        _drain(connection, delivered, 3)
        channel.basic_cancel("poll-in-test")
        assert delivered == [b"one", b"two", b"three"]
        assert sent_by_ack == [1, 1, 1]  # each ack sent the next BRPOP from inside its delivery
        # and the poll sent none besides: the first BRPOP, then one per ack
        assert sent == [0, 1, 2, 3] and channel._in_poll
        channel.queue_delete(queue)


def test_in_fair_mode_the_plain_lists_are_looked_at_while_their_hint_is_set(redis_server):
    """The take skips a model's plain lists (one EXISTS a job saved) unless the hint in its tags hash says
    they may hold a job; a take that finds them empty clears it, and the once-a-second recount looks at them
    anyway (a gateway from before the hint)."""
    import time

    from gateway.dispatch.celery_message import task_message
    from workers.contract import take as take_script
    from workers.contract.fair_queues import PLAIN_HINT, tags_key
    from workers.contract.queue_layout import bell_key, idle_key, queue_keys

    with _fair_model(redis_server, "khint") as (model, client, connection):
        plain = f"model.{model}"
        spec = [take_script.TakeQueue(idle_key(plain), bell_key(plain), queue_keys(plain), model)]

        def take(now: float):
            return take_script.take(client, "hint-unacked", "hint-unacked-index", spec, default_place=5, now=now)

        try:
            _fair_push(client, model, "a", "ann", 2)
            key, message = task_message("govgate.noop", "plain-1", [], queue=plain, priority=9, argsrepr="()")
            client.lpush(key, message)  # as an old fifo gateway: no hint
            now = time.time()
            client.hset(tags_key(model), "rc", now)  # the recount just ran
            assert take(now).key.count("/") == 2  # the plain job is not looked for
            client.hset(tags_key(model), PLAIN_HINT, 1)  # as a fifo gateway's push sets it
            assert take(now).key == key
            assert take(now).key.count("/") == 2 and client.hget(tags_key(model), PLAIN_HINT) == b"0"
            client.lpush(key, message)  # no hint again: the recount, a second later, finds it
            assert take(now + 1.5).key == key
        finally:
            client.delete("hint-unacked", "hint-unacked-index", idle_key(plain), bell_key(plain))


def test_a_consumer_that_does_not_acknowledge_gets_its_jobs_without_bookkeeping(redis_server):
    """A no-ack consumer (a Celery client reading a control reply, `celery inspect`, a ping) never acks, so
    the take must not book what it takes for it: the entry would stay in the unacked hash and be put back
    on the reply queue by the visibility timeout."""
    with _fair_model(redis_server, "knoack") as (model, client, connection):
        channel = connection.default_channel
        queue = f"model.{model}"
        _declared_with(channel, queue, "reply")
        got: list = []
        channel.basic_consume(queue, no_ack=True, callback=got.append, consumer_tag="noack-test")
        _drain(connection, got, 1)
        channel.basic_cancel("noack-test")
        assert [message.body for message in got] == [b"reply"]
        assert client.hlen(channel.unacked_key) == 0 and client.zcard(channel.unacked_index_key) == 0
        assert not channel._booked


def test_a_client_reading_a_reply_queue_leaves_no_idle_token_behind(redis_server):
    """Only model queues are taken with the take script: a Celery client waiting on its reply queue (a
    ping, `celery inspect`, a new queue per client) BRPOPs it as kombu does, so no idle token or bell is
    left in Redis for each short-lived client; a worker's channel that goes away while idle takes its
    token back."""
    import socket

    from workers.contract.queue_layout import bell_key, idle_key

    with _fair_model(redis_server, "kreply") as (model, client, connection):
        channel = connection.default_channel
        reply = f"{model}.reply.celery.pidbox"
        channel.queue_declare(reply)
        channel.basic_consume(reply, no_ack=True, callback=lambda message: None, consumer_tag="reply-test")
        try:
            connection.drain_events(timeout=0.3)
        except socket.timeout:
            pass
        channel.basic_cancel("reply-test")
        assert not client.exists(idle_key(reply), bell_key(reply))
        queue = f"model.{model}"
        channel.queue_declare(queue)
        channel.basic_consume(queue, no_ack=False, callback=lambda message: None, consumer_tag="idle-test")
        for _ in range(10):  # the take finds nothing: an idle token, then the bell
            try:
                connection.drain_events(timeout=0.3)
            except socket.timeout:
                pass
            if client.llen(idle_key(queue)):
                break
        assert client.llen(idle_key(queue)) == 1
        channel.close()
        assert not client.exists(idle_key(queue))
