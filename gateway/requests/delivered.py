"""What a stream's client received, recorded when the stream's terminal entry cannot say it.

A stream under output rules is judged window by window at the gateway, and
only the gateway knows what it released: the worker learns it from the
verdict at the end, and its terminal entry keeps it as ``client_output``. A
stream that ends otherwise (Redis dies mid-text: the worker's next piece
meets no Redis and it records ``failed`` ``worker_error`` at once, with what
it generated as ``output``) had an end that said nothing of what reached the
client, and the gateway that knew could not add it: the one terminal entry
was written. :func:`record_delivered` appends a ``delivered`` entry
(``audit.kinds.DELIVERED``, not terminal) beside it: the terminal entry's
seq and kind, the decision on the windows judged and what the client
received, kept as the request's ``prompt_logging`` allows, as the worker's
entry would have kept them. It runs only when such a stream ends in an
error: one look-up of the request's entries, and an append when its end's
``client_output`` is missing or is not what the client received, and no
``delivered`` entry says it already (a try whose commit was reported failed).

A stream with no output rules (``GOVGATE_OUTPUT_RULES`` off, or a policy
revision without an output rule) is relayed as it comes, and its worker's
end never says what the client received: its ``output`` is what the worker
sent, give or take what was in transit when the stream broke (Redis gone,
the worker killed, a result that does not match the text sent). It gets the
same entry, without an ``output_decision`` (nothing was judged), its
``client_output`` masked for the policy's own ``redact`` findings only.

The end may not be in the log yet: a database that refused the worker's
entry has it kept pending (written when the database is back, by the
worker's retry, without the verdict's ``client_output``: the gateway, told
the end was not recorded, sends ``audit_unavailable`` instead of the last
window, so only it knows what the client got), or lost with Redis (the lost-request
sweep ends it later); and a database that refuses the gateway's look-up or
append leaves the same question open. Such an entry waits in :class:`DeliveredLater`
and is tried again every ``GOVGATE_TERMINAL_RETRY_INTERVAL_S`` for
``GOVGATE_TERMINAL_RETRY_HORIZON_S``, as the kept end is: in this process's
memory only (what the client received is not put in Redis or on disk for
it), so a gateway that stops or dies first leaves it unrecorded (logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

from audit import AuditEntry, AuditError
from audit.kinds import DELIVERED
from gateway.requests.holdback import HoldBack
from gateway.requests.ticket import Ticket
from workers.contract.output_check import logged_client_output
from workers.contract.terminal_body import judged_fields

if TYPE_CHECKING:
    from gateway.requests.outcome import TicketRunner

log = logging.getLogger(__name__)


def said_delivered(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What ``fields`` (an entry's body and payload, or a body before its texts are split off) record of
    what the client received: its ``client_output`` fields (in clear, masked, or a digest and length)."""
    return {key: value for key, value in fields.items() if key.startswith("client_output")}


def says_what_was_delivered(entry: AuditEntry) -> dict[str, Any]:
    """What an entry (its terminal one, or a ``delivered`` one) records of what its client received (empty: nothing)."""
    return {**said_delivered(entry.body), **said_delivered(entry.payload or {})}


#: Entries waiting for their end at once, at most: each holds what its client received, in memory.
MOST_WAITING = 256
#: The gateway's stop looks once more for the ends still waited for, for this long at most.
LAST_LOOK_S = 2.0


class EndNotRecorded(Exception):
    """The request's end is not in the audit log (yet): its worker keeps it pending."""


async def record_delivered(runner: TicketRunner, ticket: Ticket, hold: HoldBack | None,
                           delivered: str) -> AuditEntry | None:
    """Append the ``delivered`` entry of a stream that ended in an error after text, unless its end says what
    the client received (``delivered``) as this entry would; the entry appended, or None. ``hold``: a checked
    stream's windows (None: the stream had no output rules). Never raises: a stream's answer is its error
    event either way. An end not in the log yet, or a database that refuses, leaves the entry to
    ``runner.delivered_later`` (no text in what is logged)."""
    judged = _what_was_delivered(runner, ticket, hold, delivered)  # now: a hold is the stream's, and ends with it

    async def attempt() -> AuditEntry | None:
        entries = await runner.request_log.entries_for(ticket.request_id)
        end = next((entry for entry in entries if entry.terminal_request_id is not None), None)
        if end is None:
            raise EndNotRecorded(ticket.request_id)
        # An end may say otherwise: one a worker kept before 2026-12-05 held the verdict's text, though the
        # gateway ended the stream with an error instead of the last window (nothing unaudited). An entry
        # that says it already is a try of this one whose commit was reported as failed (a connection lost
        # after COMMIT): it is not appended twice.
        told = said_delivered(judged)
        if says_what_was_delivered(end) == told or any(
                entry.kind == DELIVERED and entry.body.get("terminal_seq") == end.seq
                and says_what_was_delivered(entry) == told for entry in entries):
            return None
        body: dict[str, Any] = {"terminal_seq": end.seq, "ended_as": end.kind, **judged}
        return await runner.request_log.record_delivered(ticket, body)

    try:
        return await attempt()
    except EndNotRecorded:  # kept pending by its worker (whose kept end may say it: then nothing is added)
        log.info("what the client of %s received waits for the request's end, not in the audit log yet",
                 ticket.request_id)
    except (AuditError, OSError) as exc:
        log.warning("could not record what the client of %s received yet: %s: %s; tried again",
                    ticket.request_id, type(exc).__name__, exc)
    runner.delivered_later.keep(ticket.request_id, attempt)
    return None


