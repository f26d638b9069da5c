"""Schema v2 (audit_0002) on a real PostgreSQL: the upgrade keeps old chains verifying, the guards hold.

The SQLite side is tests/audit/test_chain_v2_schema.py. On PostgreSQL the
table is altered in place (no rebuild), ``json`` keeps each stored body's
text, and the guards are PL/pgSQL triggers: UPDATE only to erase a payload,
no DELETE or TRUNCATE, ``INSERT … ON CONFLICT DO UPDATE`` caught as the
UPDATE it is. Tried as a superuser with plain SQL, as a careless operator
would.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from audit import AuditStore, make_engine, migrate, verify_chain
from tests.audit.conftest import RawDB
from tests.audit.old_append import old_append

V1_BODIES = [
    {"prompt": "héllo ✓", "decision": {"allow": True, "reasons": []}},
    {"output": "answer", "usage": {"total_tokens": 3}},
    {"z": 1, "a": [1, 2.5, None, True], "nul": "\u0000"},
]
_ROW = ("seq, created_at, request_id, kind, principal, team, model, CAST(body AS TEXT), policy_revision,"
        " terminal_request_id, prev_hash, hash")


@pytest.fixture
def backend() -> str:
    """Only PostgreSQL here (overrides the two-backend parameter of tests/audit/conftest.py)."""
    return "postgresql"


@pytest.fixture
def v1_raw(db_url: str) -> Iterator[RawDB]:
    """A PostgreSQL store made at audit_0001 holding entries written the old way."""
    engine = make_engine(db_url)
    migrate(engine, "audit_0001")
    for i, body in enumerate(V1_BODIES):
        old_append(engine, "request", f"r{i}", body)
    old_append(engine, "completion", "r0", {"output": "done"})
    engine.dispose()
    raw = RawDB(db_url, "postgresql")
    yield raw
    raw.dispose()


def _kind_checks(raw: RawDB) -> list[tuple[Any, ...]]:
    return raw.rows("SELECT conname FROM pg_constraint WHERE conrelid = 'audit_entries'::regclass"
                    " AND contype = 'c' AND conname LIKE '%kind' ORDER BY conname")


def test_upgrade_keeps_every_stored_byte_appends_the_boundary_and_verifies(v1_raw: RawDB) -> None:
    before = v1_raw.rows(f"SELECT {_ROW} FROM audit_entries ORDER BY seq")
    assert _kind_checks(v1_raw) == [("ck_audit_entries_ck_audit_entries_kind",)]  # what audit_0001 really made
    engine = make_engine(v1_raw.url)
    migrate(engine)
    migrate(engine)  # idempotent: no second boundary
    engine.dispose()

    after = v1_raw.rows(f"SELECT {_ROW} FROM audit_entries ORDER BY seq")
    assert after[: len(before)] == before
    [boundary] = after[len(before):]
    assert boundary[1:4] == (boundary[1], "chain-format-2", "chain_format") and boundary[7] == '{"format":2}'
    assert boundary[10] == before[-1][11]  # linked to the old head
    assert _kind_checks(v1_raw) == [("ck_audit_entries_ck_audit_entries_kind",)]  # replaced, not doubled

    store = v1_raw.store()
    result = verify_chain(store)
    assert result.ok and result.checked == len(before) + 1
    entry = store.append("key_created", "k1", principal="root", team=None, model=None, body={"key_id": "abc"},
                         policy_revision=None)
    assert entry.seq == len(before) + 2 and store.get(entry.seq) == entry
    with pytest.raises(IntegrityError, match="ck_audit_entries_kind"):
        v1_raw.execute("INSERT INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash)"
                       " VALUES (999, now(), 'x', 'no_such_kind', '{}', :p, :h)", {"p": "1" * 64, "h": "2" * 64})


@pytest.fixture
def v2_raw(store: AuditStore, raw: RawDB) -> RawDB:
    """A v2 store holding two entries, the second with a payload (written behind the store's back)."""
    store.append("request", "r1", principal="a", team="t", model="m", body={"prompt": "x"}, policy_revision=None)
    [(seq, head)] = raw.rows("SELECT seq, hash FROM audit_entries ORDER BY seq DESC LIMIT 1")
    raw.execute("INSERT INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash, payload,"
                " payload_digest) VALUES (:seq, now(), 'r2', 'request', '{}', :prev, :hash,"
                " CAST(:payload AS json), :digest)",
                {"seq": seq + 1, "prev": head, "hash": "e" * 64, "payload": '{"salt":"00","text":"secret"}',
                 "digest": "d" * 64})
    return raw


@pytest.mark.parametrize("statement", [
    "UPDATE audit_entries SET team = 'red'",
    "UPDATE audit_entries SET payload = json_build_object('x', 1)",
    "UPDATE audit_entries SET payload = NULL, payload_digest = NULL",
    "UPDATE audit_entries SET payload = NULL, body = CAST('{}' AS json)",
    "DELETE FROM audit_entries",
    "TRUNCATE audit_entries",
    "INSERT INTO audit_entries SELECT * FROM audit_entries ON CONFLICT (seq) DO UPDATE SET kind = 'rejected'",
], ids=["update", "payload-changed", "digest-erased", "body-changed", "delete", "truncate", "upsert"])
def test_guards_refuse_everything_but_a_payload_erasure(v2_raw: RawDB, statement: str) -> None:
    before = v2_raw.rows(f"SELECT {_ROW}, CAST(payload AS TEXT), payload_digest FROM audit_entries ORDER BY seq")
    with pytest.raises(DBAPIError, match="append-only"):
        v2_raw.execute(statement)
    assert v2_raw.rows(f"SELECT {_ROW}, CAST(payload AS TEXT), payload_digest FROM audit_entries"
                       " ORDER BY seq") == before


def test_a_payload_may_be_erased_and_nothing_else_changes(v2_raw: RawDB) -> None:
    before = v2_raw.rows(f"SELECT {_ROW}, payload_digest FROM audit_entries ORDER BY seq")
    v2_raw.execute("UPDATE audit_entries SET payload = NULL WHERE request_id = 'r2'")
    assert v2_raw.rows(f"SELECT {_ROW}, payload_digest FROM audit_entries ORDER BY seq") == before
    assert v2_raw.rows("SELECT count(*) FROM audit_entries WHERE payload IS NOT NULL") == [(0,)]


def test_a_conflicting_insert_changes_nothing(v2_raw: RawDB) -> None:
    before = v2_raw.rows(f"SELECT {_ROW} FROM audit_entries ORDER BY seq")
    v2_raw.execute("INSERT INTO audit_entries SELECT * FROM audit_entries ON CONFLICT DO NOTHING")
    with pytest.raises(IntegrityError, match="pk_audit_entries"):
        v2_raw.execute("INSERT INTO audit_entries SELECT * FROM audit_entries")
    assert v2_raw.rows(f"SELECT {_ROW} FROM audit_entries ORDER BY seq") == before


def test_checkpoints_are_append_only(raw: RawDB) -> None:
    raw.execute("INSERT INTO audit_checkpoints (seq, head_hash, created_at, key_id, signature, closing)"
                " VALUES (1, :h, now(), :k, :s, false)", {"h": "a" * 64, "k": "b" * 64, "s": "c" * 128})
    for statement in ("UPDATE audit_checkpoints SET closing = true", "DELETE FROM audit_checkpoints",
                      "TRUNCATE audit_checkpoints",
                      "INSERT INTO audit_checkpoints SELECT * FROM audit_checkpoints"
                      " ON CONFLICT (seq) DO UPDATE SET closing = true"):
        with pytest.raises(DBAPIError, match="append-only"):
            raw.execute(statement)
    assert raw.rows("SELECT seq, closing FROM audit_checkpoints") == [(1, False)]


def test_payloads_erased_by_prune_leave_a_chain_that_verifies(store: AuditStore, raw: RawDB) -> None:
    """Format 2 on PostgreSQL end to end: payload text kept verbatim, erased by the one allowed UPDATE, VACUUMed."""
    from datetime import datetime, timezone

    from audit.prune import prune_payloads

    common: dict[str, Any] = dict(principal="a", team="t", model="m", policy_revision="1")
    kept = [store.append("request", f"r{i}", body={"n": i}, payload={"messages": [{"role": "user", "content": f"SECRET{i} é"}]},
                         **common) for i in range(5)]
    stored = raw.rows("SELECT seq, CAST(payload AS TEXT), payload_digest FROM audit_entries"
                      " WHERE payload IS NOT NULL ORDER BY seq")
    assert [(seq, digest) for seq, _, digest in stored] == [(e.seq, e.payload_digest) for e in kept]
    assert all(f"SECRET{i} é" in text for i, (_, text, _) in enumerate(stored))
    assert verify_chain(store).ok

    result = prune_payloads(store, datetime.now(timezone.utc))
    assert result.erased == 5 and result.entry is not None and result.entry.kind == "payloads_erased"
    assert raw.rows("SELECT count(*) FROM audit_entries WHERE payload IS NOT NULL") == [(0,)]
    assert [store.get(e.seq).payload_digest for e in kept] == [e.payload_digest for e in kept]  # type: ignore[union-attr]
    verdict = verify_chain(store)
    assert verdict.ok and verdict.checked == 1 + 5 + 1


@pytest.mark.parametrize("change", [
    # A payload respelt (same meaning, other bytes) no longer matches its digest.
    "UPDATE audit_entries SET payload = CAST(replace(CAST(payload AS TEXT), ':', ': ') AS json) WHERE seq = 2",
    # A duplicate key in front: json keeps it, every JSON reader sees the forged value, verify sees other bytes.
    "UPDATE audit_entries SET body = CAST('{\"n\"' || chr(58) || '99,' || substr(CAST(body AS TEXT), 2) AS json)"
    " WHERE seq = 2",
], ids=["payload-respelt", "duplicate-key-in-front"])
def test_verify_hashes_the_stored_text_on_postgresql(store: AuditStore, raw: RawDB, change: str) -> None:
    store.append("request", "r1", principal="a", team="t", model="m", policy_revision="1", body={"n": 1},
                 payload={"messages": [{"role": "user", "content": "hello"}]})
    assert verify_chain(store).ok
    raw.without_guards(change)
    [(body,)] = raw.rows("SELECT CAST(body AS TEXT) FROM audit_entries WHERE seq = 2")
    result = verify_chain(store)
    assert (result.ok, result.first_bad_seq) == (False, 2), (body, result)
