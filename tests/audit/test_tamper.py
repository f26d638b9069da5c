"""Tampering with a real store, on SQLite and on PostgreSQL, in every way someone with database access could.

The store holds a few hundred entries written by ``AuditStore.append`` with
bodies and payloads shaped like the gateway's and the workers'. It is
written once per backend and module; each test tampers with its own copy (a
copied file, or ``CREATE DATABASE … TEMPLATE``) through plain SQL
(:class:`tests.audit.conftest.RawDB`), the guard triggers switched off first
where they would refuse (they are a fence against mistakes; the chain is the
evidence). Where the two databases need other SQL (JSON functions,
``INSERT OR REPLACE`` against ``ON CONFLICT DO UPDATE``), the test branches
on the backend; every tamper must be caught on both. Truncation, a forged
tail and a rewritten chain need the signed checkpoints
(tests/audit/test_checkpoint*.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy.exc import DBAPIError

from audit import AuditStore, make_engine, migrate, verify_chain
from audit.chain import canonical_text, entry_hash
from tests.audit.conftest import RawDB
from tests.audit.old_append import old_append
from tests.child_processes import CHILDREN
from tests.postgres_server import PostgresServer

JOIN_TIMEOUT_S = 120
REQUESTS = 120  # 1 boundary + 120 requests + 120 terminals + 20 rejections = 261 entries
COMMON: dict[str, Any] = dict(team="research", model="tiny", policy_revision="rev-7")
#: Every column, the JSON ones as their stored text (psycopg would parse PostgreSQL's json).
_COLUMNS = ("seq, created_at, request_id, kind, principal, team, model, CAST(body AS TEXT) AS body, policy_revision,"
            " terminal_request_id, prev_hash, hash, CAST(payload AS TEXT) AS payload, payload_digest")


def _request_body(i: int) -> dict[str, Any]:
    return {
        "endpoint": "/v1/chat/completions", "key_id": f"key_{i % 7:04x}", "roles": ["analyst"], "purpose": None,
        "stream": i % 3 == 0, "params": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "stop": ["\n"]},
        "requested_max_tokens": 64, "prompt_logging": "full",
        "decision": {"allow": True, "reasons": [], "obligations": {"max_tokens": 64, "prompt_logging": "full"}},
        "admission": {"admitted": True, "reserved_tokens": 128, "prompt_tokens": 12 + i, "waiting": i % 4},
        "policy_input": {"principal": {"id": f"user{i % 5}", "team": "research"}, "model": "tiny"},
    }


def _write_store(url: str) -> None:
    engine = make_engine(url)
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
    engine.dispose()  # SQLite: the WAL is folded into the file; PostgreSQL: nobody left on the template


class Pristine:
    """The written store, made once per backend for the module; :meth:`copy` gives each test its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sqlite: Path | None = None
        self.postgres: tuple[PostgresServer, str] | None = None

    def copy(self, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Callable[[], None]]:
        """A new database holding the pristine store, and how to remove it."""
        if backend == "sqlite":
            if self.sqlite is None:
                self.sqlite = self.folder / "audit.db"
                _write_store(f"sqlite:///{self.sqlite}")
            shutil.copy(self.sqlite, tmp_path / "audit.db")
            return f"sqlite:///{tmp_path / 'audit.db'}", lambda: None
        if self.postgres is None:
            server: PostgresServer = request.getfixturevalue("postgres_server")
            template = server.fresh_database("pristine")
            _write_store(template)
            self.postgres = (server, template)
        server, template = self.postgres
        url = server.fresh_database("tamper", template=template)
        return url, lambda: server.drop_database(url)

    def remove(self) -> None:
        if self.postgres is not None:
            server, template = self.postgres
            server.drop_database(template)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pristine]:
    made = Pristine(tmp_path_factory.mktemp("tamper"))
    yield made
    made.remove()


@pytest.fixture
def db(pristine: Pristine, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RawDB]:
    url, remove = pristine.copy(backend, request, tmp_path)
    raw = RawDB(url, backend)
    yield raw
    raw.dispose()
    remove()


