"""Recording an output its worker handed over: judge it whole, write its terminal entry, drop the fallback.

A worker that finished a non-streamed completion under the output rules
does not wait for the verdict (its pool process would idle while this
gateway judges, and under a burst of admissions that wait was most of a
job's time): it reports the output with everything the terminal entry
needs, keeps a fallback entry (``failed``/``output_unchecked``) in the
pending terminals, and takes its next job. This gateway judges the output,
writes the entry the worker would have written (built by the same code,
``workers/contract/terminal_body.py``) and drops the fallback. Exactly one
terminal entry still ends the request: the database's unique terminal
constraint decides between this entry, the fallback (written by a retry
only after the worker's verdict timeout) and the gateway's own timeout.

A report lost with the gateway's pub/sub connection leaves the fallback
alone in Redis; the reconnecting gateway finds it
(``gateway/dispatch/results.py``) and ends the request from it at once: as
if the report had come when the fallback holds the output as generated,
else by writing the fallback. See docs/architecture.md, "Output rules".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from audit import DuplicateTerminalError
from gateway.requests.fallback_drops import FallbackDrops
from gateway.requests.holdback import HoldBack
from gateway.requests.output_rules import OutputRules
from gateway.requests.request_log import RequestLog
from gateway.requests.ticket import Ticket
from workers.contract.jobs import STATUS_FAILED, JobResult
from workers.contract.output_check import OutputReport, logged_client_output
from workers.contract.privacy import Digester
from workers.contract.terminal_body import Generated, checked_ending, ended_result, generation_body

log = logging.getLogger(__name__)

#: The result when the database refused the entry (kept pending; the client is told, nothing is served);
#: it carries the generation's token counts, charged as for any generation that ran.
_UNRECORDED = JobResult(status=STATUS_FAILED,
                        error={"code": "audit_unavailable", "message": "the audit store cannot be written"})


def handed_over_tokens(report: OutputReport) -> int | None:
    """The prompt and completion tokens a handed-over output's report says were used (None: unreadable).

    What the request is charged however its record goes (:meth:`HandedOver.record`), so the
    gateway may settle its usage while the output is still being judged and recorded.
    """
    if report.handed_over is None:
        return None
    try:
        generated = Generated.from_payload(report.text, report.handed_over)
    except (KeyError, TypeError, ValueError):
        return None
    return generated.prompt_tokens + generated.completion_tokens


def _unrecorded(generated: Generated) -> JobResult:
    return dataclasses.replace(_UNRECORDED, error=dict(_UNRECORDED.error), prompt_tokens=generated.prompt_tokens,
                               completion_tokens=generated.completion_tokens, queue_ms=generated.queue_ms)


class HandedOver:
    """Records handed-over outputs for one gateway process."""

    def __init__(self, *, rules: OutputRules, request_log: RequestLog, drops: FallbackDrops,
                 digester: Digester) -> None:
        self.rules = rules
        self.request_log = request_log
        #: Removes fallbacks no longer needed, in batches and off the request's path.
        self.drops = drops
        self.digester = digester

    async def record(self, ticket: Ticket, hold: HoldBack, report: OutputReport, *,
                     abandoned: bool = False) -> JobResult | None:
        """Judge and record ``report``'s output; the request's result (None: the report is unreadable).

        An unreadable report is left alone: the worker's fallback ends the
        request (written by this gateway's timeout, or by a retry).
        ``abandoned``: the client left; what it received stays what ``hold`` released.
        """
        assert report.handed_over is not None
        try:
            generated = Generated.from_payload(report.text, report.handed_over)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("unreadable hand-over of %s: %s", ticket.request_id, exc)
            return None
        # What the client has by now: a stream the windows released before this one; a non-streamed
        # request nothing. The rest goes out only once the entry is written (:meth:`RequestLog.record_end`).
        delivered = hold.client_text if ticket.job.stream else ""
        verdict = await self.rules.verdict_on(ticket, hold, report, abandoned=abandoned)
        ending = checked_ending(ticket.job, verdict, generated.finish_reason, self.digester)
        body = generation_body(ticket.job, generated, self.digester, checked=ending.checked,
                               findings=ending.findings, finish_reason=ending.finish_reason, error=ending.error,
                               extra_timings={"handed_over_ms": generated.waited_ms(time.time_ns())})
        withheld = logged_client_output(delivered, ticket.job.prompt_logging,
                                        [*ticket.job.redact, *verdict.logged_redact],
                                        self.digester) if ending.checked else None
        try:
            entry = await self.request_log.record_end(ticket, ending.kind, body, withheld_client=withheld)
        except DuplicateTerminalError:  # the request ended first elsewhere: that entry is its answer
            winner = await self.request_log.terminal_for(ticket.request_id)
            self.drops.drop(ticket.request_id)
            if winner is None:  # pragma: no cover - the constraint implies a winner exists
                return _unrecorded(generated)
            log.warning("request %s was ended elsewhere first (%s); dropping its handed-over %s",
                        ticket.request_id, winner.kind, ending.kind)
            return JobResult.from_terminal(winner.kind, winner.seq, winner.body, winner.payload)
        if entry is None:  # kept pending in the fallback's place
            return _unrecorded(generated)
        self.drops.drop(ticket.request_id)  # the request has its terminal entry: the fallback is not needed
        return ended_result(ending.kind, generated, entry.seq, finish_reason=ending.finish_reason,
                            served=ending.served, error=ending.error)

    async def record_fallback(self, ticket: Ticket, hold: HoldBack, entry: dict[str, Any], *,
                              abandoned: bool = False) -> JobResult | None:
        """End a request whose report was lost, from the fallback its worker kept (``PendingTerminal`` fields).

        A fallback holds what its report held but the output only as
        ``prompt_logging`` allows: when that is the output as generated (full
        logging, or redacted logging with nothing masked), it is judged and
        recorded as the report would have been (:meth:`record`); otherwise the
        fallback itself is written now (``failed``/``output_unchecked``: the
        client gets 503) rather than at the request timeout. Either way the
        unique terminal constraint decides against any other end. None: the
        fallback cannot be read (the request timeout writes it).
        """
        report = report_of(entry)
        if report is not None:
            return await self.record(ticket, hold, report, abandoned=abandoned)
        kind, body = entry.get("kind"), entry.get("body")
        if not isinstance(kind, str) or not isinstance(body, dict):
            log.error("unreadable fallback of %s", ticket.request_id)
            return None
        winner = await self.request_log.end(ticket, kind, body)  # the kept fallback itself, written first
        if winner is None:  # the database refused it: still kept, written later
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
            return JobResult(status=STATUS_FAILED, error=dict(_UNRECORDED.error),
                             prompt_tokens=int(usage.get("prompt_tokens") or 0),
                             completion_tokens=int(usage.get("completion_tokens") or 0))
        return JobResult.from_terminal(winner.kind, winner.seq, winner.body, winner.payload)

    async def aclose(self) -> None:
        await self.drops.aclose()


def report_of(entry: dict[str, Any]) -> OutputReport | None:
    """The report a fallback stands for, if it holds the output as generated (None: it does not, or is unreadable).

    A worker keeps the report itself beside its fallback (``report``, since
    2026-11-30), whatever the logging. A fallback from before holds only its
    body, :func:`~workers.contract.terminal_body.generation_body`'s for the
    unjudged output: its counts, finish reason, timings and worker are the
    report's; the output is the report's text unless logging kept only a
    digest or masked it, and when generation ended is taken from when the
    fallback was made (``since``), right after it.
    """
    kept = entry.get("report")
    if isinstance(kept, dict) and isinstance(kept.get("output"), str) and isinstance(kept.get("handed_over"), dict):
        try:
            Generated.from_payload(kept["output"], kept["handed_over"])  # what record() will read
        except (KeyError, TypeError, ValueError):
            return None
        return OutputReport(kept["output"], handed_over=kept["handed_over"])
    body = entry.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("output"), str) or body.get("output_masked"):
        return None
    usage, timings = body.get("usage"), body.get("timings")
    if not isinstance(usage, dict) or not isinstance(timings, dict):
        return None
    payload = {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
               "finish_reason": body.get("finish_reason"), "worker": body.get("worker"),
               "queue_ms": timings.get("queue_ms"), "generate_ms": timings.get("generate_ms")}
    try:
        payload["ended_ns"] = int(float(entry.get("since") or 0) * 1e9)
        Generated.from_payload(body["output"], payload)  # what record() will read
    except (KeyError, TypeError, ValueError):
        return None
    return OutputReport(body["output"], handed_over=payload)
