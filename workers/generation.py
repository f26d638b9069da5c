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

from audit import AuditEntry, AuditError, AuditStore, DuplicateTerminalError
from audit.kinds import FAILED
from workers.backends import BackendError, LoadedModel, PromptTooLongError
from workers.contract.jobs import (STATUS_CANCELLED, STATUS_COMPLETED, STATUS_FAILED, STATUS_TIMED_OUT, GenerateJob,
                              JobResult)
from workers.contract.output_check import (FINISH_CONTENT_FILTER, OUTPUT_POLICY_UNAVAILABLE, OUTPUT_UNCHECKED,
                                           OutputReport, OutputVerdict, decision_record, logged_client_output)
from workers.contract.pending_terminals import PendingTerminal, PendingTerminals
from workers.contract.privacy import Digester, logged_output, split_texts
from workers.contract.prompts import render_chat
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


class _Unrecorded(Exception):
    """The database refused a terminal entry (past its busy timeout)."""

    def __init__(self, kind: str, body: dict[str, Any], cause: AuditError) -> None:
        super().__init__(str(cause))
        self.kind = kind
        self.body = body


def run_job(job: GenerateJob, model: LoadedModel, store: AuditStore, channel: JobChannel | None = None,
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
    and the client gets nothing (docs/architecture.md, "Output rules").
    """
    channel = channel or SilentChannel()
    worker = worker or {"hostname": socket.gethostname(), "pid": os.getpid()}
    try:
        return _run(job, model, store, channel, digester, worker, verdict_timeout_s)
    except _Unrecorded as lost:
        return _keep(job, lost, pending)
    finally:  # the outcome is recorded (or kept, or the process is dying): the stream's mirror is not needed
        channel.forget()


_WITHHELD = {"code": "audit_unavailable", "message": "the audit store could not be written when the request "
                                                     "ended; the output was withheld from the client"}


def _keep(job: GenerateJob, lost: _Unrecorded, pending: PendingTerminals | None) -> JobResult:
    """Keep the refused terminal entry for a later write; the client is told the audit is unavailable."""
    log.error("cannot record %s for %s: %s", lost.kind, job.request_id, lost)
    if pending is not None:
        body = {**lost.body, "error": _WITHHELD, "ended_as": lost.kind}
        pending.keep(PendingTerminal(kind=FAILED, request_id=job.request_id, principal=job.principal,
                                     team=job.team, model=job.model, body=body,
                                     policy_revision=job.policy_revision))
    return JobResult(status=STATUS_FAILED,
                     error={"code": "audit_unavailable", "message": "the audit store cannot be written"})


def _run(job: GenerateJob, model: LoadedModel, store: AuditStore, channel: JobChannel,
         digester: Digester | None, worker: dict[str, Any], verdict_timeout_s: float) -> JobResult:
    # The SET NX tells a first delivery from a redelivery; only a redelivery can
    # find the request already ended by an earlier run, so only it asks the
    # database. A first run that races the gateway's own end (timeout, cancel)
    # loses at the unique constraint and defers to the winner (_append_terminal).
    first_run = channel.claim_start()
    if not first_run:
        existing = store.terminal_for(job.request_id)
        if existing is not None:
            log.info("request %s already ended as %s; not generating again", job.request_id, existing.kind)
            return result_from_entry(existing)

    started_ns = time.time_ns()
    queue_ms = (started_ns - job.enqueued_at_ns) / 1e6 if job.enqueued_at_ns else None
    if channel.cancel_requested():  # the client left while the job was queued
        return _record_end(job, store, STATUS_CANCELLED, "", 0, 0, None, worker, queue_ms, started_ns, digester)
    if job.deadline_ns and started_ns > job.deadline_ns:  # nobody waits for it any more (its gateway may be gone)
        return _record_expired(job, store, worker, queue_ms)
    if not first_run and job.stream:
        # The client already received what the first run published: record it.
        return _record_failure(job, store, "worker_lost",
                               "the worker generating this stream died; a stream cannot be resumed", worker,
                               output=channel.streamed_text(), digester=digester)
    text: list[str] = []
    run = None
    ending = None
    try:
        prompt, format_stops = prompt_for(job, model)
        run = model.stream(prompt, job.params.with_stops(format_stops))
        for piece in run:
            text.append(piece)
            channel.publish(piece)
            if channel.cancel_requested():
                ending = STATUS_CANCELLED
                break
    except SoftTimeLimitExceeded:
        ending = STATUS_TIMED_OUT
    except PromptTooLongError as exc:
        return _record_failure(job, store, "context_length_exceeded", str(exc), worker)
    except BackendError as exc:
        return _record_failure(job, store, "generation_failed", str(exc), worker, output=_sent(job, text),
                               digester=digester)
    except Exception as exc:  # a model bug must still end the request in the log
        log.exception("generation for %s crashed", job.request_id)
        return _record_failure(job, store, "worker_error", f"{type(exc).__name__}: {exc}", worker,
                               output=_sent(job, text), digester=digester)
    finally:
        if run is not None and ending is not None:
            run.close()  # frees the model at once
    prompt_tokens = run.prompt_tokens if run is not None else 0
    completion_tokens = run.completion_tokens if run is not None else 0
    kind = ending or "completion"
    finish = run.finish_reason if run is not None and ending is None else None
    if job.check_output and (ending is None or (ending == STATUS_CANCELLED and channel.stopped_by_rules())):
        timeout_s = verdict_timeout_s
        if job.deadline_ns:  # past the deadline its gateway has ended the request already
            timeout_s = min(timeout_s, max(0.0, (job.deadline_ns - time.time_ns()) / 1e9))
        if job.output_rule_absent:  # nothing to judge it by: its gateway would answer "allow, whole"
            verdict = OutputVerdict.unruled("".join(text), job.policy_revision)
        else:
            try:
                verdict = channel.await_verdict(OutputReport("".join(text), stopped=ending is not None),
                                                timeout_s)
            except SoftTimeLimitExceeded:  # the time limit came while waiting: recorded unchecked, never lost
                verdict = None
        return _record_checked(job, store, verdict, "".join(text), prompt_tokens, completion_tokens, finish,
                               worker, queue_ms, started_ns, digester)
    return _record_end(job, store, kind, "".join(text), prompt_tokens, completion_tokens, finish, worker,
                       queue_ms, started_ns, digester)


def _sent(job: GenerateJob, text: list[str]) -> str | None:
    """The text a failing stream already sent to its client (None when nothing was sent)."""
    return "".join(text) if job.stream and text else None


def _record_end(job: GenerateJob, store: AuditStore, kind: str, output: str, prompt_tokens: int,
                completion_tokens: int, finish_reason: str | None, worker: dict[str, Any],
                queue_ms: float | None, started_ns: int, digester: Digester | None, *,
                checked: dict[str, Any] | None = None, findings: list[dict[str, str]] | None = None,
                served: str | None = None, error: dict[str, str] | None = None) -> JobResult:
    """Write the terminal entry of a generation that ran (completed, cancelled, timed out, or failed its check).

    ``checked`` holds the output check's fields (the decision, the client's
    text as logging allows), ``findings`` the output's findings (masked in
    a redacted log like the request's), ``served`` the text the client
    receives (the output when unchecked), ``error`` a failure's error (a
    ``kind`` other than ``completion`` or ``failed`` has its own).
    """
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    body: dict[str, Any] = {
        **logged_output(output, job.prompt_logging, [*job.redact, *(findings or ())], digester),
        **(checked or {}),
        "finish_reason": finish_reason,
        "usage": usage,
        "timings": {"queue_ms": queue_ms, "generate_ms": (time.time_ns() - started_ns) / 1e6},
        "worker": worker,
    }
    if error is not None:
        body["error"] = error
    elif kind != "completion":
        body["error"] = {"code": kind, "message": _END_MESSAGES[kind]}
    entry = _append_terminal(job, store, kind, body)
    if isinstance(entry, JobResult):
        return entry
    if kind == STATUS_FAILED:  # nothing of a failed generation is served
        return JobResult(status=STATUS_FAILED, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         audit_seq=entry.seq, error=body["error"], queue_ms=queue_ms)
    return JobResult(status=STATUS_COMPLETED if kind == "completion" else kind,
                     text=output if served is None else served, finish_reason=finish_reason,
                     prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, audit_seq=entry.seq,
                     error=body.get("error", {}), queue_ms=queue_ms)


def _record_checked(job: GenerateJob, store: AuditStore, verdict: OutputVerdict | None, output: str,
                    prompt_tokens: int, completion_tokens: int, finish_reason: str | None,
                    worker: dict[str, Any], queue_ms: float | None, started_ns: int,
                    digester: Digester | None) -> JobResult:
    """Write the terminal entry of a checked generation, per its gateway's verdict.

    The output is kept as generated (as ``prompt_logging`` allows, the
    output's findings masked too when it asks for redaction), beside the
    decision (findings as digests) and what the client received. A stopped
    generation is a ``completion`` with finish reason ``content_filter``.
    """
    def record(kind: str, finish: str | None, **fields: Any) -> JobResult:
        return _record_end(job, store, kind, output, prompt_tokens, completion_tokens, finish, worker, queue_ms,
                           started_ns, digester, **fields)

    if verdict is None:  # its gateway is gone, or Redis failed: nobody may serve it
        return record(STATUS_FAILED, finish_reason, error={
            "code": OUTPUT_UNCHECKED,
            "message": "no output verdict came from the gateway in time; the output was neither checked nor served"})
    checked = {"output_decision": decision_record(verdict, digester),
               **logged_client_output(verdict.client_text, job.prompt_logging, [*job.redact, *verdict.redact],
                                      digester)}
    if verdict.unavailable:  # the engine's reasons say why (no evaluator free, a timeout): no text in them
        why = "; ".join(str(reason.get("message", "")) for reason in verdict.decision.get("reasons") or ()
                        if isinstance(reason, dict))
        return record(STATUS_FAILED, finish_reason, checked=checked, findings=verdict.redact, error={
            "code": OUTPUT_POLICY_UNAVAILABLE,
            "message": f"the output rules could not be evaluated ({why or 'no answer'}); the output was withheld"})
    finish = FINISH_CONTENT_FILTER if verdict.stopped else finish_reason
    return record("completion", finish, checked=checked, findings=verdict.redact, served=verdict.client_text)


_END_MESSAGES = {
    STATUS_CANCELLED: "generation was cancelled (the client went away or the gateway gave up)",
    STATUS_TIMED_OUT: "generation hit the worker's time limit",
}


def _record_expired(job: GenerateJob, store: AuditStore, worker: dict[str, Any],
                    queue_ms: float | None) -> JobResult:
    """A job taken after its deadline: not generated, recorded as ``timed_out`` with code ``expired``."""
    error = {"code": "expired", "message": "the request's deadline passed before a worker took it"}
    body = {"output": "", "error": error, "worker": worker, "timings": {"queue_ms": queue_ms}}
    entry = _append_terminal(job, store, STATUS_TIMED_OUT, body)
    if isinstance(entry, JobResult):
        return entry
    return JobResult(status=STATUS_TIMED_OUT, audit_seq=entry.seq, error=error)


def _record_failure(job: GenerateJob, store: AuditStore, code: str, message: str,
                    worker: dict[str, Any], *, output: str | None = None,
                    digester: Digester | None = None) -> JobResult:
    """Write a ``failed`` entry; text a stream already sent is kept as ``prompt_logging`` allows."""
    error = {"code": code, "message": message}
    body: dict[str, Any] = {"error": error, "worker": worker}
    if output is not None:
        body.update(logged_output(output, job.prompt_logging, job.redact, digester))
    entry = _append_terminal(job, store, "failed", body)
    if isinstance(entry, JobResult):
        return entry
    return JobResult(status=STATUS_FAILED, audit_seq=entry.seq, error=error)


def _append_terminal(job: GenerateJob, store: AuditStore, kind: str,
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