def _verify(db: RawDB) -> Any:
    engine = make_engine(db.url)
    try:
        return verify_chain(engine)
    finally:
        engine.dispose()


def _json(db: RawDB, name: str) -> str:
    """A bound JSON text as the ``body``/``payload`` column takes it (SQLite: text; PostgreSQL: json)."""
    return f"CAST(:{name} AS json)" if db.backend == "postgresql" else f":{name}"


def _tamper(db: RawDB, *statements: str, **params: Any) -> None:
    db.without_guards(*statements, params=params)


def _row(db: RawDB, seq: int) -> dict[str, Any]:
    [row] = db.rows(f"SELECT {_COLUMNS} FROM audit_entries WHERE seq = :seq", {"seq": seq})
    return dict(zip([c.split()[-1] for c in _COLUMNS.split(", ")], row))


def _insert(db: RawDB, row: dict[str, Any]) -> str:
    """An INSERT of ``row`` (a :func:`_row`), its values bound by column name."""
    values = [_json(db, name) if name in ("body", "payload") else f":{name}" for name in row]
    return f"INSERT INTO audit_entries ({', '.join(row)}) VALUES ({', '.join(values)})"


def _seq_of(db: RawDB, kind: str, start: int) -> int:
    """The first entry of ``kind`` at or after ``start``."""
    [(seq,)] = db.rows("SELECT min(seq) FROM audit_entries WHERE kind = :kind AND seq >= :start",
                       {"kind": kind, "start": start})
    return seq


def _bad(db: RawDB, seq: int, *words: str, checked: int | None = None) -> Any:
    result = _verify(db)
    checked = seq - 1 if checked is None else checked
    assert not result.ok and result.first_bad_seq == seq, result
    assert result.checked == checked and result.head_seq == (checked or None)
    for word in words:
        assert word in (result.problem or ""), result.problem
    return result


def test_the_untouched_store_verifies(db: RawDB) -> None:
    result = _verify(db)
    assert result.ok and result.checked == 1 + 2 * REQUESTS + 20 and result.format_boundary == 1


# -- payloads ----------------------------------------------------------------------


def test_an_edited_payload_is_caught_by_its_digest(db: RawDB) -> None:
    seq = _seq_of(db, "completion", 50)
    row = _row(db, seq)
    forged = row["payload"].replace("The answer is", "The answer was")
    assert forged != row["payload"]
    _tamper(db, f"UPDATE audit_entries SET payload = {_json(db, 'p')} WHERE seq = :seq", p=forged, seq=seq)
    _bad(db, seq, "payload mismatch", "payload was edited")


def test_an_edited_payload_with_a_fresh_digest_breaks_the_hash(db: RawDB) -> None:
    seq = _seq_of(db, "request", 40)
    forged = json.loads(_row(db, seq)["payload"])
    forged["messages"][0]["content"] = "something never asked"
    text = canonical_text(forged)
    _tamper(db, f"UPDATE audit_entries SET payload = {_json(db, 'p')}, payload_digest = :d WHERE seq = :seq",
            p=text, d=hashlib.sha256(text.encode()).hexdigest(), seq=seq)
    _bad(db, seq, "hash mismatch")


def test_a_payload_planted_on_an_entry_without_one_is_caught(db: RawDB) -> None:
    seq = next(s for s in range(2, 100) if _row(db, s)["kind"] == "rejected")
    _tamper(db, f"UPDATE audit_entries SET payload = {_json(db, 'p')} WHERE seq = :seq", p='{"output":"planted"}',
            seq=seq)
    _bad(db, seq, "no payload_digest")


def test_an_erased_payload_is_not_tampering(db: RawDB) -> None:
    db.execute("UPDATE audit_entries SET payload = NULL WHERE seq BETWEEN 10 AND 30")  # the one UPDATE the guard allows
    assert db.rows("SELECT count(*) FROM audit_entries WHERE seq BETWEEN 10 AND 30 AND payload IS NOT NULL") == [(0,)]
    assert _verify(db).ok


