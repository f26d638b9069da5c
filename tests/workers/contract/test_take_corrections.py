"""A take's service corrections are applied once, whatever takes carry them (``workers/contract/take.py``).

An acknowledged fair job's real service time corrects its team's tags in the
next take. A take whose reply is lost may have run, so the channel sends its
corrections again with the next take; before their batch numbers were
recorded in the model's tags (``cb``), that applied them twice: the team was
charged twice for one job's overrun (or credited twice for an underrun) and
the service mean moved twice. A real Redis; the script on its own, then the
real transport channel with the reply of a take that ran lost.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from typing import Any, Iterator

import pytest
import redis as redis_py
from kombu.exceptions import OperationalError

from gateway.dispatch.celery_message import queue_key
from tests.workers.contract.test_kombu_redis import _drain, _fair_model, _fair_push, _forget_model, _until
from workers.contract import kombu_redis as kombu_redis_module
from workers.contract import take as take_script
from workers.contract.celery_config import make_celery
from workers.contract.fair_queues import APPLIED_FIELD, fair_queue, tags_key
from workers.contract.jobs import queue_for
from workers.contract.queue_layout import bell_key, idle_key, queue_keys

NOW = 1_000_000.0


def _tags(client, model: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(tags_key(model)).items()}


def test_a_batch_a_writer_applied_is_not_applied_again(redis_server):
    """The same take sent twice (its reply lost after it ran) applies its corrections once; a newer batch
    with it is applied; another writer's batches are its own; a correction without a batch (0) or a take
    without a writer applies as before. The record keeps each writer's last batch."""
    with _fair_model(redis_server, "kcorr") as (model, client, _connection):
        queue = queue_for(model)
        listed = queue_key(fair_queue(model, "a", "ann"), 5)

        def take(corrections: list, writer: str = "w1") -> tuple[int, float]:
            spec = [take_script.TakeQueue(idle_key(queue), bell_key(queue), queue_keys(queue), model, corrections,
                                          writer=writer)]
            assert take_script.take(client, f"{model}-unacked", None, spec, now=NOW) is None  # nothing queued
            tags = _tags(client, model)
            return int(tags.get("cs", 0)), float(tags.get("t:a", 0))

        assert take([(listed, 10.0, 4.0, 1)]) == (1, 6.0)  # ran 6 ms over its charge
        assert take([(listed, 10.0, 4.0, 1)]) == (1, 6.0)  # sent again: applied already
        assert take([(listed, 10.0, 4.0, 1), (listed, 7.0, 4.0, 2)]) == (2, 9.0)  # only the newer one
        assert take([(listed, 7.0, 4.0, 2)], writer="w2") == (3, 12.0)  # another channel's batch 2
        assert take([(listed, 7.0, 4.0)]) == (4, 15.0)  # no batch: applied
        assert take([(listed, 7.0, 4.0, 1)], writer="") == (5, 18.0)  # no writer: applied
        assert sorted(_tags(client, model)[APPLIED_FIELD].split(" ")) == sorted(["w1", "2", "w2", "2"])
        for worker in range(take_script.MAX_APPLIED + 4):  # the record keeps the latest writers only
            take([(listed, 4.0, 4.0, 1)], writer=f"x{worker}")
        record = _tags(client, model)[APPLIED_FIELD].split(" ")
        assert len(record) == 2 * take_script.MAX_APPLIED and record[-2:] == [f"x{take_script.MAX_APPLIED + 3}", "1"]
        client.delete(f"{model}-unacked")


@contextlib.contextmanager
def _worker_model(redis_server) -> Iterator[tuple[str, Any, Any]]:
    """A fair model of its own, a client and a Celery app as a worker has it (its own node: deliveries
    under its own keys); the model's keys are deleted after."""
    model = f"kcorrlost-{uuid.uuid4().hex[:8]}"
    node = f"corr-worker-{uuid.uuid4().hex[:6]}@test"
    client = redis_py.Redis.from_url(redis_server.url)
    app = make_celery(redis_server.url, owner=node)
    try:
        yield model, client, app
    finally:
        _forget_model(client, model)
        client.close()
        app.close()


