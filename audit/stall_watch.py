"""A watchdog that cuts a kept connection whose server stops answering, so an append fails closed in bounded time.

A PostgreSQL server that is frozen (its processes stopped) or cut off by a
partition that drops packets never answers, but its kernel (or nobody)
never resets the TCP connection either: a thread inside an append waits in
libpq's ``recv`` without end, and every other append of the process waits
behind it. ``lock_timeout`` (the busy timeout) bounds only lock waits a
*running* server measures; libpq has no per-call timeout, and keepalives or
``tcp_user_timeout`` do not fire while the peer's kernel still ACKs.

So one thread per process watches the transactions the kept connections
(:mod:`audit.kept_connection`) are running. A transaction still running
:data:`GRACE_S` after its connection's busy timeout (counted from its
start, or from the last entry of a batch the server answered:
:meth:`audit.kept_connection.KeptConnection.answered`) has got no answer
within that bound (a lock wait PostgreSQL ends at the busy timeout has
answered by then, as a lock timeout): the watchdog shuts the connection's
socket down (``shutdown(2)`` on a duplicate of its descriptor, which wakes
the blocked ``recv`` with end-of-file). The waiting thread then sees a lost
connection, which the kept connection already handles: dropped, the
transaction failed closed and never retried (its commit may have reached
the server: the chain head is read inside every transaction, so an entry
that did commit is simply the next append's predecessor, and a terminal
entry retried later meets the unique constraint), the next transaction on
a new connection. When the server answers again, appends succeed again.

The engine's pooled PostgreSQL connections (key look-ups, terminal
look-ups, the checkpointer, the pool's own pre-ping) are watched the same
way, one round trip at a time (:mod:`audit.answer_watch`). A thread that
means to wait for the server without limit (a migration queued behind
another's, a ``VACUUM``) says so with :func:`patient`.

Nothing here imports SQLAlchemy; a connection without a socket (SQLite) is
never watched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Final, Iterator, Protocol

log = logging.getLogger(__name__)

#: Beyond the busy timeout, so a lock wait the server itself ends is reported as such, not as a stall.
GRACE_S: Final = 1.0
#: The longest the watchdog sleeps with nothing due (it then looks again at what is running).
_IDLE_S: Final = 1.0


class Watched(Protocol):
    """What the watchdog reads of a kept connection."""

    def stall_due(self) -> float | None:
        """The monotonic time its running transaction stalls at, or None (none running, or no socket)."""

    def cut_if_stalled(self, due: float) -> None:
        """Shut the socket down if the transaction that was due at ``due`` is still running."""


_WATCHED: "weakref.WeakSet[Watched]" = weakref.WeakSet()
_LOCK = threading.Lock()
_thread: threading.Thread | None = None
#: The watchdog is looking at what runs (not asleep): it may be writing a log line or starting a probe.
_looking = False
#: Per thread: how many :func:`patient` blocks it is inside.
_PATIENCE = threading.local()


@contextmanager
def patient() -> Iterator[None]:
    """Round trips this thread starts inside the block are not cut, however long the server takes.

    For waits that are long by design, not a server that stopped answering:
    a migration queued behind another's (``lock_timeout`` 0), the migration's
    DDL, a ``VACUUM``. Only :mod:`audit.answer_watch`'s round trips ask; a
    kept connection's transaction is bounded whatever the thread says.
    """
    _PATIENCE.depth = getattr(_PATIENCE, "depth", 0) + 1
    try:
        yield
    finally:
        _PATIENCE.depth -= 1


def is_patient() -> bool:
    """Whether this thread is inside a :func:`patient` block."""
    return getattr(_PATIENCE, "depth", 0) > 0


def fork_is_safe() -> bool:
    """Whether the calling thread may fork: no thread runs in this process but the caller and the watchdog.

    A forked child keeps only the forking thread, and one that another
    thread left holding a lock hangs on it. The watchdog holds none a child
    needs: it reads the watched connections' times without locking, this
    module's lock is made anew in the child (:func:`_forget_after_fork`,
    where the watchdog also starts afresh when the child watches a
    connection), and :mod:`logging` renews its locks after a fork. Only
    while it sleeps, though: in the middle of a look it may be writing a
    log line (a stream's own lock, which nothing renews: a child would hang
    on it, at the latest flushing stderr on its way out) or starting a
    probe's thread, so a look under way makes it unsafe; one that starts
    after this answer finds nothing due (no other thread is waiting for the
    server). Any other thread (a probe of :mod:`audit.answer_watch`, a
    caller's own) makes it unsafe. Until 2026-12-02 ``govgate audit verify --jobs`` on
    PostgreSQL, whose connections start the watchdog, spawned its workers
    for it: about 0.7 s of CPU each importing SQLAlchemy anew.
    """
    current = threading.current_thread()
    watchdog = _thread
    return not _looking and all(thread is current or thread is watchdog for thread in threading.enumerate())


def watch(kept: Watched) -> None:
    """Watch ``kept`` from now on (the watchdog thread starts on first use, again in a forked child)."""
    global _thread
    with _LOCK:
        _WATCHED.add(kept)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="govgate-audit-stall-watch", daemon=True)
            _thread.start()


def _loop() -> None:
    global _looking
    while True:
        _looking = True
        try:
            now = time.monotonic()
            wake = now + _IDLE_S
            with _LOCK:  # watch() adds from other threads: iterating the set meanwhile raised, ending this thread
                watched = list(_WATCHED)
            for kept in watched:
                try:
                    due = kept.stall_due()
                    if due is None:
                        continue
                    if due <= now:
                        kept.cut_if_stalled(due)
                    else:
                        wake = min(wake, due)
                except Exception:  # noqa: BLE001 - one connection's failure must not end every bound
                    log.exception("the audit stall watch failed on a connection")
        finally:
            _looking = False
        time.sleep(max(0.0, wake - time.monotonic()))


def _forget_after_fork() -> None:
    global _thread, _LOCK, _looking
    _LOCK = threading.Lock()
    _thread = None  # the parent's thread does not exist in the child
    _looking = False


os.register_at_fork(after_in_child=_forget_after_fork)