# -- fields, rows, order -----------------------------------------------------------------


@pytest.mark.parametrize(("column", "value"), [
    ("team", "other-team"), ("principal", "mallory"), ("kind", "rejected"), ("request_id", "req-9999"),
    ("policy_revision", None), ("created_at", "2020-01-01 00:00:00.000000"), ("payload_digest", "0" * 64),
])
def test_an_edited_field_is_caught(db: RawDB, column: str, value: Any) -> None:
    seq = _seq_of(db, "request", 77)  # not terminal: its request_id is free to change
    _tamper(db, f"UPDATE audit_entries SET {column} = :v WHERE seq = :seq", v=value, seq=seq)
    _bad(db, seq, "hash mismatch")


@pytest.mark.parametrize("value", ["infinity", "-infinity", "10000-01-01 00:00:00", "0044-03-15 00:00:00 BC"])
def test_a_created_at_no_reader_can_load_names_its_entry(db: RawDB, value: str) -> None:
    """PostgreSQL takes these timestamps; psycopg cannot load them (Python's datetime stops at years 1..9999),
    so a plain read of the row fails. Verify must still name the entry, not report a read failure."""
    seq = _seq_of(db, "completion", 30)
    _tamper(db, "UPDATE audit_entries SET created_at = :v WHERE seq = :seq", v=value, seq=seq)
    _bad(db, seq, "created_at", "edited")


def test_an_edited_body_value_is_caught(db: RawDB) -> None:
    if db.backend == "postgresql":
        edit = "CAST(jsonb_set(CAST(body AS jsonb), '{decision,allow}', 'false') AS json)"
    else:
        edit = "json_set(body, '$.decision.allow', json('false'))"
    _tamper(db, f"UPDATE audit_entries SET body = {edit} WHERE seq = 2")
    _bad(db, 2, "hash mismatch")


def test_a_body_respelt_without_changing_its_value_is_caught(db: RawDB) -> None:
    """Verify hashes the stored text: JSON that parses the same but is not the canonical text is tampering."""
    text = _row(db, 20)["body"]
    _tamper(db, f"UPDATE audit_entries SET body = {_json(db, 'b')} WHERE seq = 20",
            b=json.dumps(json.loads(text), indent=1))
    _bad(db, 20, "hash mismatch", "canonical")


def test_a_body_with_a_duplicate_key_in_front_is_caught(db: RawDB) -> None:
    """``{"decision":{forged},`` + the original: JSON readers see either value; the hash does not match."""
    original = _row(db, 2)["body"]
    forged = '{"decision":{"allow":false,"reasons":[{"code":"forged"}]},' + original[1:]
    _tamper(db, f"UPDATE audit_entries SET body = {_json(db, 'b')} WHERE seq = 2", b=forged)
    assert _row(db, 2)["body"] == forged  # kept as written (PostgreSQL: json, not jsonb)
    if db.backend == "postgresql":
        [(seen,)] = db.rows("SELECT body -> 'decision' ->> 'allow' FROM audit_entries WHERE seq = 2")
        assert seen in ("true", "false")
    else:
        [(seen,)] = db.rows("SELECT json_extract(body, '$.decision.allow') FROM audit_entries WHERE seq = 2")
        assert seen in (0, 1)
    assert json.loads(forged)["decision"]["allow"] is True  # Python keeps the last key: readers disagree, verify not
    _bad(db, 2, "hash mismatch")


def test_a_deleted_entry_is_caught(db: RawDB) -> None:
    _tamper(db, "DELETE FROM audit_entries WHERE seq = 100")
    _bad(db, 101, "seq gap", "100..100", "missing", checked=99)


_MAKE_ROOM = (
    "UPDATE audit_entries SET seq = -(seq + 1) WHERE seq > :at",  # two steps: no primary key collision
    "UPDATE audit_entries SET seq = -seq WHERE seq < 0",
)


