"""The embedded Redis keeps its append-only file small and its durability settings (real redis-server)."""

from __future__ import annotations

import redis

from govgate.redis_server import AOF_REWRITE_MIN_SIZE, PACKED_ENTRIES, RedisProcess


def test_a_persistent_embedded_redis_rewrites_its_append_only_file_early(tmp_path):
    server = RedisProcess.start(tmp_path / "redis", persist=True)
    client = redis.Redis.from_url(server.url)
    try:
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["auto-aof-rewrite-min-size"]) == int(AOF_REWRITE_MIN_SIZE.removesuffix("mb")) * 1024 * 1024
        assert config["auto-aof-rewrite-percentage"] == "100"
        assert config["aof-use-rdb-preamble"] == "yes"
        # usage counters in hash tables, not scanned lists (Redis 6 names; Redis 7 answers both)
        assert config["hash-max-ziplist-entries"] == config["zset-max-ziplist-entries"] == PACKED_ENTRIES
    finally:
        client.close()
        server.stop()
