"""What a checked stream's client received, recorded when the stream's terminal entry cannot say it.

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
error: one look-up of the request's end, and an append when that end lacks
``client_output``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from audit import AuditEntry, AuditError
from audit.kinds import DELIVERED
from gateway.requests.holdback import HoldBack
from gateway.requests.ticket import Ticket
from workers.contract.terminal_body import judged_fields

if TYPE_CHECKING:
    from gateway.requests.outcome import TicketRunner

log = logging.getLogger(__name__)


def says_what_was_delivered(entry: AuditEntry) -> bool:
    """Whether a terminal entry records what its client received (in clear, masked, or as a digest and length)."""
    return any(key.startswith("client_output") for part in (entry.body, entry.payload or {}) for key in part)


async def record_delivered(runner: TicketRunner, ticket: Ticket, hold: HoldBack, delivered: str) -> AuditEntry | None:
    """Append the ``delivered`` entry of a checked stream that ended in an error, if its end does not say
    what the client received (``delivered``); the entry appended, or None. Never raises: a stream's answer
    is its error event either way, and a failure is logged (no text in it)."""
    rules = runner.output_rules
    if rules is None:
        return None
    try:
        end = await runner.request_log.terminal_for(ticket.request_id)
        if end is None:  # kept pending (the database refused it): what it lacks stays unrecorded
            log.warning("what the client of %s received is not recorded: its end is not in the audit log",
                        ticket.request_id)
            return None
        if says_what_was_delivered(end):
            return None
        verdict = rules.standing(hold, client_text=delivered)
        body: dict[str, Any] = {"terminal_seq": end.seq, "ended_as": end.kind,
                                **judged_fields(ticket.job, verdict, runner.digester)}
        return await runner.request_log.record_delivered(ticket, body)
    except (AuditError, OSError) as exc:
        log.error("could not record what the client of %s received: %s: %s", ticket.request_id,
                  type(exc).__name__, exc)
        return None
