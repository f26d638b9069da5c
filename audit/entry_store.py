"""What code that writes terminal entries needs of a store, whichever way the store reaches its database.

:class:`audit.AuditStore` (SQLAlchemy) and :class:`audit.driver_store.DriverStore`
(the driver alone, in model workers) both answer it, so the workers' code is
written once against this and tested on both.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from .entry import AuditEntry


class EntryStore(Protocol):
    def append(self, kind: str, request_id: str, *, principal: str | None, team: str | None, model: str | None,
               body: Mapping[str, Any], policy_revision: str | None,
               payload: Mapping[str, Any] | None = None) -> AuditEntry:
        """Put one entry at the head of the chain (see :meth:`audit.AuditStore.append`)."""
        ...

    def terminal_for(self, request_id: str) -> AuditEntry | None:
        """The request's terminal entry, if any."""
        ...
