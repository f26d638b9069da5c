"""Child processes that cannot outlive the process that started them.

``govgate up`` and the test fixtures start Redis, workers and the API as
children. If the parent is killed outright (SIGKILL, a crashed terminal)
Linux's ``PR_SET_PDEATHSIG`` delivers SIGTERM to each child, so nothing is
left running; on other systems this is a no-op and the normal shutdown path
is the only guard.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import socket
import subprocess
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_preexec() -> Callable[[], None] | None:
    return _die_with_parent if sys.platform.startswith("linux") else None


def stop_process(process: subprocess.Popen, *, timeout_s: float = 15.0, sig: int = signal.SIGTERM) -> int:
    """Ask a child to stop, wait, then kill it if it lingers; return its exit code."""
    if process.poll() is None:
        try:
            process.send_signal(sig)
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now; another process may take it before the caller binds it."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
