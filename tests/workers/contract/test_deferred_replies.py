"""Commands whose replies are read later (``workers/contract/deferred_replies.py``), against a real Redis."""

from __future__ import annotations

import os
import signal

import pytest
import redis as redis_py
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.own_redis import doomed_redis  # noqa: F401 - fixture
from workers.contract.deferred_replies import DeferredReplies


def _collector(into: list, name: str):
    return lambda reply: into.append((name, reply))


def test_replies_reach_their_handlers_in_order_and_an_error_reply_is_one_of_them(redis_server):
    pool = redis_py.ConnectionPool.from_url(redis_server.url)
    replies: list = []
    deferred = DeferredReplies()
    try:
        deferred.send(pool, [("SET", "dr:k", "1"), ("INCR", "dr:k")], [_collector(replies, "set"),
                                                                     _collector(replies, "incr")])
        deferred.send(pool, [("LPUSH", "dr:k", "x"), ("GET", "dr:k")], [_collector(replies, "lpush"),
                                                                      _collector(replies, "get")])
        assert deferred.outstanding == 4 and replies == []
        deferred.settle()
        assert [name for name, _ in replies] == ["set", "incr", "lpush", "get"]
        assert replies[0][1] == b"OK" and replies[1][1] == 2 and replies[3][1] == b"2"
        assert isinstance(replies[2][1], ResponseError) and "WRONGTYPE" in str(replies[2][1])
        assert deferred.outstanding == 0
        assert not pool._in_use_connections  # the connection went back to its pool, clean
        assert redis_py.Redis(connection_pool=pool).get("dr:k") == b"2"
    finally:
        redis_py.Redis(connection_pool=pool).delete("dr:k")
        pool.disconnect()


def test_a_handler_that_fails_does_not_keep_the_others_from_their_replies(redis_server):
    pool = redis_py.ConnectionPool.from_url(redis_server.url)
    replies: list = []

    def broken(reply) -> None:
        raise RuntimeError("a bug in a handler")

    deferred = DeferredReplies()
    try:
        deferred.send(pool, [("PING",), ("ECHO", "after")], [broken, _collector(replies, "echo")])
        deferred.settle()
        assert replies == [("echo", b"after")]
    finally:
        pool.disconnect()


def test_sending_on_a_new_pool_first_settles_what_went_out_on_the_old(redis_server):
    """kombu replaces its pool when it reconnects: the replies owed on the old pool's connection are read
    (and handed over) before anything goes out on the new one."""
    old, new = (redis_py.ConnectionPool.from_url(redis_server.url) for _ in range(2))
    replies: list = []
    deferred = DeferredReplies()
    try:
        deferred.send(old, [("ECHO", "old")], [_collector(replies, "old")])
        deferred.send(new, [("ECHO", "new")], [_collector(replies, "new")])
        assert replies == [("old", b"old")] and deferred.outstanding == 1
        assert not old._in_use_connections
        deferred.settle()
        assert replies == [("old", b"old"), ("new", b"new")]
    finally:
        old.disconnect()
        new.disconnect()


def test_a_redis_that_dies_before_replying_hands_every_handler_the_error(doomed_redis):
    """Redis is stopped (SIGSTOP) with commands in flight, then killed: settling never raises, each handler
    hears a connection error instead of its reply, and the connection is not handed out again."""
    pool = redis_py.ConnectionPool.from_url(doomed_redis.url)
    replies: list = []
    deferred = DeferredReplies()
    try:
        deferred.send(pool, [("PING",)], [_collector(replies, "warm")])
        deferred.settle()
        os.kill(doomed_redis.process.pid, signal.SIGSTOP)
        deferred.send(pool, [("SET", "dr:x", "1"), ("GET", "dr:x")], [_collector(replies, "set"),
                                                                    _collector(replies, "get")])
        os.kill(doomed_redis.process.pid, signal.SIGKILL)
        doomed_redis.process.wait(timeout=10)
        deferred.settle()
        assert replies[0] == ("warm", b"PONG")
        assert [name for name, _ in replies[1:]] == ["set", "get"]
        assert all(isinstance(reply, RedisConnectionError) for _, reply in replies[1:]), replies
        assert deferred.outstanding == 0 and not pool._in_use_connections
        # the next send finds no Redis: it raises, and nothing stays outstanding for it
        with pytest.raises(RedisConnectionError):
            deferred.send(pool, [("PING",)], [_collector(replies, "late")])
        assert deferred.outstanding == 0 and replies[-1][0] == "get"
    finally:
        pool.disconnect()
