"""The gateway's share of writing terminal entries the database refused earlier.

A gateway keeps the terminal entries it cannot write (see
``workers.contract.pending_terminals``) and, like the workers, writes everything
pending once the database takes writes again: at start and then every few
seconds. One retry at a time, in a thread (a locked SQLite database holds a
write for its busy timeout).
"""

from __future__ import annotations

import asyncio
import logging

import anyio

from audit import AuditStore
from workers.contract.pending_terminals import PendingTerminals

log = logging.getLogger(__name__)

#: Seconds between two looks for pending terminal entries (``GOVGATE_TERMINAL_RETRY_INTERVAL_S``'s default).
RETRY_INTERVAL_S = 5.0


async def retry_pending_terminals(pending: PendingTerminals, audit: AuditStore,
                                  interval_s: float = RETRY_INTERVAL_S) -> None:
    """Write pending terminal entries until cancelled."""
    while True:
        try:
            if await anyio.to_thread.run_sync(pending.count):
                await anyio.to_thread.run_sync(pending.write_all, audit)
        except asyncio.CancelledError:
            raise
        except Exception:  # keep retrying whatever one round met
            log.exception("retrying pending terminal entries failed")
        await asyncio.sleep(interval_s)