def _what_was_delivered(runner: TicketRunner, ticket: Ticket, hold: HoldBack | None,
                        delivered: str) -> dict[str, Any]:
    """The entry's fields besides the end it completes: a checked stream's decision on its windows and
    what its client received, as its worker's end would keep them; an unchecked one's text only."""
    rules = runner.output_rules
    if hold is not None and rules is not None:
        return judged_fields(ticket.job, rules.standing(hold, client_text=delivered), runner.digester)
    return logged_client_output(delivered, ticket.job.prompt_logging, ticket.job.redact, runner.digester)


class DeliveredLater:
    """The ``delivered`` entries that wait for their end (or for the database), tried again in one task.

    One look-up at a time, oldest first, every ``interval_s``; a database error ends that look (the others
    would meet it too), an end that never comes within ``horizon_s`` is given up (logged). At most
    ``most`` wait at once: past it, and at the gateway's stop, an entry is logged as not recorded.
    """

    def __init__(self, *, interval_s: float, horizon_s: float, most: int = MOST_WAITING) -> None:
        self._interval_s = interval_s
        self._horizon_s = horizon_s
        self._most = most
        #: request id -> (the attempt, the monotonic time it is given up at)
        self._waiting: dict[str, tuple[Callable[[], Awaitable[object]], float]] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def keep(self, request_id: str, attempt: Callable[[], Awaitable[object]]) -> None:
        """Try ``attempt`` again until it returns (it raises :class:`EndNotRecorded`, ``AuditError`` or
        ``OSError`` while it cannot be done)."""
        if request_id not in self._waiting and len(self._waiting) >= self._most:
            log.error("what the client of %s received is not recorded: %d such entries wait for their ends "
                      "already", request_id, len(self._waiting))
            return
        self._waiting[request_id] = (attempt, time.monotonic() + self._horizon_s)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="govgate-delivered-later")

    async def _run(self) -> None:
        while self._waiting:
            await asyncio.sleep(self._interval_s)
            await self.look_once()

    async def look_once(self) -> None:
        """Try each waiting entry once, oldest first, until the database refuses."""
        now = time.monotonic()
        for request_id, (attempt, until) in list(self._waiting.items()):
            try:
                written = await attempt()
            except (EndNotRecorded, AuditError, OSError) as exc:
                if now >= until:
                    del self._waiting[request_id]
                    log.error("what the client of %s received is not recorded: gave up after %.0f s (%s)",
                              request_id, self._horizon_s, type(exc).__name__)
                if not isinstance(exc, EndNotRecorded):
                    return  # the database is away: the others wait for the next look
                continue
            except Exception:  # noqa: BLE001 - a bug must not end the others' waits
                del self._waiting[request_id]
                log.exception("what the client of %s received is not recorded", request_id)
                continue
            del self._waiting[request_id]
            if written is None:
                log.info("the entries of %s say what its client received already", request_id)
            else:
                log.info("what the client of %s received is recorded now", request_id)

    async def aclose(self) -> None:
        """Stop looking, after one last look (at most :data:`LAST_LOOK_S`): a stream cut by the stop itself
        waits for the end its worker records a moment after the cut. The entries still waiting then are
        logged as not recorded."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._waiting:
            try:
                await asyncio.wait_for(self.look_once(), LAST_LOOK_S)
            except TimeoutError:
                log.warning("the last look for the ends of %d stream(s) took longer than %gs", len(self._waiting),
                            LAST_LOOK_S)
        if self._waiting:
            log.warning("what the clients of %d stream(s) received is not recorded: the gateway stopped before "
                        "their ends were in the audit log (%s)", len(self._waiting),
                        ", ".join(list(self._waiting)[:10]))
            self._waiting.clear()
