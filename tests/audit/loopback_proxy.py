"""A TCP proxy on loopback in front of the test's PostgreSQL: a slow link, or a server gone silent.

Real sockets both ways, a thread per direction of each session. ``delay_s``
holds each chunk the server sends for that long (every round trip costs at
least that much, as on a link to a server farther away). Sessions opened
while ``silent`` is set are set up, then get no answer: what the client
sends after the server's first ``ReadyForQuery`` never reaches the server
(a server that stopped answering just after a new session started).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class LoopbackProxy:
    def __init__(self, host: str, port: int, *, delay_s: float = 0.0) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.delay_s = delay_s
        self.silent = False
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            set_up = threading.Event()
            pipes = [threading.Thread(target=self._pipe, args=(client, server, set_up if self.silent else None, None),
                                      daemon=True),
                     threading.Thread(target=self._pipe, args=(server, client, None, set_up), daemon=True)]
            self._threads += pipes
            for pipe in pipes:
                pipe.start()

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
