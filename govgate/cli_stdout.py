"""Standard output for the operator's commands: a write that fails is one line and its own exit status.

Why: ``govgate audit verify >> log`` from cron on a full disk ended in an
``OSError`` traceback with exit status 1, which ``verify`` uses for
tampering; with standard output closed (``>&-``) the commands printed into
nothing and exited 0, and ``audit export`` crashed on ``sys.stdout`` being
None (h11 #4). :func:`guard_stdout` puts a writer in front of file
descriptor 1 that turns a failed write into :class:`OutputError`: ``Error:
cannot write to standard output: <why>`` on standard error, exit status
:data:`EXIT_OUTPUT` (sysexits' ``EX_IOERR``). A broken pipe (``| head``)
stays what it was: Click's quiet exit 1.

Only ``keys``, ``audit`` and ``policy`` are guarded: ``up``, ``serve`` and
``worker`` print to a terminal or a service's journal, not results.
"""

from __future__ import annotations

import errno
import io
import os
import sys

import click

#: The exit status of a command whose standard output could not be written (``EX_IOERR`` in sysexits.h).
EXIT_OUTPUT = 74


class OutputError(click.ClickException):
    """Standard output cannot take what the command prints: one line on standard error, exit 74."""

    exit_code = EXIT_OUTPUT

    def __init__(self, why: str) -> None:
        super().__init__(f"cannot write to standard output: {why}")


class _GuardedOut(io.RawIOBase):
    """File descriptor 1 (None: it was closed when the command started), its write failures as OutputError."""

    def __init__(self, fd: int | None) -> None:
        super().__init__()
        self._fd = fd
        self._failed = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self._failed:  # said once; what is still buffered is dropped (the exit's flush would say it again)
            return len(data)
        try:
            if self._fd is None:
                raise OutputError("it is closed")
            return os.write(self._fd, data)
        except BrokenPipeError:
            raise  # `| head`: Click exits 1 quietly, as before
        except OSError as exc:
            self._failed = True
            raise OutputError(exc.strerror or str(exc)) from None
        except OutputError:
            self._failed = True
            raise


def stdout_closed() -> bool:
    """Standard output was closed when the command started (after :func:`guard_stdout`)."""
    return isinstance(sys.stdout, _GuardedText) and sys.stdout.closed_at_start


class _GuardedText(io.TextIOWrapper):
    closed_at_start = False


def guard_stdout() -> None:
    """Put the guarded writer in place of ``sys.stdout`` (a test's captured stream is left alone)."""
    current = sys.stdout
    if current is None:
        _hold_descriptor_one()
        fd, encoding, errors = None, "utf-8", "strict"
    else:
        try:
            fd = current.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            return  # not a real file (Click's CliRunner): its owner reads what is written
        if fd != 1:
            return
        try:
            current.flush()
        except OSError:
            pass
        encoding, errors = current.encoding or "utf-8", current.errors or "strict"
    guarded = _GuardedText(io.BufferedWriter(_GuardedOut(fd)), encoding=encoding, errors=errors,
                           line_buffering=fd is not None and os.isatty(fd))
    guarded.closed_at_start = fd is None
    sys.stdout = guarded


def _hold_descriptor_one() -> None:
    """Descriptor 1 is closed: hold it with /dev/null, so that no file the command opens later (the SQLite
    database, an --out file) gets number 1 and takes what a child process or a stray write sends there."""
    try:
        os.fstat(1)
        return
    except OSError as exc:
        if exc.errno != errno.EBADF:
            return
    fd = os.open(os.devnull, os.O_WRONLY)
    if fd != 1:
        os.dup2(fd, 1)
        os.close(fd)
