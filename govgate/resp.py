"""A minimal Redis client for the supervisor: PING, EXISTS and DEL, nothing else.

Why not redis-py: importing it (8.x pulls in asyncio, its parsers and
observability hooks) costs about 16 MB of resident memory, and the
supervisor of ``govgate up`` keeps whatever it imports for the life of the
stack while it only asks "is Redis up?" and "has this worker loaded its
model?". This speaks RESP over a unix socket or TCP, with the password and
database from the URL. A ``rediss://`` (TLS) URL is handed to redis-py.
"""

from __future__ import annotations

import socket
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit


class RedisReplyError(OSError):
    """Redis answered with an error (``-ERR …``), or the connection broke mid-reply."""


class SmallClient(Protocol):
    def ping(self) -> bool: ...
    def exists(self, *keys: str) -> int: ...
    def delete(self, *keys: str) -> int: ...
    def close(self) -> None: ...


class MiniRedis:
    """One connection, opened on first use and again after a failure."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("unix", "redis"):
            raise ValueError(f"MiniRedis speaks unix:// and redis:// only, not {parts.scheme}://")
        query = parse_qs(parts.query)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._address = (parts.hostname or "localhost", parts.port or 6379)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            self._password = self._password or (query.get("password") or [None])[0]
            db = (query.get("db") or ["0"])[0]
        else:
            db = parts.path.strip("/") or (query.get("db") or ["0"])[0]
        self._db = int(db or 0)
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def ping(self) -> bool:
        return self.command("PING") == "PONG"

    def exists(self, *keys: str) -> int:
        return int(self.command("EXISTS", *keys))

    def delete(self, *keys: str) -> int:
        return int(self.command("DEL", *keys))

    def command(self, *args: str) -> object:
        """Send one command and read its reply; a broken connection is closed and the error raised."""
        try:
            if self._sock is None:
                self._connect()
            return self._roundtrip(args)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buffer = None, b""

    def _connect(self) -> None:
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = self._unix
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in self._address[0] else socket.AF_INET, socket.SOCK_STREAM)
            target = self._address
        sock.settimeout(self._timeout_s)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        if self._password is not None:
            self._roundtrip(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            self._roundtrip(("SELECT", str(self._db)))

    def _roundtrip(self, args: tuple[str, ...]) -> object:
        encoded = [arg.encode() for arg in args]
        self._sock.sendall(b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in encoded))
        return self._reply()

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise RedisReplyError("Redis closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) < size + 2:
                chunk = self._sock.recv(max(4096, size + 2 - len(self._buffer)))
                if not chunk:
                    raise RedisReplyError("Redis closed the connection")
                self._buffer += chunk
            value, self._buffer = self._buffer[:size], self._buffer[size + 2:]
            return value
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise RedisReplyError(f"unexpected reply from Redis: {line[:40]!r}")


def client_errors(client: SmallClient) -> tuple[type[BaseException], ...]:
    """What ``client``'s commands raise when Redis refuses one or the connection fails: :class:`MiniRedis`
    raises ``OSError`` (its :class:`RedisReplyError` included), redis-py its own ``RedisError``."""
    if isinstance(client, MiniRedis):
        return (OSError,)
    import redis

    return (OSError, redis.exceptions.RedisError)


def small_client(url: str, timeout_s: float = 5.0) -> SmallClient:
    """:class:`MiniRedis` for ``unix://`` and ``redis://``; redis-py for anything else (TLS)."""
    if urlsplit(url).scheme in ("unix", "redis"):
        return MiniRedis(url, timeout_s)
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