def test_an_inserted_entry_is_caught(db: RawDB) -> None:
    """Room made by renumbering everything after a request, a forged entry put in the gap."""
    at = _seq_of(db, "request", 60)
    victim = _row(db, at)
    forged = {**victim, "seq": at + 1, "request_id": "req-forged", "prev_hash": "f" * 64,
              "hash": hashlib.sha256(b"anything").hexdigest()}
    _tamper(db, *_MAKE_ROOM, at=at)
    _tamper(db, _insert(db, forged), **forged)
    _bad(db, at + 1, "prev_hash mismatch")


def test_an_inserted_entry_with_a_correct_hash_is_caught_at_the_next_one(db: RawDB) -> None:
    """A forged entry hashed correctly in the gap: the entry after it must be relinked, and that breaks its hash."""
    at = _seq_of(db, "request", 60)
    victim = _row(db, at)
    created = db.store().get(at).created_at  # type: ignore[union-attr]  # as hashed, whatever the backend stores
    forged = {**victim, "seq": at + 1, "request_id": "req-forged", "prev_hash": victim["hash"],
              "payload": None, "payload_digest": None}
    forged["hash"] = entry_hash({**{k: v for k, v in forged.items() if k not in ("hash", "payload")},
                                 "created_at": created, "body": json.loads(victim["body"])}, format=2)
    _tamper(db, *_MAKE_ROOM, at=at)
    _tamper(db, "UPDATE audit_entries SET prev_hash = :h WHERE seq = :next", _insert(db, forged),  # relinked first:
            **forged, h=forged["hash"], next=at + 2)  # prev_hash is unique
    assert _verify(db).checked == at + 1  # the forged entry itself checks out; the relinked one does not
    _bad(db, at + 2, "hash mismatch")


@pytest.mark.parametrize("seq", [0, -5])
def test_a_row_inserted_below_seq_1_is_named(db: RawDB, seq: int) -> None:
    """The walks read ``seq > 0``; a forged review verdict at seq 0 (or below) would be shown by every reader."""
    forged = {**_row(db, 1), "seq": seq, "request_id": "req-0007", "kind": "dispositioned", "principal": "rev",
              "body": '{"disposition":"ok","note":"reviewed, fine"}', "terminal_request_id": None,
              "payload": None, "payload_digest": None, "prev_hash": "e" * 64, "hash": "d" * 64}
    _tamper(db, _insert(db, forged), **forged)
    _bad(db, seq, f"entry {seq} has a seq below 1", "outside the chain", checked=0)  # workers: test_verify_parallel


def test_two_swapped_entries_are_caught(db: RawDB) -> None:
    _tamper(db, "UPDATE audit_entries SET seq = -1 WHERE seq = 90", "UPDATE audit_entries SET seq = 90 WHERE seq = 91",
            "UPDATE audit_entries SET seq = 91 WHERE seq = -1")
    _bad(db, 90, "prev_hash mismatch")


def _replace_rows(db: RawDB, first: int, last: int, team: str) -> str:
    """Rows ``first..last`` written again over themselves with another team: SQLite's INSERT OR REPLACE,
    PostgreSQL's ``INSERT … ON CONFLICT DO UPDATE`` (its upsert)."""
    if db.backend == "postgresql":
        return (f"INSERT INTO audit_entries SELECT * FROM audit_entries WHERE seq BETWEEN {first} AND {last}"
                f" ON CONFLICT (seq) DO UPDATE SET team = '{team}'")
    return ("INSERT OR REPLACE INTO audit_entries SELECT seq, created_at, request_id, kind, principal,"
            f" '{team}', model, body, policy_revision, terminal_request_id, prev_hash, hash, payload, payload_digest"
            f" FROM audit_entries WHERE seq BETWEEN {first} AND {last}")


def test_insert_or_replace_is_refused_by_the_guard(db: RawDB) -> None:
    with pytest.raises(DBAPIError, match="append-only"):
        db.execute(_replace_rows(db, 33, 33, "forged"))
    if db.backend == "sqlite":  # the single-row spelling an attacker would try first
        with pytest.raises(DBAPIError, match="append-only"):
            db.execute("INSERT OR REPLACE INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash,"
                       " hash) SELECT seq, created_at, 'forged', kind, '{}', prev_hash, hash FROM audit_entries"
                       " WHERE seq = 33")
    assert _verify(db).ok


