"""A pool of policy evaluator processes, so decisions keep up with the gateway.

The evaluation timeout and the wait for a free evaluator are bounded apart,
so a burst is "unavailable", never a deny; a child that times out or
crashes is replaced in the background. See docs/architecture.md, "Design
notes by package" (gateway/policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Coroutine, Final, Literal

from gateway.policy.child import CHILD_COMMAND, child_environment
from gateway.policy.fair_line import FairLine, Team
from gateway.policy.vm import MISMATCH_FLAG, mismatch_note

log = logging.getLogger("govgate.policy")

#: Longest a child may take to start, compile the policy and pass its trial
#: evaluations; only paid at load and after a timeout or crash.
START_TIMEOUT_S = 30.0

_HEADER = struct.Struct("!i")  # multiprocessing.connection's frame header, for frames under 2 GiB
_READ_CHUNK = 1 << 16
_MISMATCH = MISMATCH_FLAG.encode()


class EvaluatorStartError(RuntimeError):
    """An evaluator could not be started, or the policy does not load in it."""


@dataclass(frozen=True)
class Outcome:
    """What one evaluation produced, before it is read as a decision.

    ``busy``: no evaluator became free within the wait bound; ``timeout``:
    the evaluation itself ran past the timeout. Neither says anything about
    the request, unlike ``undefined`` and ``error``.
    """

    kind: Literal["ok", "undefined", "error", "timeout", "busy"]
    #: The rule's JSON value for "ok"; the error text for "error".
    text: str = ""


class Evaluator:
    """One child process owning a regorus Engine, and the parent's end of its pipes.

    ``start`` and ``stop`` block (run them on a thread); ``evaluate`` runs on
    the event loop. The pool never lets two of these overlap.
    """

    def __init__(self, setup: bytes) -> None:
        self._setup = setup
        self._process: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        #: Who answers in the running child (its ``ready`` line): the compiled VM or the interpreter, and why.
        self.answered_by = ""
        #: Set by a cancelled ``evaluate``; read once by ``take_late``.
        self._late: LateReply | object | None = None

    # ``kill``, ``pid`` and ``alive`` may run on another thread than ``stop``,
    # which clears ``_process``: each reads it once, into a local.

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    @property
    def alive(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    def start(self) -> None:
        """Start a child and wait until it has compiled the policy; raise ``EvaluatorStartError`` if it cannot."""
        self.stop()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD_COMMAND],
                stdin=to_child_r,
                stdout=from_child_w,
                env=child_environment(),
                close_fds=True,
                # Out of the terminal's process group: Ctrl-C is the parent's to handle.
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise EvaluatorStartError(f"the policy evaluator could not be started: {exc}") from None
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        send = Connection(to_child_w, readable=False)
        recv = Connection(from_child_r, writable=False)
        self._process, self._send, self._recv = process, send, recv
        try:
            send.send_bytes(self._setup)
            if not recv.poll(START_TIMEOUT_S):
                raise EvaluatorStartError(
                    f"the policy did not compile and pass its trial evaluations within {START_TIMEOUT_S:g}s"
                )
            status, _, text = recv.recv_bytes().decode("utf-8", "replace").partition("\n")
        except (EOFError, OSError):
            self.stop()
            raise EvaluatorStartError(
                f"the policy evaluator exited while starting (exit code {process.returncode})"
            ) from None
        except BaseException:
            self.stop()
            raise
        if status != "ready":
            self.stop()
            raise EvaluatorStartError(f"the policy cannot be loaded: {text.strip()}")
        self.answered_by = _answered_by(text)
        os.set_blocking(send.fileno(), False)
        os.set_blocking(recv.fileno(), False)

    def kill(self) -> None:
        """Signal the child to die now (it may be mid-evaluation: regorus cannot be interrupted otherwise)."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    def stop(self) -> None:
        """Kill the child, reap it and close the pipes. Never while ``evaluate`` runs."""
        process, send, recv = self._process, self._send, self._recv
        self._process = self._send = self._recv = None
        for conn in (send, recv):
            if conn is not None:
                conn.close()
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()

    async def evaluate(self, request: bytes, timeout_s: float) -> bytes:
        """Send one request and return the reply.

        Raises ``TimeoutError`` past ``timeout_s`` and ``EOFError`` or
        ``OSError`` when the child is gone; after any of these the child's
        state is unknown and it must be replaced. Cancelled once the request
        is sent whole, the reply still due is left in :meth:`take_late` for
        the pool to read and drop: the child is then in step again, and need
        not be killed (:class:`LateReply`).
        """
        if self._send is None or self._recv is None:
            raise EOFError("the evaluator is not running")
        loop = asyncio.get_running_loop()
        out, inp = self._send.fileno(), self._recv.fileno()
        reply: asyncio.Future[bytes] = loop.create_future()
        received = bytearray()

        # Both read ``reply`` when called: a cancelled caller's future is swapped for the late reply's.
        def readable() -> None:
            try:
                chunk = os.read(inp, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                _settle(reply, exc)
                return
            if not chunk:
                _settle(reply, EOFError("the policy evaluator closed its pipe"))
                return
            received.extend(chunk)
            if len(received) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(received)
                if length < 0:  # a frame over 2 GiB: never sent by the child
                    _settle(reply, OSError("reply frame too large"))
                elif len(received) >= _HEADER.size + length:
                    _settle(reply, bytes(received[_HEADER.size:_HEADER.size + length]))

        def expired() -> None:
            _settle(reply, TimeoutError())

        frame = _HEADER.pack(len(request)) + request
        deadline = loop.time() + timeout_s
        # On the event loop, not a thread: a thread would need the GIL back several
        # times per decision and, during a burst, wait a switch interval (5 ms) each time.
        # No task or wait_for either: the reply is one future, the timeout one timer, so a
        # decision costs the loop two turns (write and wait, read) instead of five.
        loop.add_reader(inp, readable)
        timer = loop.call_at(deadline, expired)
        sent = late = False
        try:
            written = _write_some(out, frame)
            if written < len(frame):  # a large prompt filled the pipe: wait for room
                await asyncio.wait_for(_write_all(loop, out, frame[written:]), max(deadline - loop.time(), 0))
            sent = True
            return await reply
        except asyncio.CancelledError:
            if reply.done() and not reply.cancelled():  # settled as the caller was cancelled
                if reply.exception() is None:  # its reply read: in step
                    self._late = _IN_STEP
                # else timed out or gone at that moment: unknown (None), so it is replaced
            elif sent:  # the child answers in its time; the reply is read (and dropped) before its next request
                reply = loop.create_future()
                self._late = LateReply(reply, timer, inp)
                late = True
            raise
        finally:
            if not late:
                timer.cancel()
                loop.remove_reader(inp)
                if reply.done() and not reply.cancelled():
                    reply.exception()  # settled but not awaited (the write timed out): not an unretrieved error

    def take_late(self) -> LateReply | bool | None:
        """After a cancelled :meth:`evaluate`: ``True`` if the child is in step (its reply was read), a
        :class:`LateReply` to read first, or ``None`` if its state is unknown (a request written in part)."""
        late, self._late = self._late, None
        return True if late is _IN_STEP else late


class LateReply:
    """The reply still due from a child whose caller left mid-evaluation (a client that disconnected).

    Killing the child instead, as before, cost a policy compile to restart it
    (hundreds of ms of CPU), and a client cutting streams at will could keep
    the evaluators restarting. Reading the reply costs the evaluation's own
    time, bounded by the caller's timeout, past which the child is replaced
    as for any timeout.
    """

    def __init__(self, reply: asyncio.Future[bytes], timer: asyncio.TimerHandle, fd: int) -> None:
        self._reply, self._timer, self._fd = reply, timer, fd

    async def wait(self) -> None:
        """Until the reply is read; raises as :meth:`Evaluator.evaluate` would (timeout, EOF)."""
        try:
            await self._reply
        finally:
            self._timer.cancel()
            asyncio.get_running_loop().remove_reader(self._fd)


#: ``Evaluator._late`` of a child whose reply was read although its caller was cancelled.
_IN_STEP: Final = object()


def _answered_by(ready: str) -> str:
    """The note of a child's ``ready`` line (``{"vm": bool, "note": str}``)."""
    try:
        note = json.loads(ready).get("note") if ready else None
    except (ValueError, AttributeError):
        note = None
    return note if isinstance(note, str) else "interpreter"


def _write_some(fd: int, data: bytes) -> int:
    """Write what the non-blocking pipe takes now (0 when it is full)."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def _settle(future: asyncio.Future[bytes], result: bytes | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


async def _write_all(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
    """Write to a non-blocking pipe, waiting for room when it is full (a large prompt)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            room: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, lambda: room.done() or room.set_result(None))
            try:
                await room
            finally:
                loop.remove_writer(fd)


