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
