"""Running one queued job: generate, then write its one terminal audit entry.

Kept apart from the Celery wiring so the rules are plain functions (see
:func:`run_job`); nothing may reach a client unaudited. See
docs/architecture.md, section "The request path", steps 11 and 12.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import RedisError

from audit import AuditEntry, AuditError, DuplicateTerminalError, EntryStore
from audit.kinds import COMPLETION, FAILED
from workers.backends import BackendError, LoadedModel, PromptTooLongError
from workers.contract.gateway_liveness import GATEWAY_GONE
from workers.contract.jobs import (ENDED_UNSEEN_AFTER_S, KEY_REVOKED_MESSAGE, MAX_JOB_RUNS, STATUS_CANCELLED,
                                   STATUS_FAILED, STATUS_TIMED_OUT, STREAM_WORKER_LOST, WORKER_LOST, GenerateJob, JobResult)
from workers.contract.output_check import OutputReport, OutputVerdict, logged_client_output
from workers.contract.pending_terminals import PendingTerminal, PendingTerminals
from workers.contract.privacy import Digester, logged_output, split_texts
from workers.contract.terminal_body import (GATEWAY_TIMEOUT_MESSAGE, Generated, checked_ending, ended_result,
                                           generation_body, judged_whole, withheld_body)
from workers.contract.prompts import render_chat
from workers.contract.repick import PutBack
from workers.streams import JobChannel, SilentChannel

log = logging.getLogger(__name__)


def prompt_for(job: GenerateJob, model: LoadedModel) -> tuple[str, tuple[str, ...]]:
    """The prompt text and the stop sequences its format implies."""
    if job.endpoint == "chat.completions":
        return render_chat(job.messages or [], model.spec.prompt_format)
    return job.prompt or "", ()


def result_from_entry(entry: AuditEntry) -> JobResult:
    """Rebuild a job's result from its terminal audit entry (redelivery path)."""
    return JobResult.from_terminal(entry.kind, entry.seq, entry.body, entry.payload)


#: What :func:`run_job` returns for an output handed over to its gateway, which records the request's
#: end and answers its client: the task delivers no outcome of its own.
HANDED_OVER = JobResult(status="handed_over")
#: What :func:`run_job` returns for a job that gave way at its start to a fairer one: it is back at the
#: head of its list, not run and not recorded here (``workers/contract/repick.py``).
PUT_BACK = JobResult(status="put_back")


class _Unrecorded(Exception):
    """The database refused a terminal entry (past its busy timeout)."""

    def __init__(self, kind: str, body: dict[str, Any], cause: AuditError) -> None:
        super().__init__(str(cause))
        self.kind = kind
        self.body = body


def run_job(job: GenerateJob, model: LoadedModel, store: EntryStore, channel: JobChannel | None = None,
            pending: PendingTerminals | None = None, *, digester: Digester | None = None,
            worker: dict[str, Any] | None = None, verdict_timeout_s: float = 10.0) -> JobResult:
    """Generate for ``job`` and record the outcome.

    A job whose request already has a terminal entry (a redelivery after a
    crash, or a request the gateway already gave up on) is answered from that
    entry and not generated again; every other outcome is written to the audit
    log before it is returned. The entry keeps the output only as the request's
    ``prompt_logging`` obligation allows
    (:func:`workers.contract.privacy.logged_output`), partial outputs included.

    If the database refuses the terminal entry, the client gets no output
    (nothing is served unaudited) and the entry is kept in ``pending`` as
    ``failed``/``audit_unavailable`` with what was generated, to be written
    when the database is back. ``digester`` makes the digest of an output
    logged as ``hash``; without one such an output is recorded by its length
    alone. ``worker`` names the process in the entry (hostname and pid); a
    pool process passes its own, made once, instead of asking the OS per job.

    A job under the output rules (``job.check_output``) that completed, or
    that the gateway stopped under them, is recorded only once its gateway's
    verdict arrived (at most ``verdict_timeout_s``, and never past the job's
    deadline); without one it is recorded ``failed``/``output_unchecked``
    and the client gets nothing (docs/architecture.md, "Output rules"). A
    stream whose client left while its gateway judged the last window gets a
    ``cancelled`` answer instead of a verdict and is recorded ``cancelled``
    at once, with what the client received.
    A non-streamed completion whose gateway records it (``job.gateway_records``)
    is handed over instead, with a fallback entry kept in ``pending`` that
    a retry writes once ``verdict_timeout_s`` passed unless the gateway
    recorded the end first; that returns :data:`HANDED_OVER`. A fair job whose start gave way to a
    fairer one returns :data:`PUT_BACK` (nothing recorded: it is queued again).
    """
    channel = channel or SilentChannel()
    worker = worker or {"hostname": socket.gethostname(), "pid": os.getpid()}
    try:
        return _run(job, model, store, channel, pending, digester, worker, verdict_timeout_s)
    except _Unrecorded as lost:
        return _keep(job, lost, pending, digester)
    finally:  # the outcome is recorded (or kept, or the process is dying): the stream's mirror is not needed
        channel.forget()


