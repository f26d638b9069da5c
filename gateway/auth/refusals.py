"""A line in the log for every refused key, so an operator can see keys being guessed or a revoked key still in use.

Without it a 401 left no trace by default (the access log is off unless
``GOVGATE_ACCESS_LOG`` is set, and says neither why nor which key), and
``govgate_requests{code="invalid_api_key"}`` counts refusals but cannot say
whose. The line names what is safe to name: why the key was refused, the
*key id* when the presented value has a key's shape (ids are public: they
appear in listings and audit entries, and a 12-hex-digit id cannot carry
anything into the log), and the client's address. Never the presented
value, nor any part of its secret, nor the header's text: a client that
pastes a real key with a typo, or another service's secret, must not find it
in the logs.

There is no lockout: a key's secret is 256 random bits, so guessing one is
hopeless at any rate a gateway can answer, and locking a key id after
failures would let anyone who knows an id (it is not secret) lock its owner
out. Rate-limiting 401s belongs to the proxy in front, which sees the real
client address; this line and the counter are what it and an alert act on.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("govgate.auth")

#: Reasons a presented key is refused (the log's ``reason``).
MISSING = "missing"
MALFORMED_HEADER = "malformed_header"
SEVERAL_HEADERS = "several_headers"
NOT_A_KEY = "not_a_key"
UNKNOWN_OR_REVOKED = "unknown_or_revoked"

_KEY_ID = re.compile(r"^gk_([0-9a-f]{12})_")


def presented_key_id(presented: str) -> str | None:
    """The key id of a value shaped like a key, else None (nothing else of the value is ever kept)."""
    match = _KEY_ID.match(presented)
    return match.group(1) if match else None


def log_refused(reason: str, *, key_id: str | None, client: str | None, where: str) -> None:
    """One WARNING for a refused key: reason, key id (if any), client address; never the secret."""
    log.warning("key refused (%s) at %s: key id %s, client %s", reason, where, key_id or "-", client or "-",
                extra={"reason": reason, "key_id": key_id, "client": client, "where": where})
