"""Hot reload: a changed policy folder takes effect without a restart.

A new engine is opened and validated before it is swapped in, and each
decision carries the revision that made it; see docs/architecture.md,
"Design notes by package" (gateway/policy).

The folder's watch loads a revision only once its files have stopped
changing: the same revision read on two polls in a row, and the engine
opened on it reading that revision again. An editor or a copy writing a
module in several writes could otherwise be read mid-way, and a first part
that still parses (a rule file cut after a complete rule) was loaded and
decided requests, named by the audit, until the next poll. A SIGHUP (or a
forced reload) is the operator saying the files are complete: it loads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from gateway.task_stop import stop_tasks
from gateway.policy.decision import Decision
from gateway.policy.engine import PolicyEngine, PolicyLoadError
from gateway.policy.output_decision import OutputDecision
from gateway.policy.folder_stat import FolderRevisions
from gateway.policy.revision import PolicyFilesError

log = logging.getLogger("govgate.policy")

EngineOpener = Callable[[], Awaitable[PolicyEngine]]

#: How long a replaced engine stays open for decisions already running on it.
RETIRE_AFTER_S = 10.0


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    revision: str
    error: str | None = None


#: A refused revision is tried again after this long, doubling up to REJECTED_RETRY_MAX_S while the
#: files stay the same (on OPA a refusal can be a race with its own --watch; a slow module would
#: otherwise keep an evaluator busy for its whole start timeout at every poll, and the log would repeat).
REJECTED_RETRY_S = 5.0
REJECTED_RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class _Rejected:
    """The last revision of the folder that failed to load, and when to try it again."""

    revision: str
    reason: str
    retry_at: float
    wait_s: float

    @classmethod
    def after(cls, previous: "_Rejected | None", revision: str, reason: str) -> "_Rejected":
        wait_s = REJECTED_RETRY_S
        if previous is not None and previous.revision == revision:
            wait_s = min(previous.wait_s * 2, REJECTED_RETRY_MAX_S)
        return cls(revision, reason, time.monotonic() + wait_s, wait_s)


#: What :attr:`ReloadingPolicyEngine.rejected` names instead of a revision while the folder cannot be read
#: (a ``data.json`` that is not JSON has no revision): a restart would refuse it all the same.
UNREADABLE = "unreadable"


def _count_reload(result: str) -> None:
    """``govgate_policy_reloads_total{result}`` (imported here: the policy package is used without the app too)."""
    from gateway.observability.metrics import POLICY_RELOADS

    POLICY_RELOADS.labels(result).inc()


#: What a reload asks of a new engine before it swaps it in: None, or why it must not serve.
Trial = Callable[[PolicyEngine], Awaitable["str | None"]]


class ReloadingPolicyEngine:
    """A :class:`PolicyEngine` whose policy can be replaced while it serves."""

    def __init__(self, engine: PolicyEngine, opener: EngineOpener, *, policy_dir: Path,
                 interval_s: float = 0.0, trial: Trial | None = None) -> None:
        """``trial``: asked of a newly opened engine before it replaces the serving one; a text refuses it
        (gateway/requests/policy_trial.py: decisions on requests shaped like real ones)."""
        self._engine = engine
        self._opener = opener
        self._trial = trial
        self._policy_dir = policy_dir
        #: The folder's revision, read again only when its files' metadata changed (folder_stat.py).
        self._on_disk = FolderRevisions(policy_dir)
        self._interval_s = interval_s
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._hup_installed = False
        self._listeners: list[Callable[[], None]] = []
        self._rejected: _Rejected | None = None  # the folder's last refused revision (not retried at every poll)
        #: The folder's last read error, keyed by its message (not logged at every poll).
        self._unreadable: _Rejected | None = None
        #: The changed revision the watch read on its last poll: loaded when the next poll reads it again.
        self._settling: str | None = None

    @property
    def revision(self) -> str:
        return self._engine.revision

    @property
    def rejected(self) -> tuple[str, str] | None:
        """The folder's revision last refused (and why) while it is still what the folder holds, else None.

        ``/readyz`` shows it: the old revision serves, so the gateway is
        ready, but a restart would refuse to start on the folder as it is
        (probe q3 F3: a refusal was visible only in the log). A folder that
        cannot be read at all (a ``data.json`` that is not JSON) has no
        revision: it is named :data:`UNREADABLE` while it stays so (until
        2026-12-05 it showed only in the log, probe s54 F2).
        """
        unreadable = self._unreadable
        if unreadable is not None:
            return UNREADABLE, unreadable.reason
        rejected = self._rejected
        return None if rejected is None else (rejected.revision, rejected.reason)

    @property
    def current(self) -> PolicyEngine:
        return self._engine

    async def readiness_problem(self) -> str | None:
        """Why the serving engine cannot decide now, for ``/readyz`` (None: it can, or it cannot tell)."""
        check = getattr(self._engine, "readiness_problem", None)
        return None if check is None else await check()

    async def decide(self, input: dict[str, Any]) -> Decision:
        return await self._engine.decide(input)

    async def decide_with_revision(self, input: dict[str, Any]) -> tuple[Decision, str]:
        engine = self._engine  # the revision must be that of the engine that decided
        return await engine.decide(input), engine.revision

    def team_weight(self, team: str | None) -> float:
        """The team's share in the policy now loaded (1 for an engine that keeps no data, a test's stand-in)."""
        weight_of = getattr(self._engine, "team_weight", None)
        return 1.0 if weight_of is None else weight_of(team)

    def on_reload(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously; it must not block) each time a new engine is swapped in."""
        self._listeners.append(listener)

    async def decide_output(self, input: dict[str, Any]) -> OutputDecision:
        return await self._engine.decide_output(input)

    async def decide_output_with_revision(self, input: dict[str, Any]) -> tuple[OutputDecision, str]:
        engine = self._engine  # the revision must be that of the engine that decided
        return await engine.decide_output(input), engine.revision

    async def visible_models(self, principal: dict[str, Any], models: list[dict[str, Any]]) -> set[str]:
        return await self._engine.visible_models(principal, models)

    async def visible_models_known(self, principal: dict[str, Any],
                                   models: list[dict[str, Any]]) -> set[str] | None:
        return await self._engine.visible_models_known(principal, models)

    async def output_rule_absent(self, revision: str) -> bool:
        """True only when the policy at ``revision`` is the one loaded and has no output rule at all.

        A request admitted under another revision (a reload came between its
        decision and now), an engine that cannot answer the question, or one
        that keeps no such knowledge (a test's stand-in) counts as having one.
        """
        engine = self._engine
        has_output_rule = getattr(engine, "has_output_rule", None)
        if has_output_rule is None or engine.revision != revision:
            return False
        return not await has_output_rule()

    async def poll(self) -> ReloadResult:
        """The watch's look at the folder: load a changed revision once its files have settled.

        A revision is loaded when this poll reads the same one the previous
        poll read (the files did not change for a whole interval) and the
        engine opened on them holds it too; until then the running policy
        keeps serving and nothing is logged but at debug level.
        """
        return await self.reload(settled_only=True)

    async def reload(self, *, force: bool = False, settled_only: bool = False) -> ReloadResult:
        """Load the folder again if its revision changed; keep the old policy on any error.

        ``settled_only`` (the watch, :meth:`poll`): only a revision read on the previous call too.
        """
        async with self._lock:
            old = self._engine
            try:
                on_disk = await asyncio.to_thread(self._on_disk.revision, fresh=force)
            except (PolicyFilesError, OSError) as exc:
                self._settling = None  # whatever is read next must be read twice
                self._report_unreadable(old.revision, str(exc), force=force)
                await self._verify(old)
                return ReloadResult(False, old.revision, str(exc))
            self._unreadable = None
            if on_disk == old.revision and not force:
                self._settling = None
                self._rejected = None  # the folder holds the running revision again: nothing refused is on disk
                await self._verify(old)
                return ReloadResult(False, old.revision)
            if settled_only and on_disk != self._settling:
                self._settling = on_disk
                log.debug("policy files changed (revision %s); loading once they stay so for one poll", on_disk)
                await self._verify(old)
                return ReloadResult(False, old.revision)
            rejected = self._rejected
            if rejected is not None and rejected.revision == on_disk and not force \
                    and time.monotonic() < rejected.retry_at:
                await self._verify(old)  # the same refused files: not tried (nor logged) again before retry_at
                return ReloadResult(False, old.revision, rejected.reason)
            try:
                new = await self._opener()
                if settled_only and new is not old and new.revision != on_disk:  # changed again since this poll read
                    self._settling = new.revision
                    log.debug("policy files changed while loading (revision %s, then %s); waiting for them to settle",
                              on_disk, new.revision)
                    await new.aclose()
                    await self._verify(old)
                    return ReloadResult(False, old.revision)
                refusal = None if self._trial is None or new is old else await self._trial(new)
                if refusal is not None:
                    await new.aclose()
                    raise PolicyLoadError(refusal)
            except Exception as exc:  # a policy that does not load must never replace one that does
                log.error("rejected policy revision %s (keeping %s): %s", on_disk, old.revision, exc)
                self._rejected = _Rejected.after(rejected, on_disk, str(exc))
                _count_reload("rejected")
                await self._verify(old)
                return ReloadResult(False, old.revision, str(exc))
            self._rejected = None
            self._settling = None
            self._engine = new
            _count_reload("loaded")
            log.info("policy reloaded: revision %s -> %s", old.revision, new.revision)
            for listener in self._listeners:
                try:
                    listener()
                except Exception:  # a listener's bug must not undo a load that succeeded
                    log.exception("policy reload listener failed")
            if new is not old:
                self._spawn(self._retire(old))
            return ReloadResult(new.revision != old.revision, new.revision)

    def _report_unreadable(self, revision: str, reason: str, *, force: bool) -> None:
        """Log an unreadable folder at ERROR once, then again only after the refused-revision backoff.

        A ``data.json`` that is not JSON logged an ERROR at every poll (every
        2 s, indefinitely). The same problem (the same message) is now logged
        after 5 s, 10, 20 … up to a minute, as a refused revision is retried;
        another problem, a SIGHUP, or the folder becoming readable in between,
        logs at once. The folder is still read at every poll, so a repair is
        taken at the next one.
        """
        unreadable = self._unreadable
        if unreadable is not None and unreadable.revision == reason and not force \
                and time.monotonic() < unreadable.retry_at:
            log.debug("policy folder %s still unreadable; keeping revision %s: %s", self._policy_dir, revision,
                      reason)
            return
        log.error("policy folder %s unreadable; keeping revision %s: %s", self._policy_dir, revision, reason)
        self._unreadable = _Rejected.after(unreadable, reason, reason)
        _count_reload("rejected")  # counted as often as it is logged, as a refused revision is per try

    async def _verify(self, engine: PolicyEngine) -> None:
        """Prove again that a remote engine (OPA) still evaluates ``engine.revision``.

        The folder being unchanged, or a change being rejected, says nothing
        about what OPA holds: it may have been restarted with another policy,
        or (``opa run --watch``) have loaded the change the gateway refused.
        An engine that finds a mismatch denies until a reload succeeds
        (:meth:`OpaPolicyEngine.verify`); the embedded engine has nothing to prove.
        """
        verify = getattr(engine, "verify", None)
        if verify is None:
            return
        try:
            await verify()
        except Exception as exc:  # logged once per change of state by the engine; never stops the watch
            log.debug("policy verification of revision %s failed: %s", engine.revision, exc)

    async def start(self) -> None:
        """Begin watching the folder and listening for SIGHUP (where the platform has it)."""
        if self._interval_s > 0 and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="govgate-policy-watch")
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
            self._hup_installed = True

    async def aclose(self) -> None:
        if self._hup_installed:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await stop_tasks([self._watcher, *self._tasks])
        await self._engine.aclose()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.poll()

    async def _retire(self, engine: PolicyEngine) -> None:
        try:
            await asyncio.sleep(RETIRE_AFTER_S)
        finally:
            await engine.aclose()

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
