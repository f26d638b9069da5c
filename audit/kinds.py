"""The kinds of audit entry, in one place so the schema and the store agree.

The CHECK constraints in the schema are generated from these sets, so adding
a kind means a new migration as well as a change here.
"""

from __future__ import annotations

from typing import Final

#: A request was decided (accepted or denied); body has prompt, params, decision, reasons.
REQUEST: Final = "request"
#: Invalid input from a known principal (never reached a decision).
REJECTED: Final = "rejected"
#: Terminal kinds: every accepted request ends in exactly one of these.
COMPLETION: Final = "completion"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
CANCELLED: Final = "cancelled"

TERMINAL_KINDS: Final[frozenset[str]] = frozenset({COMPLETION, FAILED, TIMED_OUT, CANCELLED})
KINDS: Final[frozenset[str]] = frozenset({REQUEST, REJECTED}) | TERMINAL_KINDS


def sql_in_list(kinds: frozenset[str]) -> str:
    """Render ``kinds`` as a sorted SQL ``IN`` list for CHECK constraints (stable text)."""
    return "(" + ", ".join(f"'{k}'" for k in sorted(kinds)) + ")"
