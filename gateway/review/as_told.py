"""A key's own entries as its client was told them: a refusal answered as an unknown model reads as one.

A request for a model the key may not see is answered exactly as one for a
name that does not exist (``gateway/requests/hidden_models.py``), while its
entry keeps the truth for reviewers: a ``request`` entry naming the model
with the policy's decision and its reasons (or, for a body the model could
not take, a ``rejected`` entry with the real error), each with ``answered``
saying what the client was told. The review API lets any key read its own
entries, so those entries showed the key what the 404 hid: that the model
exists, and what the policy says of it.

For a key that reads only its own entries (neither reviewer nor auditor),
such an entry is shown as the ``rejected`` entry an unknown name leaves:
kind ``rejected``, no model, no decision, no payload, the body of
``rejection_record`` for the 404 (endpoint, key id, status, the error as
recorded with the name elided, the body's size and keyed digest, which
``answered`` keeps for this), its id, time, seq and team as stored. The
stored entry is not changed (the chain verifies as before); the searches
match the same view (``audit.search.EntryFilter.as_answered``), so no
filter, page or count tells the two apart; and such a key reads no
entry's ``prev_hash`` and ``hash`` (``audit.export.entry_document``'s
``with_chain``), since a hash recomputed over what is shown would not be
the one stored, and the next entry's ``prev_hash`` names the stored one.
Reviewers and auditors read the entries as recorded.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Final

from audit import AuditEntry
from audit.chain import canonical_text
from audit.kinds import REJECTED, REQUEST
from audit.search import ANSWERED_AS_UNKNOWN_MODEL
from gateway.requests.audit_records import logged_error
from gateway.requests.hidden_models import model_not_found

#: The name the shown error is built with: elided as every quoted value of a rejection's message is.
_ANY_NAME: Final = "…"


def as_told(entry: AuditEntry) -> AuditEntry:
    """``entry`` as the key that made it is shown it: an unknown model's rejection if it was answered as one."""
    answered = entry.body.get("answered")
    if not isinstance(answered, dict) or answered.get("code") != ANSWERED_AS_UNKNOWN_MODEL:
        return entry
    if entry.kind == REQUEST:
        kept: dict[str, Any] = answered  # the body's size and digest, recorded for this view
    elif entry.kind == REJECTED:
        kept = entry.body
    else:
        return entry
    error = model_not_found(_ANY_NAME)
    body = {"endpoint": entry.body.get("endpoint"), "key_id": entry.body.get("key_id"), "status": error.status,
            "error": logged_error(error), "body_bytes": kept.get("body_bytes"),
            "body_hmac_sha256": kept.get("body_hmac_sha256")}
    # read back from its canonical text, as a stored body is: the same key order, the same JSON
    return replace(entry, kind=REJECTED, model=None, body=json.loads(canonical_text(body)), payload=None,
                   payload_digest=None)