def _lose_the_next_reply(channel, monkeypatch) -> None:
    def lost(connection_: Any, *args: Any, **kwargs: Any) -> Any:
        connection_.disconnect()
        raise redis_py.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(channel.client, "parse_response", lost)


def test_a_corrections_take_whose_reply_is_lost_has_them_applied_once_by_the_next_channel(
        redis_server, monkeypatch):
    """Two fair jobs served: the second is measured (the first is the warm-up) and its correction goes with
    the take its ack sends. That take runs (the tags show it), then its reply is lost with its connection.
    Celery then closes the connection and consumes on a new one: the closed channel leaves the correction
    for the worker's next channel, which sends it under the same name and batch with its first take; the
    record says it was applied, so none of it is applied twice (before, a channel that lived on applied it
    again, and a new one never sent it)."""
    with _worker_model(redis_server) as (model, client, app):
        _fair_push(client, model, "a", "ann", 2)
        delivered: list = []
        seen: dict[str, Any] = {}
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            channel.basic_qos(0, 1, False)

            def handle(message) -> None:
                time.sleep(0.02)  # a service of its own: the correction moves the tags
                before = int(_tags(client, model).get("cs", 0))
                message.ack()
                delivered.append(message.delivery_tag)
                if len(delivered) == 2:
                    # the ack's take carries the correction; it runs (cs moves), then its reply is lost
                    assert _until(lambda: int(_tags(client, model).get("cs", 0)) == before + 1)
                    seen["ran"] = _tags(client, model)
                    _lose_the_next_reply(channel, monkeypatch)

            channel.basic_consume(f"model.{model}", no_ack=False, callback=handle, consumer_tag="corr-test")
            _drain(connection, delivered, 2)
            with pytest.raises((redis_py.ConnectionError, OperationalError)):
                connection.drain_events(timeout=1)
            monkeypatch.undo()
            # given back with its batch (the warm-up's correction went with the first take's batch 1)
            assert [number for *_, number in channel._corrections[f"model.{model}"]] == [2]
            writer = channel._writer
        # as Celery after a connection error: the connection closed, the queue consumed on a new one
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            channel.basic_consume(f"model.{model}", no_ack=False, callback=lambda message: None,
                                  consumer_tag="corr-test-2")
            assert channel._writer == writer and [number for *_, number in channel._corrections[f"model.{model}"]] == [2]
            for _ in range(5):  # its first take goes out with the correction, and finds nothing
                if not channel._corrections and not channel._sent_corrections:
                    break
                with contextlib.suppress(socket.timeout):
                    connection.drain_events(timeout=0.5)
            assert not channel._corrections and not channel._sent_corrections
            after = _tags(client, model)
            assert (after["cs"], after["t:a"], after["svc"]) == (seen["ran"]["cs"], seen["ran"]["t:a"],
                                                                 seen["ran"]["svc"])
            assert after[APPLIED_FIELD] == f"{writer} 2"
            channel.basic_cancel("corr-test-2")


def test_a_channel_without_an_owner_leaves_nothing_at_close(redis_server):
    """A channel of a Celery client without a worker's node (no keys of its own) leaves no corrections at
    close: nothing is taken over by whoever opens a channel next."""
    with _fair_model(redis_server, "kcorrnone") as (model, client, connection):
        channel = connection.default_channel
        channel._corrections[f"model.{model}"] = [(f"model.{model}/a/ann", 5.0, 4.0, 0)]
        before = dict(kombu_redis_module._LEFT_BY_CLOSED)
        channel.close()
        assert kombu_redis_module._LEFT_BY_CLOSED == before and channel._corrections == {}
