"""The files the CLI writes (``--out FILE``): there whole, or not at all.

Why: an export, a bundle or a public key found under the name an operator
gave is taken for what it says it is, and handed on as complete. A file cut
short (a database failing on a later page, a full disk, Ctrl-C, the SIGTERM
of a job scheduler's time limit or of ``docker stop``) must never stand under
that name, nor may a half-written copy of prompts and outputs stay beside it.
So the file is written under a temporary name in the same folder (the same
filesystem, so the rename is atomic), synced, and renamed over ``FILE`` only
once whole; on any failure it is removed and ``FILE`` is left as it was.

SIGTERM and SIGHUP end a Python process without running any cleanup, so
while a file is being written they raise :class:`Terminated` instead (exit
status 128 + the signal's number, as a shell reports a process the signal
ended); Ctrl-C is already an exception (``KeyboardInterrupt``). A signal the
process was started ignoring (``nohup``) stays ignored. Only SIGKILL (or a
crash of the machine) can leave ``FILE.partial-…`` behind: nothing runs then.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterator

from workers.atomic_file import fsync_dir

#: The signals whose default action ends the process without cleanup, caught while a file is written.
CAUGHT = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """A SIGTERM or SIGHUP arrived while a file was being written: unwind (removing it), then exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def signals_unwind() -> Iterator[list[int]]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` (in the main thread only, where
    Python runs signal handlers); the handlers found are put back at the end.

    Yields the signals received, in order. Python runs a handler at the next bytecode of the main thread,
    which may be inside a finalizer (``__del__``, a weakref callback, run by the garbage collector at any
    allocation) or a callback from C: an exception raised there is printed ("Exception ignored in …") and
    dropped, and the block goes on as if no signal came. The list lets the block's owner see it anyway.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def _raise_terminated(signum: int, _frame: Any) -> None:
        received.append(signum)
        raise Terminated(signum)

    previous = {}
    for signum in CAUGHT:
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


#: Bytes of ``FILE``'s name kept in its temporary file's name: with ``.partial-`` and eight hex digits it stays
#: within the 255 bytes a file name may have (a longer ``FILE`` is a valid --out; its temporary name was not).
_NAME_KEPT = 255 - len(".partial-") - 8


def _cut(name: str) -> str:
    """``name`` cut to :data:`_NAME_KEPT` bytes (a character cut in two stays bytes: a POSIX name is bytes)."""
    return os.fsdecode(os.fsencode(name)[:_NAME_KEPT])


@contextlib.contextmanager
def output_file(path: str | Path, *, private: bool, text: bool = False) -> Iterator[IO[Any]]:
    """``path`` opened for writing, replaced whole when the block ends cleanly, untouched otherwise.

    ``private``: made readable by its owner only (0600), for files holding
    audit entries; else the umask's mode. A ``path`` that exists and is not a
    regular file (``/dev/stdout``, a named pipe) is written directly: there
    is nothing to rename, and its reader sees the stream as it comes. A
    symlink is followed: the file it names is replaced, the link stays.
    """
    target = Path(os.path.realpath(path))  # a symlink's file is replaced, not the link (an in-place write's way)
    mode = "w" if text else "wb"
    encoding = "utf-8" if text else None
    with signals_unwind() as received:
        if target.exists() and not target.is_file():
            with open(target, mode, encoding=encoding) as handle:
                yield handle
            return
        temporary = target.with_name(f"{_cut(target.name)}.partial-{secrets.token_hex(4)}")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
            with os.fdopen(fd, mode, encoding=encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            if received:  # its Terminated was dropped where it was raised (a finalizer): stopped all the same
                raise Terminated(received[0])
            os.replace(temporary, target)
        except BaseException as exc:
            temporary.unlink(missing_ok=True)
            if isinstance(exc, Terminated):
                print(f"{signal.Signals(exc.signum).name}: stopped; {path} not written", file=sys.stderr)
            raise
        fsync_dir(target.parent)  # the rename itself durable: a crash right after must not bring the old file back

