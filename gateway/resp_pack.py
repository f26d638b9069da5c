"""Packing Redis commands for the gateway's async client with less CPU than redis-py's generic packer.

Every admitted request sends a few commands whose arguments are plain
strings and integers (two usage scripts with about twenty keys and
arguments each, one LPUSH). redis-py packs each argument through its
``Encoder`` (several ``isinstance`` checks) and grows the buffer one join at a
time; profiled under load that was the largest single item of the
gateway's own CPU. :func:`fast_packing` gives a pool's connections a
packer that writes the same bytes in one pass, and hands anything it does
not handle (other types, large values, multi-word command names, a
non-UTF-8 client) to redis-py's packer unchanged.
``tests/gateway/test_resp_pack.py`` holds the bytes equal to redis-py's.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool


class FastPackMixin:
    """``pack_command`` in one pass for str, bytes and int arguments; anything else as redis-py does it."""

    def pack_command(self, *args: Any) -> list[bytes]:
        fallback = super().pack_command  # type: ignore[misc]
        encoder = self.encoder  # type: ignore[attr-defined]
        if encoder.encoding != "utf-8" or encoder.encoding_errors != "strict":
            return fallback(*args)
        name = args[0] if args else None
        if type(name) is not str or " " in name:
            return fallback(*args)
        cutoff = self._buffer_cutoff  # type: ignore[attr-defined]
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is str:
                data = arg.encode()
            elif kind is bytes:
                data = arg
            elif kind is int:
                data = b"%d" % arg
            else:  # bool (refused by redis-py), float, memoryview, bytearray, …
                return fallback(*args)
            if len(data) > cutoff:  # redis-py sends large values without copying them
                return fallback(*args)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return [b"".join(parts)]


_MIXED: dict[tuple[type, type], type] = {}


def mixed_in(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` in front: one subclass per pair, made once; ``cls`` itself if it has it.

    The pool makes its connections from the class it holds, so each behaviour the gateway adds to
    redis-py's connections (this packer, ``gateway/resp_send.py``'s immediate write) is a mixin put in
    front of whatever class the pool was given (TCP or Unix socket)."""
    if issubclass(cls, mixin):
        return cls
    key = (mixin, cls)
    if key not in _MIXED:
        _MIXED[key] = type(f"{mixin.__name__.removesuffix('Mixin')}{cls.__name__}", (mixin, cls), {})
    return _MIXED[key]


def fast_connection_class(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with :class:`FastPackMixin`'s packer (one subclass per class)."""
    return mixed_in(FastPackMixin, cls)


def fast_packing(pool: ConnectionPool) -> ConnectionPool:
    """Make the connections ``pool`` opens from now on pack with :class:`FastPackMixin`; returns ``pool``."""
    pool.connection_class = fast_connection_class(pool.connection_class)
    return pool
