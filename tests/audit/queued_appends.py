"""Appends of several threads queued behind a transaction this process holds open, for the group commit's tests.

The appender writes what queued while a transaction ran in the next one
(``audit/appender.py``, group commit). To build such a batch a test holds
the store's writer, starts a leader (its entry taken, it waits for the
writer) and then one thread per append, each waited for until it is queued,
so the batch holds them in the order added; leaving the block lets the
writer go and waits for every thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from audit import AuditStore
from audit.writer import writer_for

#: How long a test waits for a thread's append to queue, or to end, before failing rather than hanging.
GIVE_UP_S = 30


class QueuedAppends:
    """``append(store, kind, request_id, **kwargs)`` on a thread per entry, queued behind a held writer;
    ``results`` maps each name (the leader's is ``"leader"``) to its entry or the exception it raised."""

    def __init__(self, store: AuditStore, append: Callable[..., Any], leader: tuple[str, str] = ("request", "leader")
                 ) -> None:
        self.store = store
        self._append = append
        self._leader = leader
        self.appender = store._appender()
        self.writer = writer_for(store.engine)
        self.results: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> "QueuedAppends":
        assert self.writer._lock.acquire()  # a transaction of this process is running
        kind, request_id = self._leader
        self._start("leader", kind, request_id)  # takes its own entry, then waits for the writer
        self._until(lambda: self.appender._leader is not None and not self.appender._queue)
        return self

    def add(self, name: str, kind: str, request_id: str, **kwargs: Any) -> None:
        """Start an append and wait until it is queued (behind those added before it)."""
        queued = len(self.appender._queue)
        self._start(name, kind, request_id, **kwargs)
        self._until(lambda: len(self.appender._queue) == queued + 1)

    def __exit__(self, *exc: object) -> None:
        self.writer._lock.release()
        for thread in self.threads:
            thread.join(GIVE_UP_S * 2)
        assert not any(thread.is_alive() for thread in self.threads)

    def _start(self, name: str, kind: str, request_id: str, **kwargs: Any) -> None:
        def run() -> None:
            try:
                self.results[name] = self._append(self.store, kind, request_id, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                self.results[name] = exc

        thread = threading.Thread(target=run)
        self.threads.append(thread)
        thread.start()

    @staticmethod
    def _until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + GIVE_UP_S
        while not condition():
            assert time.monotonic() < deadline, "the appends never queued"
            time.sleep(0.001)
