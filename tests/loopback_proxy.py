"""Proxies on loopback in front of a test's server: a slow link, a server gone silent, a reply lost.

Real sockets both ways, a thread per direction of each session. :class:`Relay`
accepts on a loopback port and connects each session to the server; what
flows each way is the subclass's:

- :class:`LoopbackProxy` (PostgreSQL over TCP): ``delay_s`` holds each chunk
  the server sends for that long (every round trip costs at least that much,
  as on a link to a server farther away). Sessions opened while ``silent`` is
  set are set up, then get no answer: what the client sends after the
  server's first ``ReadyForQuery`` never reaches the server (a server that
  stopped answering just after a new session started).
- :class:`ReplyDropper` (Redis over its unix socket): once armed, forwards
  the first command whose bytes hold a marker and then, instead of passing
  Redis's next answer on, closes the client's connection: Redis ran the
  command, the client lost its reply (a dropped connection). The client
  sends one command at a time (redis-py reads each reply before its next
  command), so what Redis sends after that command is its reply.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Callable


class Relay:
    """Accept on loopback; connect each session with ``connect``; :meth:`_pipes` says what flows."""

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self._connect = connect
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = self._connect()
            self._sockets += [client, server]
            pipes = [threading.Thread(target=target, args=args, daemon=True)
                     for target, args in self._pipes(client, server)]
            self._threads += pipes
            for pipe in pipes:
                pipe.start()

    def _pipes(self, client: socket.socket, server: socket.socket) -> list[tuple[Callable[..., None], tuple]]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop, and wait for its threads (a thread left over would keep ``audit verify`` from forking)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)


class LoopbackProxy(Relay):
    def __init__(self, host: str, port: int, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.silent = False
        super().__init__(lambda: _tcp((host, port)))

    def _pipes(self, client: socket.socket, server: socket.socket) -> list[tuple[Callable[..., None], tuple]]:
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_up = threading.Event()
        return [(self._pipe, (client, server, set_up if self.silent else None, None)),
                (self._pipe, (server, client, None, set_up))]

    def _pipe(self, source: socket.socket, sink: socket.socket, hold_after: threading.Event | None,
              set_up: threading.Event | None) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if hold_after is not None and hold_after.is_set():
                    continue  # the session is set up: nothing more reaches the server
                if set_up is not None and self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(chunk)
                if set_up is not None and b"Z\x00\x00\x00\x05" in chunk:  # ReadyForQuery: the session is set up
                    set_up.set()


class ReplyDropper(Relay):
    def __init__(self, socket_path: str, marker: bytes) -> None:
        self._marker = marker
        self.armed, self.dropped, self._dropping = True, False, False
        super().__init__(lambda: _unix(socket_path))

    def _pipes(self, client: socket.socket, server: socket.socket) -> list[tuple[Callable[..., None], tuple]]:
        return [(self._requests, (client, server)), (self._replies, (server, client))]

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                if self.armed and self._marker in chunk:
                    self.armed, self._dropping = False, True
                server.sendall(chunk)

    def _replies(self, server: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                if self._dropping:
                    self._dropping, self.dropped = False, True
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    server.close()
                    return
                client.sendall(chunk)


def _tcp(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address)


def _unix(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX)
    server.connect(path)
    return server