def _keep(job: GenerateJob, lost: _Unrecorded, pending: PendingTerminals | None,
          digester: Digester | None = None) -> JobResult:
    """Keep the refused terminal entry for a later write; the client is told the audit is unavailable.

    The answer carries the refused entry's token counts, so the gateway
    settles the request's usage to what the model ran, as it does for a
    handed-over output whose entry the database refuses: an audit outage
    must not make generation free.
    """
    log.error("cannot record %s for %s: %s", lost.kind, job.request_id, lost)
    if pending is not None:
        body = withheld_body(lost.body, lost.kind)
        if job.check_output and lost.kind == COMPLETION:
            body = _received_instead(job, body, digester)
        pending.keep(PendingTerminal(kind=FAILED, request_id=job.request_id, principal=job.principal,
                                     team=job.team, model=job.model, body=body, policy_revision=job.policy_revision))
    prompt_tokens, completion_tokens = _counts(lost.body.get("usage"))
    return JobResult(status=STATUS_FAILED, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     error={"code": "audit_unavailable", "message": "the audit store cannot be written"})


def _received_instead(job: GenerateJob, body: dict[str, Any], digester: Digester | None) -> dict[str, Any]:
    """A checked completion's kept end without the verdict's ``client_output``, which the client did not get:
    told ``audit_unavailable`` (the end is not recorded), a non-streamed client got nothing, and a stream
    got its released windows but not the last one, which only its gateway knows (its ``delivered`` entry).
    A cancelled or timed-out end keeps its own: the gateway's verdict said what the client had then."""
    kept = {key: value for key, value in body.items() if not key.startswith("client_output")}
    if not job.stream:
        kept.update(logged_client_output("", job.prompt_logging, job.redact, digester))
    return kept


