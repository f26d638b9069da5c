"""``govgate.resp``: the supervisor's small Redis client, against the suite's real Redis."""

from __future__ import annotations

import pytest
import redis

from govgate.redis_server import ping
from govgate.resp import MiniRedis, RedisReplyError, small_client
from tests.conftest import free_port


@pytest.fixture
def full(settings):
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


def test_exists_and_delete_agree_with_redis_py(settings, full):
    mini = MiniRedis(settings.redis_url)
    try:
        full.set("govgate:test:mini", "x" * 5000)
        assert mini.ping()
        assert mini.exists("govgate:test:mini", "govgate:test:none") == 1
        assert mini.command("GET", "govgate:test:mini") == b"x" * 5000  # a bulk reply longer than one read
        assert mini.delete("govgate:test:mini") == 1
        assert not full.exists("govgate:test:mini") and mini.exists("govgate:test:mini") == 0
    finally:
        full.delete("govgate:test:mini")
        mini.close()


def test_the_database_number_in_the_url_is_selected(settings):
    other = settings.redis_url.replace("db=0", "db=5") if "db=0" in settings.redis_url else None
    if other is None:
        pytest.skip(f"the suite's Redis URL has no db=0 to change: {settings.redis_url}")
    in_five = redis.Redis.from_url(other)
    mini = MiniRedis(other)
    try:
        in_five.set("govgate:test:db", 1)
        assert mini.exists("govgate:test:db") == 1
        assert MiniRedis(settings.redis_url).exists("govgate:test:db") == 0
    finally:
        in_five.delete("govgate:test:db")
        in_five.close()
        mini.close()


def test_an_error_reply_is_raised_and_the_connection_is_usable_after(settings):
    mini = MiniRedis(settings.redis_url)
    try:
        with pytest.raises(RedisReplyError, match="unknown command"):
            mini.command("NOSUCHCOMMAND")
        assert mini.ping()
    finally:
        mini.close()


def test_nothing_listening_is_an_os_error_and_ping_says_false():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(OSError):
        MiniRedis(url, timeout_s=1).ping()
    assert ping(url) is False


def test_tls_urls_go_to_redis_py():
    assert not isinstance(small_client("rediss://127.0.0.1:1/0"), MiniRedis)