class EvaluatorPool:
    """``size`` evaluators of one policy, lent out one request at a time.

    When none is free, requests wait in a :class:`FairLine`: by team, served
    by ``weight_of(team)`` (the policy's team shares), FIFO within a team.
    """

    def __init__(self, setup: bytes, size: int, timeout_s: float, wait_timeout_s: float,
                 weight_of: Callable[[Team], float] | None = None) -> None:
        """Start every evaluator (blocking; compiles the policy ``size`` times at once)."""
        if size < 1:
            raise ValueError("size must be at least 1")
        self.timeout_s = timeout_s
        self.wait_timeout_s = wait_timeout_s
        self._evaluators = [Evaluator(setup) for _ in range(size)]
        self._idle: list[Evaluator] = []
        self._waiters: FairLine[Evaluator | None] = FairLine(weight_of)
        #: Replacements and late-reply reads running in the background (awaited by ``aclose``).
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        with ThreadPoolExecutor(max_workers=size, thread_name_prefix="govgate-policy-start") as starter:
            started = [starter.submit(evaluator.start) for evaluator in self._evaluators]
            errors = [future.exception() for future in started]
        failed = [error for error in errors if error is not None]
        if failed:
            for evaluator in self._evaluators:
                evaluator.stop()
            raise failed[0]
        self._idle = list(self._evaluators)

    @property
    def pids(self) -> list[int | None]:
        return [evaluator.pid for evaluator in self._evaluators]

    @property
    def answered_by(self) -> list[str]:
        """Per evaluator, who answers: the compiled VM or the interpreter, and why (for the log and tests)."""
        return [evaluator.answered_by for evaluator in self._evaluators]

    @property
    def alive(self) -> int:
        """Evaluators whose process is running (a dead one is replaced when it is next handed a decision)."""
        return sum(1 for evaluator in self._evaluators if evaluator.alive)

    @property
    def free(self) -> int:
        """Evaluators waiting for work (not evaluating, not being replaced)."""
        return len(self._idle)

    @property
    def waiting(self) -> dict[Team, int]:
        """Requests waiting for an evaluator, per team (for operators and tests)."""
        return self._waiters.waiting()

    async def run(self, request: bytes, team: Team = None) -> tuple[Outcome, bytes]:
        """Evaluate ``request`` on a free evaluator: ``(Outcome("ok"), reply)`` or a failure outcome.

        ``team`` places the request in the waiting line when no evaluator is free.
        """
        if self._closed:
            return Outcome("error", "the policy engine is closed"), b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout_s
        while True:
            evaluator = await self._acquire(deadline - loop.time(), team)
            if evaluator is None:
                if self._closed:
                    return Outcome("error", "the policy engine is closed"), b""
                return Outcome("busy"), b""
            if evaluator.alive:
                break
            self._replace(evaluator, "died while idle")  # comes back to the pool once restarted
        try:
            reply = await evaluator.evaluate(request, self.timeout_s)
        except TimeoutError:
            self._replace(evaluator, "timed out")
            return Outcome("timeout"), b""
        except (EOFError, OSError):
            self._replace(evaluator, "exited during an evaluation")
            return Outcome("error", "the policy evaluator exited during the evaluation"), b""
        except asyncio.CancelledError:  # its late reply must not answer the next request
            self._abandoned(evaluator)
            raise
        except BaseException:
            self._replace(evaluator, "was abandoned mid-evaluation")
            raise
        if reply.split(b"\n", 1)[0].endswith(_MISMATCH):  # the child interprets from now on
            evaluator.answered_by = mismatch_note(request.split(b"\n", 1)[0].decode("utf-8", "replace"))
        self._release(evaluator)
        return Outcome("ok"), reply

    def revive_idle(self) -> int:
        """Start replacing every idle evaluator whose process died (killed, out of memory); how many.

        A dead idle one is otherwise replaced only when a decision is asked
        of it; ``/readyz`` calls this, so a gateway whose evaluators all
        died while idle comes back into a load balancer's rotation by itself
        (it said "no policy evaluator is running" until some request came,
        which the balancer, routing on it, never sent).
        """
        if self._closed:
            return 0
        dead = [evaluator for evaluator in self._idle if not evaluator.alive]
        for evaluator in dead:
            self._idle.remove(evaluator)
            self._replace(evaluator, "died while idle")
        return len(dead)

    async def aclose(self) -> None:
        """Stop every evaluator; evaluations still running end with an error."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters.drain():
            _hand(waiter, None)
        for evaluator in self._evaluators:
            evaluator.kill()  # running evaluations see EOF and hand their evaluator back
        loop = asyncio.get_running_loop()
        # Killed children end their evaluations at once; the bound only guards
        # against a borrower that will never run again (its loop was stopped).
        deadline = loop.time() + self.timeout_s + START_TIMEOUT_S
        while self._tasks:
            # A replacement started from another event loop (an evaluation awaited on a loop other than the
            # one closing the pool, as Litestar's test client does) cannot be gathered here: it is watched.
            here = [task for task in self._tasks if task.get_loop() is loop]
            if here:
                await asyncio.gather(*here, return_exceptions=True)
            elif loop.time() < deadline:
                await asyncio.sleep(0.01)
            else:
                break
        while len(self._idle) < len(self._evaluators) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self._stop_all)

    def _stop_all(self) -> None:
        for evaluator in self._evaluators:
            evaluator.stop()

    async def _acquire(self, timeout_s: float, team: Team) -> Evaluator | None:
        """A free evaluator, or ``None`` when none frees up within ``timeout_s`` (or the pool closes).

        A waiter that times out or is cancelled stays in the line as a done
        future, which the line drops when its turn comes (no O(n) removal).
        """
        if self._idle:
            return self._idle.pop()
        if timeout_s <= 0 or self._closed:
            return None
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[Evaluator | None] = loop.create_future()
        self._waiters.push(team, handed)
        timer = loop.call_later(timeout_s, _hand, handed, None)
        try:
            return await handed
        except asyncio.CancelledError:
            # Cancelled just after an evaluator was handed over: give it back.
            if handed.done() and not handed.cancelled() and handed.result() is not None:
                self._release(handed.result())
            raise
        finally:
            timer.cancel()

    def _release(self, evaluator: Evaluator) -> None:
        """Hand ``evaluator`` to the waiter whose turn it is, or keep it idle."""
        waiter = self._waiters.pop()
        if waiter is not None:
            waiter.set_result(evaluator)
        else:
            self._idle.append(evaluator)

    def _abandoned(self, evaluator: Evaluator) -> None:
        """An evaluation whose caller was cancelled: the evaluator comes back once its reply is read and dropped
        (or at once, read already); replaced if it times out, or if the request was cut mid-write."""
        late = evaluator.take_late()
        log.debug("policy evaluator (pid %s): its caller left mid-evaluation", evaluator.pid)
        if late is True:
            self._release(evaluator)
        elif late is None:
            self._replace(evaluator, "was abandoned while its request was being written")
        else:
            self._background(self._drain(evaluator, late))

    async def _drain(self, evaluator: Evaluator, late: LateReply) -> None:
        try:
            await late.wait()
        except TimeoutError:
            self._replace(evaluator, "timed out after its caller left")
        except (EOFError, OSError):
            self._replace(evaluator, "exited during an evaluation its caller left")
        else:
            self._release(evaluator)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _replace(self, evaluator: Evaluator, why: str) -> None:
        """Kill ``evaluator``'s child now; start another in the background, then return the slot."""
        log.warning("policy evaluator (pid %s) %s; starting a new one", evaluator.pid, why)
        evaluator.kill()
        self._background(self._restart(evaluator))

    async def _restart(self, evaluator: Evaluator) -> None:
        try:
            if self._closed:
                await asyncio.to_thread(evaluator.stop)
            else:
                await asyncio.to_thread(evaluator.start)
        except EvaluatorStartError as exc:  # the next borrower tries again
            log.error("policy evaluator could not be restarted: %s", exc)
        finally:
            self._release(evaluator)


def _hand(waiter: asyncio.Future[Evaluator | None], evaluator: Evaluator | None) -> None:
    if not waiter.done():
        waiter.set_result(evaluator)