def _counts(usage: Any) -> tuple[int, int]:
    """Prompt and completion tokens of a terminal body's ``usage`` (0, 0 when it has none)."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else 0), (completion if isinstance(completion, int) else 0)


def _run(job: GenerateJob, model: LoadedModel, store: EntryStore, channel: JobChannel,
         pending: PendingTerminals | None, digester: Digester | None, worker: dict[str, Any],
         verdict_timeout_s: float) -> JobResult:
    # The SET NX tells a first delivery from a redelivery; a redelivery can find
    # the request already ended by an earlier run, so it asks the database. So does
    # a first run of a job that waited long (ENDED_UNSEEN_AFTER_S): its gateway may
    # have ended the request while it could not reach Redis to say so (a stop that
    # took Redis down with it), in the database alone. Any other first run that races
    # the gateway's own end (timeout, cancel) sees its cancel key, or loses at the
    # unique constraint and defers to the winner (_append_terminal).
    # The deadline is judged at the take, read before the claim: a gateway whose
    # timeout finds the claim (SET … GET answers "started") waits for this run's
    # counts, so a run that claimed in time must not call itself late because its
    # process was held up between the claim and a later clock read.
    taken_ns = time.time_ns()
    try:
        first_run = channel.claim_start()
    except PutBack:
        log.info("request %s gave way to a fairer job: back at the head of its queue", job.request_id)
        return PUT_BACK
    looked = not first_run or _waited_long(job, taken_ns)
    if looked:
        try:
            existing = store.terminal_for(job.request_id)
        except AuditError as exc:  # the audit store cannot say whether the request ended, nor record a run:
            # an audit outage, answered 503 audit_unavailable and its end kept for later, not a worker's
            # failure (probe s59 G1: a frozen PostgreSQL made these 502 worker_error)
            raise _Unrecorded(FAILED, {"error": {"code": "audit_unavailable", "message": "the audit store could "
                                                 "not be read before the run"}, "worker": worker}, exc) from exc
        if existing is not None:
            log.info("request %s already ended as %s; not generating again", job.request_id, existing.kind)
            return result_from_entry(existing)

    started_ns = time.time_ns()
    queue_ms = (taken_ns - job.enqueued_at_ns) / 1e6 if job.enqueued_at_ns else None
    if channel.cancel_requested():  # the client left (or the gateway timed the request out) while it was queued
        kind = _stop_kind(channel)
        return _record_end(job, store, kind, "", 0, 0, None, worker, queue_ms, started_ns, digester,
                           message=_stop_message(kind, channel))
    if job.deadline_ns and taken_ns > job.deadline_ns:  # nobody waits for it any more (its gateway may be gone)
        return _record_expired(job, store, worker, queue_ms, digester)
    # A job that waited may be a dead gateway's: nobody would receive it. (Not a redelivered stream: its end
    # keeps what the first run sent, below.)
    if looked and (first_run or not job.stream) and channel.gateway_gone():
        return _record_gateway_gone(job, store, worker, queue_ms, digester)
    if not first_run and job.stream:
        # The client already received what the first run published: record it.
        return _record_failure(job, store, WORKER_LOST, STREAM_WORKER_LOST, worker,
                               output=channel.streamed_text(), digester=digester)
    if not first_run:
        runs = channel.count_run()
        if runs is not None and runs > MAX_JOB_RUNS:  # the job itself ends its worker, it seems: not again
            log.error("request %s: its job's %d earlier runs never finished (their worker died or stalled); "
                      "recorded failed, not run again", job.request_id, runs - 1)
            return _record_failure(job, store, WORKER_LOST,
                                   f"this job's {runs - 1} earlier runs never finished (their worker died or "
                                   "stalled); it is not run again", worker)
    text: list[str] = []
    run = None
    ending = None
    try:
        prompt, format_stops = prompt_for(job, model)
        run = model.stream(prompt, job.params.with_stops(format_stops))
        try:
            for piece in run:
                text.append(piece)
                channel.publish(piece)
                if channel.cancel_requested():
                    ending = _stop_kind(channel)
                    break
        finally:  # however the generation ended, the stream has all of it before the end is recorded
            channel.flush()
    except SoftTimeLimitExceeded:
        ending = STATUS_TIMED_OUT
    except PromptTooLongError as exc:
        return _record_failure(job, store, "context_length_exceeded", str(exc), worker)
    except BackendError as exc:
        return _record_failure(job, store, "generation_failed", str(exc), worker, output=_sent(job, text),
                               digester=digester)
    except RedisError as exc:  # the job's channel (pieces, the cancel flag) lost Redis: not a model bug
        log.warning("request %s: its channel to the gateway failed mid-generation (Redis: %s); recorded failed",
                    job.request_id, exc)
        return _record_failure(job, store, "worker_error", f"the job's channel to its gateway failed "
                               f"(Redis): {type(exc).__name__}: {exc}", worker, output=_sent(job, text),
                               digester=digester)
    except Exception as exc:  # a model bug must still end the request in the log
        log.exception("generation for %s crashed", job.request_id)
        return _record_failure(job, store, "worker_error", f"{type(exc).__name__}: {exc}", worker,
                               output=_sent(job, text), digester=digester)
    finally:
        # Frees the model at once, however the loop ended: a failure's return left the run open, to be freed
        # only when nothing held it, and the failure's log record held it (its exception's traceback, the frame,
        # the run): each later job of the worker failed "already generating on this thread" (probe s55 F1).
        # Closing a run that reached its end changes nothing.
        if run is not None:
            run.close()
    prompt_tokens = run.prompt_tokens if run is not None else 0
    completion_tokens = run.completion_tokens if run is not None else 0
    kind = ending or "completion"
    finish = run.finish_reason if run is not None and ending is None else None
    if job.check_output and (ending is None or (ending == STATUS_CANCELLED and channel.stopped_by_rules())):
        ended_ns = time.time_ns()
        generated = Generated("".join(text), prompt_tokens, completion_tokens, finish, worker, queue_ms,
                              (ended_ns - started_ns) / 1e6, ended_ns)
        timeout_s = verdict_timeout_s
        if job.deadline_ns:  # past the deadline its gateway has ended the request already
            timeout_s = min(timeout_s, max(0.0, (job.deadline_ns - ended_ns) / 1e9))
        if job.output_rule_absent:  # nothing to judge it by: its gateway would answer "allow, whole"
            verdict = OutputVerdict.unruled(generated.output, job.policy_revision)
        elif job.gateway_records and not job.stream and ending is None and pending is not None:
            if _hand_over(job, generated, channel, pending, timeout_s, digester, store):
                return HANDED_OVER
            verdict = None  # nobody can judge it: recorded unchecked, here and now
        else:
            try:
                verdict = channel.await_verdict(OutputReport(generated.output, stopped=ending is not None),
                                                timeout_s)
            except SoftTimeLimitExceeded:  # the time limit came while waiting: recorded unchecked, never lost
                verdict = None
        return _record_checked(job, store, verdict, generated, digester)
    if ending in _VERDICT_ENDS and job.stream and job.check_output and not job.output_rule_absent:
        # Cancelled mid-stream (its client left, its gateway stopped) or stopped by its gateway's timeout:
        # the gateway's verdict says what the client received, which only it knows (it held text back to
        # judge it). Its kind is the verdict's (``timed_out`` or ``cancelled``).
        verdict = channel.cancelled_verdict()
        if verdict is not None:
            ended_ns = time.time_ns()
            generated = Generated("".join(text), prompt_tokens, completion_tokens, None, worker, queue_ms,
                                  (ended_ns - started_ns) / 1e6, ended_ns)
            return _record_checked(job, store, verdict, generated, digester)
    return _record_end(job, store, kind, "".join(text), prompt_tokens, completion_tokens, finish, worker,
                       queue_ms, started_ns, digester, message=_stop_message(kind, channel))


#: The ends of a checked stream its gateway stopped whose entry takes the gateway's ``cancelled`` verdict.
_VERDICT_ENDS = frozenset({STATUS_CANCELLED, STATUS_TIMED_OUT})


def _waited_long(job: GenerateJob, taken_ns: int) -> bool:
    """Whether ``job`` waited in its queue long enough that its gateway may have ended its request unseen
    (:data:`~workers.contract.jobs.ENDED_UNSEEN_AFTER_S`); a job that does not say when it was queued did not."""
    return bool(job.enqueued_at_ns) and taken_ns - job.enqueued_at_ns >= ENDED_UNSEEN_AFTER_S * 1e9


def _stop_kind(channel: JobChannel) -> str:
    """How a generation its gateway asked to stop ends: ``timed_out`` when the gateway's request timeout
    asked (``STOP_TIMED_OUT``), ``cancelled`` for any other stop (a client gone, the output rules)."""
    return STATUS_TIMED_OUT if channel.stopped_by_timeout() else STATUS_CANCELLED


def _stop_message(kind: str, channel: JobChannel) -> str | None:
    """The error message of an end its gateway's timeout, or its key's revocation, asked for (None: the
    kind's usual one; a ``timed_out`` of the worker's own time limit says so)."""
    if kind == STATUS_TIMED_OUT and channel.stopped_by_timeout():
        return GATEWAY_TIMEOUT_MESSAGE
    if kind == STATUS_CANCELLED and channel.stopped_by_revocation():
        return KEY_REVOKED_MESSAGE
    return None


def _hand_over(job: GenerateJob, generated: Generated, channel: JobChannel, pending: PendingTerminals,
               timeout_s: float, digester: Digester | None, store: EntryStore) -> bool:
    """Give a finished output to the gateway that records it; keep the unchecked end as a fallback.

    The fallback is what this worker would record had no verdict come:
    ``failed``/``output_unchecked`` with the output as logging allows. Kept
    with ``not_before`` at the moment this worker would have given up
    waiting, it is written by a retry only if the gateway did not record the
    end by then (the gateway died, or Redis lost the report).
    """
    fallback = checked_ending(job, None, generated.finish_reason, digester)
    body = generation_body(job, generated, digester, finish_reason=fallback.finish_reason, error=fallback.error)
    handed_over = generated.to_payload()
    entry = PendingTerminal(kind=fallback.kind, request_id=job.request_id, principal=job.principal, team=job.team,
                            model=job.model, body=body, policy_revision=job.policy_revision,
                            not_before=time.time() + timeout_s,
                            report={"output": generated.output, "handed_over": handed_over})
    report = OutputReport(generated.output, handed_over=handed_over)

    def unchecked() -> JobResult:
        """What the job records had Redis refused the hand-over (called later when the transport's take
        carried it and failed, and its hand-over on its own was refused too)."""
        try:
            return _record_checked(job, store, None, generated, digester)
        except _Unrecorded as lost:
            return _keep(job, lost, pending, digester)

    return channel.hand_over(report, pending.sealed(entry), unchecked)


def _sent(job: GenerateJob, text: list[str]) -> str | None:
    """The text a failing stream already sent to its client (None when nothing was sent)."""
    return "".join(text) if job.stream and text else None


def _record_end(job: GenerateJob, store: EntryStore, kind: str, output: str, prompt_tokens: int,
                completion_tokens: int, finish_reason: str | None, worker: dict[str, Any],
                queue_ms: float | None, started_ns: int, digester: Digester | None, *,
                message: str | None = None) -> JobResult:
    """Write the terminal entry of an unchecked generation that ran (completed, cancelled or timed out);
    ``message``: its error's, when not the kind's usual one."""
    generated = Generated(output, prompt_tokens, completion_tokens, finish_reason, worker, queue_ms,
                          (time.time_ns() - started_ns) / 1e6)
    error = None if kind == "completion" else {"code": kind, "message": message or _END_MESSAGES[kind]}
    return _record(job, store, kind, generated, digester, finish_reason=finish_reason, error=error)


def _record_checked(job: GenerateJob, store: EntryStore, verdict: OutputVerdict | None, generated: Generated,
                    digester: Digester | None) -> JobResult:
    """Write the terminal entry of a checked generation, per its gateway's verdict (None: none came).

    What goes into it is :func:`workers.contract.terminal_body.checked_ending`'s,
    as when the gateway records a handed-over output; the time spent waiting
    for the verdict is the entry's ``timings.verdict_ms``.
    """
    ending = checked_ending(job, verdict, generated.finish_reason, digester)
    return _record(job, store, ending.kind, generated, digester, checked=ending.checked, findings=ending.findings,
                   finish_reason=ending.finish_reason, served=ending.served, error=ending.error,
                   extra_timings={"verdict_ms": generated.waited_ms(time.time_ns())})


def _record(job: GenerateJob, store: EntryStore, kind: str, generated: Generated, digester: Digester | None, *,
            finish_reason: str | None, error: dict[str, str] | None, checked: dict[str, Any] | None = None,
            findings: list[dict[str, str]] | None = None, served: str | None = None,
            extra_timings: dict[str, float] | None = None) -> JobResult:
    """Append a generation's terminal entry; its client's result (or the earlier end it lost to)."""
    body = generation_body(job, generated, digester, checked=checked, findings=findings, finish_reason=finish_reason,
                           error=error, extra_timings=extra_timings)
    entry = _append_terminal(job, store, kind, body)
    if isinstance(entry, JobResult):
        return entry
    return ended_result(kind, generated, entry.seq, finish_reason=finish_reason, served=served, error=error)


_END_MESSAGES = {
    STATUS_CANCELLED: "generation was cancelled (the client went away or the gateway gave up)",
    STATUS_TIMED_OUT: "generation hit the worker's time limit",
}


def _not_generated(job: GenerateJob, digester: Digester | None) -> dict[str, Any]:
    """The output fields of an end recorded before anything was generated, in the shape ``prompt_logging``
    gives every other end: ``hash`` and ``none`` keep no payload (a bare ``"output": ""`` made one, with its
    salt, that the level promises not to write; probe s56)."""
    return logged_output("", job.prompt_logging, job.redact, digester)


def _record_expired(job: GenerateJob, store: EntryStore, worker: dict[str, Any],
                    queue_ms: float | None, digester: Digester | None = None) -> JobResult:
    """A job taken after its deadline: not generated, recorded as ``timed_out`` with code ``expired``."""
    error = {"code": "expired", "message": "the request's deadline passed before a worker took it"}
    body = {**_not_generated(job, digester), "error": error, "worker": worker, "timings": {"queue_ms": queue_ms}}
    entry = _append_terminal(job, store, STATUS_TIMED_OUT, body)
    if isinstance(entry, JobResult):
        return entry
    return JobResult(status=STATUS_TIMED_OUT, audit_seq=entry.seq, error=error)


#: The error of a job whose gateway was gone when a worker took it (``workers.contract.gateway_liveness``).
GATEWAY_GONE_ERROR = {"code": GATEWAY_GONE,
                      "message": "the request's gateway was gone (killed, or stopped) before a worker took "
                                 "the request; not generated"}


def _record_gateway_gone(job: GenerateJob, store: EntryStore, worker: dict[str, Any],
                         queue_ms: float | None, digester: Digester | None = None) -> JobResult:
    """A job whose gateway is gone: not generated (no one would receive it), recorded ``cancelled`` with code
    ``gateway_gone``; its outcome, published to no one, names it for any gateway to settle its usage."""
    log.warning("request %s: its gateway is gone; cancelled, not generated", job.request_id)
    body = {**_not_generated(job, digester), "error": dict(GATEWAY_GONE_ERROR), "worker": worker,
            "timings": {"queue_ms": queue_ms}}
    entry = _append_terminal(job, store, STATUS_CANCELLED, body)
    if isinstance(entry, JobResult):
        return entry
    return JobResult(status=STATUS_CANCELLED, audit_seq=entry.seq, error=dict(GATEWAY_GONE_ERROR))


def _record_failure(job: GenerateJob, store: EntryStore, code: str, message: str,
                    worker: dict[str, Any], *, output: str | None = None,
                    digester: Digester | None = None) -> JobResult:
    """Write a ``failed`` entry; text a stream already sent is kept as ``prompt_logging`` allows."""
    error = {"code": code, "message": message}
    body: dict[str, Any] = {"error": error, "worker": worker}
    if output is not None:  # a stream's text, never judged whole
        body.update(logged_output(output, job.prompt_logging, job.redact, digester,
                                  unjudged=not judged_whole(job, None, None, error)))
    entry = _append_terminal(job, store, "failed", body)
    if isinstance(entry, JobResult):
        return entry
    return JobResult(status=STATUS_FAILED, audit_seq=entry.seq, error=error)


def _append_terminal(job: GenerateJob, store: EntryStore, kind: str,
                     body: dict[str, Any]) -> AuditEntry | JobResult:
    """Append the terminal entry; if another process ended the request first, defer to it."""
    metadata, texts = split_texts(body)  # the output goes to the erasable payload
    try:
        return store.append(kind, job.request_id, principal=job.principal, team=job.team,
                            model=job.model, body=metadata, policy_revision=job.policy_revision, payload=texts)
    except DuplicateTerminalError:
        winner = store.terminal_for(job.request_id)
        log.warning("request %s was ended elsewhere first (%s); dropping this %s",
                    job.request_id, winner.kind if winner else "?", kind)
        if winner is None:  # pragma: no cover - the constraint implies a winner exists
            raise
        return result_from_entry(winner)
    except AuditError as exc:  # unaudited output must not be served: run_job keeps the entry for later
        raise _Unrecorded(kind, body, exc) from exc
