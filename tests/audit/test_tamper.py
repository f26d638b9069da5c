"""Tampering with a real SQLite store in every way an attacker with the file could; verify must catch each.

The store holds a few hundred entries written by ``AuditStore.append`` with
bodies and payloads shaped like the gateway's and the workers'. Each test
works on its own copy of that file and tampers with plain ``sqlite3``, the
guard triggers dropped first where they would refuse (they are a fence
against mistakes; the chain is the evidence). Truncation, a forged tail and
a rewritten chain need the signed checkpoints (tests/audit/test_checkpoint*.py).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from audit import AuditStore, make_engine, migrate, verify_chain
from audit.chain import canonical_text, entry_hash
from tests.audit.old_append import old_append

SPAWN = multiprocessing.get_context("spawn")
JOIN_TIMEOUT_S = 120
REQUESTS = 120  # 1 boundary + 120 requests + 120 terminals + 20 rejections = 261 entries
COMMON: dict[str, Any] = dict(team="research", model="tiny", policy_revision="rev-7")


def _request_body(i: int) -> dict[str, Any]:
    return {
        "endpoint": "/v1/chat/completions", "key_id": f"key_{i % 7:04x}", "roles": ["analyst"], "purpose": None,
        "stream": i % 3 == 0, "params": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "stop": ["\n"]},
        "requested_max_tokens": 64, "prompt_logging": "full",
        "decision": {"allow": True, "reasons": [], "obligations": {"max_tokens": 64, "prompt_logging": "full"}},
        "admission": {"admitted": True, "reserved_tokens": 128, "prompt_tokens": 12 + i, "waiting": i % 4},
        "policy_input": {"principal": {"id": f"user{i % 5}", "team": "research"}, "model": "tiny"},
    }


def _write_store(path: Path) -> None:
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    store = AuditStore(engine)
    for i in range(REQUESTS):
        rid, who = f"req-{i:04d}", f"user{i % 5}"
        store.append("request", rid, principal=who, body=_request_body(i),
                     payload={"messages": [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}]},
                     **COMMON)
        if i % 6 == 0:
            store.append("rejected", f"bad-{i:04d}", principal=who, body={"status": 400, "body_bytes": 17}, **COMMON)
        kind = "failed" if i % 10 == 9 else "completion"
        store.append(kind, rid, principal=who,
                     body={"finish_reason": "stop", "usage": {"prompt_tokens": 12, "completion_tokens": 3 + i % 9},
                           "timings": {"queue_ms": 1.5, "generate_ms": 80.25}, "worker": {"pid": 4242}},
                     payload={"output": f"The answer is {2 * i}."}, **COMMON)
    engine.dispose()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tamper") / "audit.db"
    _write_store(path)
    return path


@pytest.fixture
def db(pristine: Path, tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    shutil.copy(pristine, path)  # the engine was disposed: the WAL is folded into the file
    return path


def _verify(path: Path) -> Any:
    engine = make_engine(f"sqlite:///{path}")
    try:
        return verify_chain(engine)
    finally:
        engine.dispose()


def _con(path: Path, *, drop_triggers: bool = True) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    if drop_triggers:
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            con.execute(f"DROP TRIGGER {name}")
    return con


def _tamper(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    con = _con(path)
    try:
        con.execute(sql, params)
        con.commit()
    finally:
        con.close()


def _row(path: Path, seq: int) -> dict[str, Any]:
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        return dict(con.execute("SELECT * FROM audit_entries WHERE seq = ?", (seq,)).fetchone())
    finally:
        con.close()


def _seq_of(path: Path, kind: str, start: int) -> int:
    """The first entry of ``kind`` at or after ``start``."""
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT min(seq) FROM audit_entries WHERE kind = ? AND seq >= ?", (kind, start)).fetchone()[0]
    finally:
        con.close()


def _bad(path: Path, seq: int, *words: str, checked: int | None = None) -> Any:
    result = _verify(path)
    checked = seq - 1 if checked is None else checked
    assert not result.ok and result.first_bad_seq == seq, result
    assert result.checked == checked and result.head_seq == (checked or None)
    for word in words:
        assert word in (result.problem or ""), result.problem
    return result


def test_the_untouched_store_verifies(db: Path) -> None:
    result = _verify(db)
    assert result.ok and result.checked == 1 + 2 * REQUESTS + 20 and result.format_boundary == 1


# -- payloads ----------------------------------------------------------------------


def test_an_edited_payload_is_caught_by_its_digest(db: Path) -> None:
    seq = _seq_of(db, "completion", 50)
    row = _row(db, seq)
    forged = row["payload"].replace("The answer is", "The answer was")
    assert forged != row["payload"]
    _tamper(db, "UPDATE audit_entries SET payload = ? WHERE seq = ?", (forged, seq))
    _bad(db, seq, "payload mismatch", "payload was edited")


def test_an_edited_payload_with_a_fresh_digest_breaks_the_hash(db: Path) -> None:
    seq = _seq_of(db, "request", 40)
    forged = json.loads(_row(db, seq)["payload"])
    forged["messages"][0]["content"] = "something never asked"
    text = canonical_text(forged)
    _tamper(db, "UPDATE audit_entries SET payload = ?, payload_digest = ? WHERE seq = ?",
            (text, hashlib.sha256(text.encode()).hexdigest(), seq))
    _bad(db, seq, "hash mismatch")


def test_a_payload_planted_on_an_entry_without_one_is_caught(db: Path) -> None:
    seq = next(s for s in range(2, 100) if _row(db, s)["kind"] == "rejected")
    _tamper(db, "UPDATE audit_entries SET payload = '{\"output\":\"planted\"}' WHERE seq = ?", (seq,))
    _bad(db, seq, "no payload_digest")


def test_an_erased_payload_is_not_tampering(db: Path) -> None:
    con = _con(db, drop_triggers=False)  # the one UPDATE the guard allows
    con.execute("UPDATE audit_entries SET payload = NULL WHERE seq BETWEEN 10 AND 30")
    con.commit()
    con.close()
    assert _verify(db).ok


# -- fields, rows, order -----------------------------------------------------------------


@pytest.mark.parametrize(("column", "value"), [
    ("team", "other-team"), ("principal", "mallory"), ("kind", "rejected"), ("request_id", "req-9999"),
    ("policy_revision", None), ("created_at", "2020-01-01 00:00:00.000000"), ("payload_digest", "0" * 64),
])
def test_an_edited_field_is_caught(db: Path, column: str, value: Any) -> None:
    seq = _seq_of(db, "request", 77)  # not terminal: its request_id is free to change
    _tamper(db, f"UPDATE audit_entries SET {column} = ? WHERE seq = ?", (value, seq))
    _bad(db, seq, "hash mismatch")


def test_an_edited_body_value_is_caught(db: Path) -> None:
    _tamper(db, "UPDATE audit_entries SET body = json_set(body, '$.decision.allow', json('false')) WHERE seq = 2")
    _bad(db, 2, "hash mismatch")


def test_a_body_respelt_without_changing_its_value_is_caught(db: Path) -> None:
    """Verify hashes the stored text: JSON that parses the same but is not the canonical text is tampering."""
    text = _row(db, 20)["body"]
    _tamper(db, "UPDATE audit_entries SET body = ? WHERE seq = 20", (json.dumps(json.loads(text), indent=1),))
    _bad(db, 20, "hash mismatch", "canonical")


def test_a_body_with_a_duplicate_key_in_front_is_caught(db: Path) -> None:
    """``{"decision":{forged},`` + the original: every JSON reader sees the forged value; the hash does not match."""
    original = _row(db, 2)["body"]
    forged = '{"decision":{"allow":false,"reasons":[{"code":"forged"}]},' + original[1:]
    _tamper(db, "UPDATE audit_entries SET body = ? WHERE seq = 2", (forged,))
    con = sqlite3.connect(db)
    seen = con.execute("SELECT json_extract(body, '$.decision.allow') FROM audit_entries WHERE seq = 2").fetchone()[0]
    con.close()
    assert json.loads(forged)["decision"]["allow"] is True  # Python keeps the last key...
    assert seen in (0, 1)  # ...SQLite's json_extract one of them: readers disagree, verify does not
    _bad(db, 2, "hash mismatch")


def test_a_deleted_entry_is_caught(db: Path) -> None:
    _tamper(db, "DELETE FROM audit_entries WHERE seq = 100")
    _bad(db, 101, "seq gap", "100..100", "missing", checked=99)


def test_an_inserted_entry_is_caught(db: Path) -> None:
    """Room made by renumbering everything after a request, a forged entry put in the gap."""
    at = _seq_of(db, "request", 60)
    victim = _row(db, at)
    con = _con(db)
    con.execute("UPDATE audit_entries SET seq = -(seq + 1) WHERE seq > ?", (at,))  # two steps: no PK collision
    con.execute("UPDATE audit_entries SET seq = -seq WHERE seq < 0")
    forged = {**victim, "seq": at + 1, "request_id": "req-forged", "prev_hash": "f" * 64}
    forged["hash"] = hashlib.sha256(b"anything").hexdigest()
    con.execute(f"INSERT INTO audit_entries ({', '.join(forged)}) VALUES ({', '.join('?' * len(forged))})",
                tuple(forged.values()))
    con.commit()
    con.close()
    _bad(db, at + 1, "prev_hash mismatch")


def test_an_inserted_entry_with_a_correct_hash_is_caught_at_the_next_one(db: Path) -> None:
    """A forged entry hashed correctly in the gap: the entry after it must be relinked, and that breaks its hash."""
    at = _seq_of(db, "request", 60)
    victim = _row(db, at)
    con = _con(db)
    con.execute("UPDATE audit_entries SET seq = -(seq + 1) WHERE seq > ?", (at,))
    con.execute("UPDATE audit_entries SET seq = -seq WHERE seq < 0")
    forged = {**victim, "seq": at + 1, "request_id": "req-forged", "prev_hash": victim["hash"],
              "payload": None, "payload_digest": None}
    created = f"{victim['created_at'][:10]}T{victim['created_at'][11:]}+00:00"
    forged["hash"] = entry_hash({**{k: v for k, v in forged.items() if k not in ("hash", "payload")},
                                 "created_at": created, "body": json.loads(victim["body"])}, format=2)
    con.execute("UPDATE audit_entries SET prev_hash = ? WHERE seq = ?", (forged["hash"], at + 2))  # relink
    con.execute(f"INSERT INTO audit_entries ({', '.join(forged)}) VALUES ({', '.join('?' * len(forged))})",
                tuple(forged.values()))
    con.commit()
    con.close()
    _bad(db, at + 2, "hash mismatch")  # the forged entry itself checks out; the relinked one does not


def test_two_swapped_entries_are_caught(db: Path) -> None:
    con = _con(db)
    con.execute("UPDATE audit_entries SET seq = -1 WHERE seq = 90")
    con.execute("UPDATE audit_entries SET seq = 90 WHERE seq = 91")
    con.execute("UPDATE audit_entries SET seq = 91 WHERE seq = -1")
    con.commit()
    con.close()
    _bad(db, 90, "prev_hash mismatch")


def test_insert_or_replace_is_refused_by_the_guard(db: Path) -> None:
    con = _con(db, drop_triggers=False)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            con.execute("INSERT OR REPLACE INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash,"
                        " hash) SELECT seq, created_at, 'forged', kind, '{}', prev_hash, hash FROM audit_entries"
                        " WHERE seq = 33")
    finally:
        con.close()
    assert _verify(db).ok


def test_a_table_rebuilt_with_insert_or_replace_is_caught_once_the_guard_is_dropped(db: Path) -> None:
    """The attacker drops the guard first, then rewrites rows in place with INSERT OR REPLACE."""
    con = _con(db)
    con.execute("INSERT OR REPLACE INTO audit_entries SELECT seq, created_at, request_id, kind, principal, 'blue',"
                " model, body, policy_revision, terminal_request_id, prev_hash, hash, payload, payload_digest"
                " FROM audit_entries WHERE seq BETWEEN 150 AND 160")
    con.commit()
    assert con.execute("SELECT count(*) FROM audit_entries").fetchone()[0] == 1 + 2 * REQUESTS + 20
    con.close()
    _bad(db, 150, "hash mismatch")


# -- format 1 in an upgraded store ------------------------------------------------------


@pytest.fixture
def upgraded(tmp_path: Path) -> Path:
    path = tmp_path / "upgraded.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine, "audit_0001")
    for i in range(30):
        old_append(engine, "request", f"old-{i}", {"prompt": f"old question {i}", "decision": {"allow": True}})
    migrate(engine)
    store = AuditStore(engine)
    for i in range(10):
        store.append("request", f"new-{i}", principal="p", body={"decision": {"allow": True}},
                     payload={"prompt": f"new question {i}"}, **COMMON)
    engine.dispose()
    return path


def test_the_upgraded_store_verifies(upgraded: Path) -> None:
    result = _verify(upgraded)
    assert result.ok and result.checked == 41 and result.format_boundary == 31


def test_an_edited_format_1_entry_is_caught(upgraded: Path) -> None:
    _tamper(upgraded, """UPDATE audit_entries SET body = '{"decision":{"allow":false},"prompt":"old question 7"}'"""
                      " WHERE seq = 8")
    _bad(upgraded, 8, "hash mismatch")


def test_a_payload_planted_on_a_format_1_entry_is_caught(upgraded: Path) -> None:
    text = '{"prompt":"x","salt":"00"}'
    _tamper(upgraded, "UPDATE audit_entries SET payload = ?, payload_digest = ? WHERE seq = 5",
            (text, hashlib.sha256(text.encode()).hexdigest()))
    _bad(upgraded, 5, "format 1")


def test_moving_the_format_boundary_is_caught(upgraded: Path) -> None:
    """Calling the boundary something else would make verify read the newer entries as format 1."""
    _tamper(upgraded, "UPDATE audit_entries SET kind = 'request' WHERE seq = 31")
    _bad(upgraded, 31, "hash mismatch")


# -- several processes ---------------------------------------------------------------------


def _writer(url: str, worker: int, count: int, barrier: Any) -> None:
    store = AuditStore(make_engine(url))
    barrier.wait()
    for i in range(count):
        rid = f"w{worker}-{i // 2}"
        if i % 2 == 0:
            store.append("request", rid, principal=f"p{worker}", body=_request_body(i),
                         payload={"messages": [{"role": "user", "content": f"w{worker} asks {i}"}]}, **COMMON)
        else:
            store.append("completion", rid, principal=f"p{worker}", body={"usage": {"completion_tokens": i}},
                         payload={"output": f"w{worker} answers {i}"}, **COMMON)


def test_processes_appending_at_once_leave_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)  # empty: the first append of whichever process wins writes the boundary
    workers, per_worker = 4, 40
    barrier = SPAWN.Barrier(workers)
    processes = [SPAWN.Process(target=_writer, args=(f"sqlite:///{path}", w, per_worker, barrier))
                 for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in processes] == [0] * workers

    store = AuditStore(engine)
    entries = list(store.iter_entries())
    assert [e.seq for e in entries] == list(range(1, workers * per_worker + 2))
    assert [e.kind for e in entries].count("chain_format") == 1 and entries[0].kind == "chain_format"
    for w in range(workers):
        mine = [e for e in entries if e.principal == f"p{w}"]
        assert len(mine) == per_worker and all(e.payload is not None for e in mine)
    result = verify_chain(store)
    assert result.ok and result.checked == workers * per_worker + 1
    engine.dispose()
