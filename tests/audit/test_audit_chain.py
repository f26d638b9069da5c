"""The hash chain: its byte format (pure functions) and tamper detection on a real SQLite file.

Tampering is done the way an attacker with file access would: open the file
with ``sqlite3``, drop the append-only triggers, change rows. The chain must
then point at the first entry that no longer fits, and say what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from audit import AuditStore, make_engine, migrate, verify_chain
from audit.chain import (
    GENESIS_HASH,
    HASHED_FIELDS,
    canonical_json,
    entry_hash,
    entry_payload,
    format_timestamp,
)

# -- the byte format -------------------------------------------------------


def _fields(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "seq": 7,
        "created_at": datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=timezone.utc),
        "request_id": "req-1",
        "kind": "completion",
        "principal": "alice",
        "team": "blue",
        "model": "tiny",
        "body": {"output": "héllo", "tokens": {"prompt": 3, "completion": 2}},
        "policy_revision": "rev-9",
        "terminal_request_id": "req-1",
        "prev_hash": "ab" * 32,
    }
    base.update(changes)
    return base


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": {"y": [1, 2], "x": "é"}}) == '{"a":{"x":"é","y":[1,2]},"b":1}'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "\ud800", object()])
def test_canonical_json_refuses_what_is_not_plain_json(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        canonical_json({"v": bad})


def test_timestamps_are_utc_with_microseconds_always() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2024, 5, 1, 14, 0, tzinfo=plus_two)) == "2024-05-01T12:00:00.000000+00:00"
    with pytest.raises(ValueError):
        format_timestamp(datetime(2024, 5, 1, 12, 0))


def test_hash_is_sha256_of_prev_hash_then_canonical_json() -> None:
    fields = _fields()
    doc = dict(fields, created_at="2024-05-01T12:00:00.000005+00:00")
    by_hand = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert entry_payload(fields) == by_hand
    assert entry_hash(fields) == hashlib.sha256(("ab" * 32).encode() + by_hand).hexdigest()


def test_payload_must_hold_exactly_the_hashed_fields() -> None:
    with pytest.raises(ValueError, match="missing=\\['team'\\]"):
        entry_payload({k: v for k, v in _fields().items() if k != "team"})
    with pytest.raises(ValueError, match="extra=\\['hash'\\]"):
        entry_payload(_fields(hash="00"))


@pytest.mark.parametrize("name", HASHED_FIELDS)
def test_every_field_is_covered_by_the_hash(name: str) -> None:
    original = _fields()
    value = original[name]
    if isinstance(value, datetime):
        changed: object = value + timedelta(microseconds=1)
    elif isinstance(value, int):
        changed = value + 1
    elif isinstance(value, dict):
        changed = {**value, "extra": 1}
    else:
        changed = str(value) + "x"
    assert entry_hash(_fields(**{name: changed})) != entry_hash(original)


# -- tamper detection on a real file ---------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A migrated SQLite file holding the format boundary (entry 1) and entries 2..11 (request/completion pairs)."""
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    store = AuditStore(engine)
    for i in range(1, 6):
        common = dict(principal="alice", team="blue", model="tiny", policy_revision="rev-1")
        store.append("request", f"r{i}", body={"prompt": f"question {i}", "decision": {"allow": True}}, **common)
        store.append("completion", f"r{i}", body={"output": f"answer {i}", "tokens": i}, **common)
    engine.dispose()
    return path


def _store(path: Path) -> AuditStore:
    return AuditStore(make_engine(f"sqlite:///{path}"))


