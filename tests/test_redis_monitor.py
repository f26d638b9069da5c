"""``tests/redis_monitor.py`` against a real Redis: it counts a test's own commands, not a stranger's."""

from __future__ import annotations

import threading
import time

import redis

from tests.redis_monitor import CommandLog


def test_the_log_counts_only_commands_naming_the_given_keys_and_reads_up_to_its_end(redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url)
    stranger = redis.Redis.from_url(redis_server.url)
    stop = threading.Event()

    def hand_overs() -> None:  # another process's commands of the same kinds, all the while
        while not stop.is_set():
            stranger.hsetnx("monitor-test:pending", "someone-else", b"x")
            stranger.hdel("monitor-test:pending", "someone-else")

    busy = threading.Thread(target=hand_overs)
    busy.start()
    try:
        with CommandLog(redis_server.url) as log:
            client.hsetnx("monitor-test:pending", "mine", b"a value with spaces")
            client.blpop(["monitor-test:verdict:mine"], timeout=0.01)
            deadline = time.monotonic() + 60
            while log.count("hsetnx", "monitor-test:pending", "someone-else") < 3:  # the stranger at work
                assert time.monotonic() < deadline, "the stranger's commands never showed"
                time.sleep(0.01)
            client.hdel("monitor-test:pending", "mine")  # the last command before the block ends: still read
    finally:
        stop.set()
        busy.join()
        client.close()
        stranger.close()
    assert log.count("hsetnx", "monitor-test:pending", "mine") == 1
    assert log.count("blpop", "monitor-test:verdict:mine") == 1
    assert log.count("hdel", "monitor-test:pending", "mine") == 1
    assert log.count("hsetnx", "monitor-test:pending") > 3  # the stranger's were seen, and not counted above
    assert log.naming("mine") == 3 and log.naming("nobody") == 0
