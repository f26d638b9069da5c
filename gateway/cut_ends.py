"""Before the closing audit checkpoint, wait (bounded) for the ends of the requests the drain cut.

A request the drain cut has its answer (503 ``shutting_down``, or a stream's error event), but not always
its end: a job its worker was running stops at the cancel key between two tokens, and that worker records
``cancelled`` (with what the client received) a moment later, seconds with a slow model. The gateway then
had already signed its closing checkpoint and exited, so the end came after it: ``govgate audit verify``,
run while the stack was down after an ordinary Ctrl-C, said ``checkpoints UNVERIFIED`` (an unsigned tail
after a closing checkpoint) and the next start recorded a ``chain_anomaly`` for it (probe s54 A1).

So the app's shutdown, after the drain and before its parts close (the checkpointer last), looks for each
cut request's terminal entry every :data:`POLL_S`, for at most :data:`~gateway.stop_timing.CUT_ENDS_WAIT_S`:
the closing checkpoint then signs them. A forced stop (a second Ctrl-C) does not wait; a database that
refuses the look ends it (the checkpoint could not be written either); a worker frozen or gone leaves its
end for later, unsigned until the next start signs it, as before (logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Collection

from audit import AuditError, AuditStore

log = logging.getLogger(__name__)

#: How often the ends still missing are looked for.
POLL_S = 0.2
#: The most cut requests looked for: beyond it the rest are left to the next start (one query each a look).
MOST = 1000


async def wait_for_cut_ends(request_ids: Collection[str], store: AuditStore, *, bound_s: float,
                            hurried: Callable[[], bool] = lambda: False) -> set[str]:
    """Wait until every request of ``request_ids`` has its terminal entry, for at most ``bound_s``; returns the
    ids still without one (empty: all there). Stops at once when ``hurried()`` or the database refuses."""
    pending = set(list(request_ids)[:MOST])
    if not pending:
        return pending
    deadline = time.monotonic() + bound_s
    while pending and not hurried():
        for request_id in list(pending):
            try:
                end = await asyncio.to_thread(store.terminal_for, request_id)
            except AuditError as exc:
                log.warning("stopping: cannot look for the ends of %d request(s) the stop ended (%s); the "
                            "closing checkpoint signs what is there", len(pending), type(exc).__name__)
                return pending
            if end is not None:
                pending.discard(request_id)
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    if pending:
        log.warning("stopping: %d request(s) the stop ended have no end recorded yet (their workers record it "
                    "later, unsigned until the next start): %s", len(pending), ", ".join(sorted(pending)[:5]))
    return pending