def _tamper(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """Change rows behind the store's back, as someone with the file would."""
    con = sqlite3.connect(path)
    try:
        con.execute("DROP TRIGGER audit_entries_no_update")
        con.execute("DROP TRIGGER audit_entries_no_delete")
        for statement in statements:
            con.execute(statement, params if "?" in statement else ())
        con.commit()
    finally:
        con.close()


def test_untouched_chain_verifies(db: Path) -> None:
    store = _store(db)
    result = verify_chain(store)
    assert result.ok and result.checked == 11 and result.format_boundary == 1
    assert result.first_bad_seq is None and result.problem is None
    assert result.head_hash == store.head().hash and result.head_seq == 11  # type: ignore[union-attr]
    assert verify_chain(store.engine) == result  # accepts an engine too


def test_empty_chain_verifies(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    migrate(engine)
    assert verify_chain(engine) == verify_chain(AuditStore(engine))
    result = verify_chain(engine)
    assert result.ok and result.checked == 0 and result.head_hash is None


def test_rows_cannot_be_changed_while_the_triggers_stand(db: Path) -> None:
    con = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("UPDATE audit_entries SET body = '{}' WHERE seq = 3")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM audit_entries WHERE seq = 3")
    finally:
        con.close()
    assert verify_chain(_store(db)).ok


def test_edited_body_is_reported_at_that_entry(db: Path) -> None:
    _tamper(db, """UPDATE audit_entries SET body = '{"output": "answer 2 (edited)", "tokens": 2}' WHERE seq = 4""")
    result = verify_chain(_store(db))
    assert not result.ok
    assert result.first_bad_seq == 4 and result.checked == 3
    assert "hash mismatch" in (result.problem or "") and "edited" in (result.problem or "")


def test_edited_timestamp_is_reported(db: Path) -> None:
    _tamper(db, "UPDATE audit_entries SET created_at = '2001-01-01 00:00:00.000000' WHERE seq = 7")
    result = verify_chain(_store(db))
    assert (result.ok, result.first_bad_seq) == (False, 7)
    assert "hash mismatch" in (result.problem or "")


def test_body_that_is_no_longer_json_is_reported(db: Path) -> None:
    _tamper(db, "UPDATE audit_entries SET body = '{not json' WHERE seq = 6")
    for batch in (1000, 4, 1):  # bad row in the middle of a batch, or alone
        result = _verify(db, batch)
        assert (result.ok, result.first_bad_seq, result.checked) == (False, 6, 5), batch
        assert "hash mismatch" in (result.problem or "")  # format 2 hashes the stored text, never parses it


def _verify(path: Path, batch: int):  # type: ignore[no-untyped-def]
    return verify_chain(_store(path), batch=batch)


def test_deleted_middle_entry_is_reported(db: Path) -> None:
    _tamper(db, "DELETE FROM audit_entries WHERE seq = 5")
    result = verify_chain(_store(db))
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 6, 4)
    assert "missing" in (result.problem or "") and "5..5" in (result.problem or "")


def test_deleted_first_entry_is_reported(db: Path) -> None:
    _tamper(db, "DELETE FROM audit_entries WHERE seq = 1")
    result = verify_chain(_store(db))
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 2, 0)


def test_deletion_renumbered_to_hide_the_gap_is_reported(db: Path) -> None:
    _tamper(db, "DELETE FROM audit_entries WHERE seq = 5", "UPDATE audit_entries SET seq = seq - 1 WHERE seq > 5")
    result = verify_chain(_store(db))
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "prev_hash mismatch" in (result.problem or "")


def test_changed_prev_hash_is_reported(db: Path) -> None:
    _tamper(db, f"UPDATE audit_entries SET prev_hash = '{'f' * 64}' WHERE seq = 8")
    result = verify_chain(_store(db))
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 8, 7)
    assert "prev_hash mismatch" in (result.problem or "")


def test_changed_genesis_link_is_reported(db: Path) -> None:
    _tamper(db, f"UPDATE audit_entries SET prev_hash = '{'1' * 64}' WHERE seq = 1")
    result = verify_chain(_store(db))
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "genesis" in (result.problem or "")


def test_edit_with_recomputed_hash_breaks_the_next_link(db: Path) -> None:
    """Re-hashing the edited entry only moves the evidence one entry later."""
    store = _store(db)
    victim = store.get(3)
    assert victim is not None
    forged_body = {**victim.body, "prompt": "something else"}
    forged_hash = entry_hash({**victim.hashed_fields(), "body": forged_body}, format=victim.format)
    _tamper(
        db,
        "UPDATE audit_entries SET body = ?, hash = ? WHERE seq = 3",
        params=(canonical_json(forged_body).decode(), forged_hash),
    )
    result = verify_chain(_store(db))
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 4, 3)
    assert "prev_hash mismatch" in (result.problem or "")


def test_bad_entry_beyond_the_first_batch_is_found(db: Path) -> None:
    _tamper(db, """UPDATE audit_entries SET body = '{"output": "x", "tokens": 5}' WHERE seq = 10""")
    result = _verify(db, 3)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 10, 9)


def test_genesis_hash_is_64_zeros() -> None:
    assert GENESIS_HASH == "0" * 64
