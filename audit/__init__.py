"""govgate's tamper-evident audit trail; ``gateway`` and ``workers`` use only these names.

This package imports neither of them. Typical start-up::

    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    store = AuditStore(engine)
    store.append("request", rid, principal=..., team=..., model=...,
                 body={...}, policy_revision=...)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .entry import AuditEntry
from .entry_store import EntryStore
from .errors import AuditError, CorruptEntryError, DuplicateTerminalError, InvalidEntryError
from .kinds import KINDS, TERMINAL_KINDS

if TYPE_CHECKING:
    from .db import make_engine, migrate, write_refusal
    from .entry_args import AppendArgs
    from .store import AuditStore
    from .verify import VerifyResult, verify_chain

#: Names whose modules load SQLAlchemy, imported on first use: a process that appends on the driver
#: alone (:mod:`audit.driver_store`, a model worker) imports this package without them.
_LAZY = {"AppendArgs": ".entry_args", "make_engine": ".db", "migrate": ".db", "write_refusal": ".db", "AuditStore": ".store",
         "VerifyResult": ".verify", "verify_chain": ".verify"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'audit' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "AppendArgs",
    "KINDS",
    "TERMINAL_KINDS",
    "AuditEntry",
    "AuditError",
    "AuditStore",
    "EntryStore",
    "CorruptEntryError",
    "DuplicateTerminalError",
    "InvalidEntryError",
    "VerifyResult",
    "make_engine",
    "migrate",
    "verify_chain",
    "write_refusal",
]
