"""``bench/_commandstats.py`` against a real Redis of the test's own.

Two facts the overhead bench's "Redis commands per request" rests on: the
probe adds nothing to the count it takes, and a command a Lua script runs is
counted under its own name besides the ``EVAL``/``EVALSHA`` that ran it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis

from bench._commandstats import CommandProbe, command_diff
from govgate.redis_server import RedisProcess


def test_the_diff_drops_the_probes_own_info_and_unchanged_commands() -> None:
    assert command_diff({"get": 5, "info": 1, "set": 2}, {"get": 9, "info": 3, "set": 2, "evalsha": 1}) == \
        {"get": 4, "evalsha": 1}


def test_the_probe_counts_nothing_of_its_own_and_counts_commands_inside_scripts(
        short_tmp: Callable[[str], Path]) -> None:
    server = RedisProcess.start(short_tmp("gg-cs-") / "redis", persist=False)
    try:
        probe = CommandProbe(server.url)
        probe.start()
        assert probe.stop() == {}
        client = redis.Redis.from_url(server.url)
        client.ping()  # the client's own connection set-up happens before the window
        sha = client.script_load("redis.call('incr', KEYS[1]); redis.call('incr', KEYS[1]); "
                                 "redis.call('expire', KEYS[1], 10); return 1")
        probe.start()
        client.evalsha(sha, 1, "k")
        counted = probe.stop()
        client.close()
    finally:
        server.stop()
    assert counted == {"incr": 2, "evalsha": 1, "expire": 1}
