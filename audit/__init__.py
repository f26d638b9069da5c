"""govgate's tamper-evident audit trail; ``gateway`` and ``workers`` use only these names.

This package imports neither of them. Typical start-up::

    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    store = AuditStore(engine)
    store.append("request", rid, principal=..., team=..., model=...,
                 body={...}, policy_revision=...)
"""

from __future__ import annotations

from .db import make_engine, migrate, write_refusal
from .entry import AuditEntry
from .errors import AuditError, CorruptEntryError, DuplicateTerminalError, InvalidEntryError
from .kinds import KINDS, TERMINAL_KINDS
from .store import AuditStore
from .verify import VerifyResult, verify_chain

__all__ = [
    "KINDS",
    "TERMINAL_KINDS",
    "AuditEntry",
    "AuditError",
    "AuditStore",
    "CorruptEntryError",
    "DuplicateTerminalError",
    "InvalidEntryError",
    "VerifyResult",
    "make_engine",
    "migrate",
    "verify_chain",
    "write_refusal",
]
