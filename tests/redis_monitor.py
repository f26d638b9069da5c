"""The commands a Redis runs while a test's block runs, with their keys: for counting one request's own.

Why not ``INFO commandstats``: its counters are server-wide, and on the
session's shared Redis other processes add to them (the session's worker,
a worker or gateway an earlier test left finishing, an owner record written
at a worker's start), so a test asserting "no HSETNX" or "exactly one" could
fail for another's command, or pass with one of its own missing and a
stranger's in its place. ``MONITOR`` streams every command as it runs, with
its arguments: a test counts those naming its own keys (a request id), which
no other test's process can send.

The log ends at a marker (an ``ECHO`` of a random token) sent after the
block, so every command the server ran before the block ended has been read.
"""

from __future__ import annotations

import threading
import uuid
from types import TracebackType
from typing import Any

import redis

#: Longest wait for the monitor to start, or to read up to the marker.
WAIT_S = 60.0


class CommandLog:
    """``with CommandLog(url) as log: …``, then ``log.count("hsetnx", key, field)``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.commands: list[list[str]] = []
        #: The commands clients sent (``commands`` less those run inside scripts), in order.
        self.sent: list[list[str]] = []
        self._marker = f"command-log-end-{uuid.uuid4().hex}"
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="redis-monitor", daemon=True)

    def __enter__(self) -> "CommandLog":
        self._thread.start()
        assert self._started.wait(WAIT_S), "MONITOR never started"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.echo(self._marker)
        finally:
            client.close()
        self._thread.join(WAIT_S)
        if exc_type is None:
            assert not self._thread.is_alive(), "MONITOR never showed the end marker"
            if self._error is not None:
                raise self._error

    def _read(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            with client.monitor() as monitor:
                self._started.set()
                while True:
                    command = monitor.next_command()
                    if command is None:
                        continue
                    words = command["command"].split(" ")
                    if words[:2] == ["ECHO", self._marker] or words[:2] == ["echo", self._marker]:
                        return
                    self.commands.append([words[0].lower(), *words[1:]])
                    if command["client_type"] != "lua":
                        self.sent.append(self.commands[-1])
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            self._error = exc
            self._started.set()
        finally:
            client.close()

    def count(self, name: str, *args: Any) -> int:
        """Calls of command ``name`` whose first arguments are ``args`` (a key, a field)."""
        wanted = [str(a) for a in args]
        return sum(1 for words in self.commands if words[0] == name.lower() and words[1:1 + len(wanted)] == wanted)

    def naming(self, text: str) -> int:
        """Calls with an argument holding ``text`` (a request id in a key, a field or a channel)."""
        return sum(1 for words in self.commands if any(text in word for word in words[1:]))
