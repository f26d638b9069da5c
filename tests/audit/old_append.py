"""The append as the store did it before the DBAPI hot path, for compatibility tests.

A frozen copy (SQLAlchemy Core on a ``Connection``, the body stored by the
JSON column's own serialiser, ``json.dumps`` with its defaults): trails
written by earlier versions look like this, and must keep verifying and
keep growing as one chain when the current store appends to them.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Mapping

from sqlalchemy import Engine, select

from audit.chain import GENESIS_HASH, chain_hash, format_timestamp
from audit.db import APPEND_LOCK_KEY, locked_transaction
from audit.kinds import TERMINAL_KINDS
from audit.tables import audit_table

_t = audit_table.c


def old_canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def old_append(engine: Engine, kind: str, request_id: str, body: Mapping[str, Any], *,
               principal: str | None = "old", team: str | None = "t", model: str | None = "m",
               policy_revision: str | None = "rev-0") -> dict[str, Any]:
    """Append one entry the old way; returns its stored fields (``created_at`` aware)."""
    stored_body = json.loads(old_canonical_json(dict(body)))
    with locked_transaction(engine, APPEND_LOCK_KEY) as conn:
        head = conn.execute(select(_t.seq, _t.hash).order_by(_t.seq.desc()).limit(1)).first()
        fields: dict[str, Any] = {
            "seq": head.seq + 1 if head else 1,
            "created_at": datetime.now(timezone.utc),
            "request_id": request_id,
            "kind": kind,
            "principal": principal,
            "team": team,
            "model": model,
            "body": stored_body,
            "policy_revision": policy_revision,
            "terminal_request_id": request_id if kind in TERMINAL_KINDS else None,
            "prev_hash": head.hash if head else GENESIS_HASH,
        }
        payload = old_canonical_json({**fields, "created_at": format_timestamp(fields["created_at"])})
        fields["hash"] = chain_hash(fields["prev_hash"], payload)
        conn.execute(audit_table.insert(), fields)
    return fields
