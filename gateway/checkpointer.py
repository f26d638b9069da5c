"""The gateway's background checkpointer: sign the chain's head every N entries or T seconds.

Each gateway process runs one (replicas too: the checkpoint table takes one
row per seq, so two signing the same head is a no-op). It looks once a
second (or every interval, if shorter) at the head and the latest
checkpoint, whoever wrote it, and signs when the head moved and either
``every_entries`` entries or ``interval_s`` seconds have passed since, or
the latest checkpoint is a closing one (a replica stopped; its successor
signs at once so that nothing stays unsigned after a closing checkpoint).
At start, before it signs anything, it appends a ``chain_anomaly`` entry if
it finds entries nobody signed (:func:`audit.checkpoint_check.anomaly_at_start`;
entries after a closing checkpoint younger than a few seconds are judged
once they are that old, as a replica still running may be about to sign
them: :func:`audit.checkpoint_check.closing_tail_judged_at`);
at a stop it writes a closing checkpoint (a forced one too: ``gateway/forced_stop.py``). Each checkpoint it writes
is piped to ``GOVGATE_CHECKPOINT_COMMAND``. The newest checkpoint it vouched for
(signed, or found stored with its entry intact) is kept on this host
(:mod:`audit.checkpoint_memory`); a start that finds it gone from the database
(cut back, rewritten, its checkpoints deleted, or restored from an older copy)
records that in a ``chain_anomaly`` entry before it signs anything. Database calls run in a thread
and failures are logged and retried: requests never wait on any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Callable, Final

from audit import AuditError, AuditStore
from audit.checkpoint_check import (CLOSING_GRACE_S, anomaly_at_start, anomaly_request_id, closing_tail_judged_at,
                                    default_max_unsigned_age_s, gone_anomaly, remembered_problem)
from audit.checkpoint_memory import CheckpointMemory
from audit.checkpoints import Checkpoint, CheckpointFileError, CheckpointStore, checkpoint_file_text
from audit.kinds import CHAIN_ANOMALY
from audit.signing import SigningKey
from gateway.task_stop import stop_task

log = logging.getLogger(__name__)

#: Longest GOVGATE_CHECKPOINT_COMMAND may run for one checkpoint before it is killed.
COMMAND_TIMEOUT_S: Final = 30.0
#: At shutdown the closing checkpoint and its command get this long, so a stop never hangs on them.
CLOSING_TIMEOUT_S: Final = 10.0
#: How often the head is looked at (at most; a shorter interval looks more often).
POLL_S: Final = 1.0


class Checkpointer:
    """Start with :meth:`start`, stop with :meth:`aclose` (which writes the closing checkpoint)."""

    def __init__(self, checkpoints: CheckpointStore, audit: AuditStore, key: SigningKey, *, every_entries: int,
                 interval_s: float, command: str = "", command_timeout_s: float = COMMAND_TIMEOUT_S,
                 poll_s: float | None = None, clock: Callable[[], datetime] | None = None,
                 memory: CheckpointMemory | None = None) -> None:
        self._checkpoints = checkpoints
        self._audit = audit
        self._key = key
        self._every = every_entries
        self._interval = timedelta(seconds=interval_s)
        self._max_unsigned_age_s = default_max_unsigned_age_s(interval_s)
        self._command = command
        self._command_timeout_s = command_timeout_s
        self._poll_s = poll_s if poll_s is not None else min(POLL_S, interval_s)
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._task: asyncio.Task | None = None
        self._start_checked = False
        #: The head when this process first looked: what its start check judges (later entries are its own).
        self._head_at_start: int | None = None
        #: Set while the start check waits for a young tail after a closing checkpoint (logged once).
        self._start_judged_at: datetime | None = None
        #: The start check waits no longer than this (:data:`CLOSING_GRACE_S` after its first look).
        self._wait_ends = datetime.min.replace(tzinfo=timezone.utc)
        self._failing = False
        #: The latest checkpoints this process wrote (newest last).
        self.written: deque[Checkpoint] = deque(maxlen=64)
        #: The newest checkpoint this process has signed or seen stored with its entry still holding the
        #: hash it signs: what it has vouched for, whatever the table holds later (:meth:`_check_vouched`).
        self._vouched: Checkpoint | None = None
        #: Where :attr:`_vouched` outlives this process (None: nowhere); read once at start.
        self._memory = memory
        self._memory_checked = memory is None
        self._memory_failing = False
        #: The last stored checkpoint found not to verify under the key (not kept; logged once).
        self._unverified: Checkpoint | None = None

    async def start(self) -> None:
        """Look for unsigned entries (recording an anomaly) now, then sign in the background."""
        await self._start_check()
        self._task = asyncio.create_task(self._run(), name="govgate-checkpointer")

    async def aclose(self, within_s: float = CLOSING_TIMEOUT_S) -> None:
        """Stop the loop, then write and pipe the closing checkpoint, within ``within_s`` (a stop never hangs).

        Once only: the app's shutdown at a clean stop, or a forced stop's last call
        (``gateway/forced_stop.py``, with a shorter bound), whichever comes first.
        """
        task, self._task = self._task, None
        if task is None:
            return
        deadline = asyncio.get_running_loop().time() + within_s
        await stop_task(task)
        if not self._start_checked and self._start_judged_at is not None:
            # Stopping while a young tail waits for its judgement: judge it now (the stop cannot wait).
            await self._start_check(final=True)
        if not self._start_checked:
            return  # never got to check what it found at start: signing now would bless it
        try:
            checkpoint = await asyncio.wait_for(asyncio.to_thread(self._make, True),
                                                max(0.1, deadline - asyncio.get_running_loop().time()))
        except (AuditError, asyncio.TimeoutError) as exc:
            log.error("no closing audit checkpoint written: %s", str(exc) or f"not within {within_s:g}s")
            return
        if checkpoint is None:
            log.info("audit head already checkpointed; no closing checkpoint (one per entry)")
            return
        left = deadline - asyncio.get_running_loop().time()
        await self._pipe(checkpoint, max(0.1, min(self._command_timeout_s, left)))

    async def tick(self) -> Checkpoint | None:
        """One look at the head; the checkpoint written, if one was due. Raises :class:`AuditError`."""
        checkpoint = await asyncio.to_thread(self._sign_if_due)
        if checkpoint is not None:
            await self._pipe(checkpoint, self._command_timeout_s)
        return checkpoint

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                if not self._start_checked:
                    await self._start_check()
                    continue
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                if not self._failing:
                    log.error("audit checkpoint failed (retrying every %.1fs): %s", self._poll_s, exc,
                              exc_info=not isinstance(exc, AuditError))
                self._failing = True
                continue
            if self._failing:
                log.info("audit checkpoints are written again")
                self._failing = False

    async def _start_check(self, *, final: bool = False) -> None:
        try:
            judged = await asyncio.to_thread(self._record_anomaly, final)
        except AuditError as exc:
            log.error("cannot check the audit chain's unsigned tail at start (retrying): %s", exc)
            return
        self._start_checked = judged

    def _record_anomaly(self, final: bool = False) -> bool:
        """Append the ``chain_anomaly`` the start finds, if any; False while the tail is too young to judge.

        Until it returns True this process signs nothing (signing would bless
        what it has not judged); the loop asks again every poll. ``final``:
        judge now, however young the tail (the process is stopping).
        """
        now = self._clock()
        if self._head_at_start is None:
            head = self._checkpoints.head()
            self._head_at_start = head[0] if head is not None else 0
            # Entries dated ahead by a writer's fast clock must not hold the signing back for longer.
            self._wait_ends = now + timedelta(seconds=CLOSING_GRACE_S)
        if not self._memory_checked:
            self._check_memory()
            self._memory_checked = True
        latest = self._checkpoints.latest()
        if latest is not None and self._checkpoints.entry_hash(latest.seq) == latest.head_hash:
            self._vouch(latest)  # from now on it must stay (:meth:`_check_vouched`)
        if not final:
            judged_at = closing_tail_judged_at(self._checkpoints, now=now)
            if judged_at is not None and now < self._wait_ends:
                judged_at = min(judged_at, self._wait_ends)
                if self._start_judged_at is None:
                    log.info("audit entries after the closing checkpoint at seq %d are unsigned and younger than "
                             "a replica still running takes to sign them: judged at %s", latest.seq if latest else 0,
                             judged_at.isoformat())
                self._start_judged_at = judged_at
                return False
        body = anomaly_at_start(self._checkpoints, max_unsigned_age_s=self._max_unsigned_age_s,
                                through=self._head_at_start)
        if body is None:
            return True
        log.warning("audit entries %s..%s were signed by no checkpoint (%s); recorded as a chain_anomaly entry",
                    body["first_seq"], body["last_seq"], body["reason"])
        self._audit.append(CHAIN_ANOMALY, anomaly_request_id(body), principal=None, team=None, model=None,
                           body=body, policy_revision=None)
        return True

    def _check_memory(self) -> None:
        """Hold the database against the checkpoint this host remembers; a ``chain_anomaly`` when it is gone.

        Not a refusal to sign, unlike a running gateway's (:meth:`_check_vouched`):
        at a start the likeliest cause is an operator restoring the database
        from a backup, and a gateway that signed nothing from then on would
        leave every later entry unvouched. The entry, signed with the rest,
        tells a reviewer the log lost what it once held; a DBA who cut or
        rewrote it cannot delete that entry without being caught the same way.
        """
        assert self._memory is not None
        try:
            remembered = self._memory.load(self._key.public)
        except CheckpointFileError as exc:
            log.error("%s; going on without it (the next checkpoint replaces it)", exc)
            return
        if remembered is None:
            return
        problem = remembered_problem(self._checkpoints, remembered)
        if problem is None:
            self._vouched = remembered
            return
        body = gone_anomaly(self._checkpoints, remembered, problem)
        if body is None:
            return
        log.error("the audit checkpoint at seq %d that this gateway's host vouched for (%s) is gone from the "
                  "database: %s. Restored from an older backup, or cut back or rewritten by someone who can write "
                  "it; recorded as a chain_anomaly entry", remembered.seq, self._memory.path, problem)
        self._audit.append(CHAIN_ANOMALY, anomaly_request_id(body), principal=None, team=None, model=None,
                           body=body, policy_revision=None)

    def _vouch(self, checkpoint: Checkpoint) -> None:
        """Vouch for ``checkpoint`` (newer than the one vouched for, or the first) and keep it on this host."""
        self._vouched = checkpoint
        if self._memory is None or checkpoint == self._memory.kept or checkpoint == self._unverified:
            return
        if checkpoint.signature_problem(self._key.public) is not None:
            # A row someone inserted without the key: remembered, it would make the memory unreadable at the
            # next start (and so forgotten). Its own check is verify's.
            log.warning("the stored audit checkpoint at seq %d does not verify under this gateway's key; "
                        "not kept in the checkpoint memory", checkpoint.seq)
            self._unverified = checkpoint  # said once
            return
        try:
            self._memory.remember(checkpoint, self._key.public)
        except CheckpointFileError as exc:
            if not self._memory_failing:
                log.error("%s (retried at the next checkpoint)", exc)
            self._memory_failing = True
            return
        if self._memory_failing:
            log.info("checkpoint memory %s is written again", self._memory.path)
            self._memory_failing = False

    def _sign_if_due(self) -> Checkpoint | None:
        head = self._checkpoints.head()
        if head is None:
            return None
        latest = self._checkpoints.latest()
        if latest is not None:
            if head[0] <= latest.seq:
                return None
            due = (latest.closing or head[0] - latest.seq >= self._every
                   or self._clock() - latest.created_at >= self._interval)
            if not due:
                return None
        return self._make(False)

    def _make(self, closing: bool) -> Checkpoint | None:
        """Sign and store the head; the checkpoint if this process wrote it, None if one was there already."""
        latest = self._checkpoints.latest()
        if latest is not None and self._checkpoints.entry_hash(latest.seq) != latest.head_hash:
            # Rewritten (or cut) below the latest checkpoint: signing on would vouch for the rewrite.
            raise AuditError(f"entry {latest.seq} no longer holds the hash its checkpoint signed; "
                             "not signing until `govgate audit verify` has been looked at")
        self._check_vouched(latest)
        made = self._checkpoints.make(self._key, closing=closing)
        if made is None:
            return None
        if self._checkpoints.entry_hash(made[0].seq) == made[0].head_hash:
            self._vouch(made[0])
        if not made[1]:
            return None
        self.written.append(made[0])
        log.debug("audit checkpoint at seq %d%s", made[0].seq, " (closing)" if closing else "")
        return made[0]

    def _check_vouched(self, latest: Checkpoint | None) -> None:
        """Refuse to sign when what this process vouched for is gone from the chain or the table.

        Checking only the latest stored checkpoint let a database writer
        without the key rewrite the chain from some entry on, delete the
        checkpoints above it, and have this checkpointer sign the forged head
        within a second (a probe flipped a denied request to allowed that
        way, and ``verify --strict`` then passed). The checkpoint vouched for
        must still be in the table, and its entry must still hold its hash.
        """
        vouched = self._vouched
        if vouched is None:
            if latest is not None:
                self._vouch(latest)  # its entry's hash was just checked by the caller
            return
        if (latest is None or latest.seq < vouched.seq
                or self._checkpoints.entry_hash(vouched.seq) != vouched.head_hash):
            raise AuditError(f"the checkpoint at seq {vouched.seq} that this gateway signed or checked is gone, or "
                             f"its entry no longer holds the hash it signs: the chain or its checkpoints were "
                             "rewritten; not signing until `govgate audit verify` has been looked at")
        stored = self._checkpoints.get(vouched.seq)
        if stored is None or stored.head_hash != vouched.head_hash:
            raise AuditError(f"the checkpoint at seq {vouched.seq} that this gateway signed or checked was removed "
                             "or replaced; not signing until `govgate audit verify` has been looked at")
        if latest.seq > vouched.seq or (latest.closing and not vouched.closing):
            self._vouch(latest)

    async def _pipe(self, checkpoint: Checkpoint, timeout_s: float) -> None:
        """Give the checkpoint file to the command on stdin; a failure is logged, the next checkpoint tries again."""
        if not self._command:
            return
        data = checkpoint_file_text(checkpoint, self._key.public).encode("utf-8")
        try:
            process = await asyncio.create_subprocess_exec(
                "sh", "-c", self._command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)  # its own process group, so a kill reaches what the shell started
        except OSError as exc:
            log.error("GOVGATE_CHECKPOINT_COMMAND could not start for checkpoint %d: %s", checkpoint.seq, exc)
            return
        try:
            stderr = await asyncio.wait_for(_feed_and_wait(process, data), timeout_s)
        except asyncio.TimeoutError:
            await _kill(process)
            log.error("GOVGATE_CHECKPOINT_COMMAND ran longer than %.0fs for checkpoint %d and was killed",
                      timeout_s, checkpoint.seq)
            return
        except BaseException:
            await _kill(process)
            raise
        if process.returncode != 0:
            tail = (stderr or b"").decode("utf-8", "replace").strip()[-300:]
            log.error("GOVGATE_CHECKPOINT_COMMAND exited %s for checkpoint %d: %s", process.returncode,
                      checkpoint.seq, tail)


async def _feed_and_wait(process: asyncio.subprocess.Process, data: bytes) -> bytes:
    """Give ``data`` to the command's stdin while reading its stderr; its stderr once it has exited.

    A command that exits without reading all of its stdin is not an error
    here: its exit status says how it went. asyncio's ``communicate`` ignores
    the broken pipe that follows, but under uvloop a write to a pipe whose
    reader is gone raises RuntimeError ("the handler is closed"), which
    escaped as "audit checkpoint failed" with a traceback, the command's exit
    status and stderr lost (and from the closing checkpoint, out of the
    gateway's shutdown).
    """
    assert process.stdin is not None and process.stderr is not None

    async def feed() -> None:
        try:
            process.stdin.write(data)
            await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except RuntimeError:
            if not process.stdin.transport.is_closing():
                raise
        finally:
            process.stdin.close()

    _, stderr = await asyncio.gather(feed(), process.stderr.read())
    await process.wait()
    return stderr


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill the command's whole process group (``sh -c 'a | b'`` leaves children a plain kill would not reach)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
