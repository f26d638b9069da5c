"""The broker transport reuses one redis-py client per channel (``workers/contract/kombu_redis.py``)."""

from __future__ import annotations

import pytest

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
            channel.queue_declare(queue)
            channel.basic_publish(channel.prepare_message("x"), "", queue)
            message = channel.basic_get(queue, no_ack=False)
            assert message is not None
            assert first.zcard(channel.unacked_index_key) >= 1
            message.ack()
            assert first.hget(channel.unacked_key, message.delivery_tag) is None
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
            channel.queue_declare(queue)
            channel.basic_publish(channel.prepare_message("x"), "", queue)
            channel.basic_publish(channel.prepare_message("y"), "", queue)
            with channel.conn_or_acquire() as client:
                client.ping()
            probe.start()
            acked = channel.basic_get(queue, no_ack=False)
            acked.ack()
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
