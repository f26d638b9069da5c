"""A checkpoint command that exits without reading its input is judged by its exit status, on either loop.

Under uvloop (the served gateway's loop) a write to a pipe whose reader is
gone raises RuntimeError where asyncio's transport ignores it: the
checkpointer logged "audit checkpoint failed" with a traceback, lost the
command's stderr and exit status, and from the closing checkpoint raised out
of the gateway's shutdown. The command here has exited before its input is
written (the case that raised), or reads part of it; both loops must give
the exit status and stderr.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from gateway.checkpointer import _feed_and_wait

#: Larger than a pipe's buffer, so a command that reads none of it cannot have it all buffered.
DATA = b"{}" * 100_000


async def _run(command: str, *, exited_first: bool) -> tuple[int | None, bytes]:
    process = await asyncio.create_subprocess_exec("sh", "-c", command, stdin=asyncio.subprocess.PIPE,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    if exited_first:
        while process.returncode is None:  # the loop notices the exit (and the closed pipes) first
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    stderr = await asyncio.wait_for(_feed_and_wait(process, DATA), 10)
    return process.returncode, stderr


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("command, exited_first, status, stderr", [
    ("echo 'bucket unreachable' >&2; exit 3", True, 3, b"bucket unreachable\n"),
    ("head -c 10 > /dev/null; echo partial >&2; exit 5", False, 5, b"partial\n"),
    ("cat > /dev/null; echo stored >&2", False, 0, b"stored\n"),
])
def test_the_exit_status_and_stderr_come_back_whatever_the_command_read(loop, command, exited_first, status,
                                                                         stderr) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        assert runner.run(_run(command, exited_first=exited_first)) == (status, stderr)
