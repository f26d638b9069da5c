"""The gateway's Redis packer writes exactly the bytes redis-py's would."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from gateway.resp_pack import FastPackMixin, fast_connection_class, fast_packing

CASES = [
    ("EVALSHA", "a" * 40, 3, "k1", "k:é:ü", b"\x00\xffraw", 0, -7, 12345678901234567890, "", b""),
    ("LPUSH", "queue", '{"body": "x"}'),
    ("CONFIG GET", "maxmemory"),  # a multi-word name: split by redis-py's packer
    ("SET", "k", 1.5),  # a float: redis-py's repr
    ("SET", "k", memoryview(b"view")),
    ("SET", "k", bytearray(b"array")),
    ("SET", "big", "x" * 10_000),  # over the buffer cutoff: sent in pieces
    (b"PING",),
]


def _pair(cls: type = Connection) -> tuple[Connection, Connection]:
    return cls(), fast_connection_class(cls)()


@pytest.mark.parametrize("args", CASES)
def test_same_bytes_as_redis_py(args: tuple) -> None:
    plain, fast = _pair()
    assert isinstance(fast, FastPackMixin)
    assert b"".join(bytes(p) for p in fast.pack_command(*args)) == \
        b"".join(bytes(p) for p in plain.pack_command(*args))


def test_bool_is_refused_as_redis_py_refuses_it() -> None:
    _, fast = _pair()
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", True)


def test_other_encodings_use_redis_py_packer() -> None:
    plain = Connection(encoding="latin-1")
    fast = fast_connection_class(Connection)(encoding="latin-1")
    assert b"".join(fast.pack_command("SET", "k", "é")) == b"".join(plain.pack_command("SET", "k", "é"))


def test_fast_packing_covers_unix_socket_pools_and_is_idempotent() -> None:
    pool = fast_packing(aioredis.BlockingConnectionPool.from_url("unix:///tmp/none.sock"))
    assert issubclass(pool.connection_class, UnixDomainSocketConnection)
    assert issubclass(pool.connection_class, FastPackMixin)
    again = fast_packing(pool)
    assert again.connection_class is pool.connection_class
    asyncio.run(pool.disconnect())