def test_a_table_rebuilt_with_insert_or_replace_is_caught_once_the_guard_is_dropped(db: RawDB) -> None:
    """The attacker switches the guard off first, then rewrites rows in place (REPLACE / upsert)."""
    _tamper(db, _replace_rows(db, 150, 160, "blue"))
    assert db.rows("SELECT count(*) FROM audit_entries") == [(1 + 2 * REQUESTS + 20,)]
    assert db.rows("SELECT count(*) FROM audit_entries WHERE team = 'blue'") == [(11,)]
    _bad(db, 150, "hash mismatch")


# -- format 1 in an upgraded store ------------------------------------------------------


@pytest.fixture
def upgraded(db_url: str, backend: str) -> Iterator[RawDB]:
    engine = make_engine(db_url)
    migrate(engine, "audit_0001")
    for i in range(30):
        old_append(engine, "request", f"old-{i}", {"prompt": f"old question {i}", "decision": {"allow": True}})
    migrate(engine)
    store = AuditStore(engine)
    for i in range(10):
        store.append("request", f"new-{i}", principal="p", body={"decision": {"allow": True}},
                     payload={"prompt": f"new question {i}"}, **COMMON)
    engine.dispose()
    raw = RawDB(db_url, backend)
    yield raw
    raw.dispose()


def test_the_upgraded_store_verifies(upgraded: RawDB) -> None:
    result = _verify(upgraded)
    assert result.ok and result.checked == 41 and result.format_boundary == 31


def test_an_edited_format_1_entry_is_caught(upgraded: RawDB) -> None:
    _tamper(upgraded, f"UPDATE audit_entries SET body = {_json(upgraded, 'b')} WHERE seq = 8",
            b='{"decision":{"allow":false},"prompt":"old question 7"}')
    _bad(upgraded, 8, "hash mismatch")


def test_a_payload_planted_on_a_format_1_entry_is_caught(upgraded: RawDB) -> None:
    text = '{"prompt":"x","salt":"00"}'
    _tamper(upgraded, f"UPDATE audit_entries SET payload = {_json(upgraded, 'p')}, payload_digest = :d WHERE seq = 5",
            p=text, d=hashlib.sha256(text.encode()).hexdigest())
    _bad(upgraded, 5, "format 1")


def test_a_format_1_entry_dated_infinity_is_named(upgraded: RawDB) -> None:
    _tamper(upgraded, "UPDATE audit_entries SET created_at = 'infinity' WHERE seq = 12")
    _bad(upgraded, 12, "cannot be decoded", "edited")


def test_moving_the_format_boundary_is_caught(upgraded: RawDB) -> None:
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
    store.engine.dispose()


def test_processes_appending_at_once_leave_one_chain(store_url: str) -> None:
    """SQLite serialises them with BEGIN IMMEDIATE, PostgreSQL with an advisory lock on the chain head."""
    workers, per_worker = 4, 40  # the store is empty: the first append of whichever wins writes the boundary
    barrier = CHILDREN.Barrier(workers)
    processes = [CHILDREN.Process(target=_writer, args=(store_url, w, per_worker, barrier)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in processes] == [0] * workers

    store = AuditStore(make_engine(store_url))
    try:
        entries = list(store.iter_entries())
        assert [e.seq for e in entries] == list(range(1, workers * per_worker + 2))
        assert [e.kind for e in entries].count("chain_format") == 1 and entries[0].kind == "chain_format"
        for w in range(workers):
            mine = [e for e in entries if e.principal == f"p{w}"]
            assert len(mine) == per_worker and all(e.payload is not None for e in mine)
        result = verify_chain(store)
        assert result.ok and result.checked == workers * per_worker + 1
    finally:
        store.engine.dispose()
