"""The fast loop of verify gives the reference check's verdict, to the letter, on odd and tampered rows.

:meth:`audit.verify_walk._Walk.walk_fast` writes the hashed text of a
format-2 row itself, taking shortcuts that must give the encoder's very
characters (quoted strings kept from earlier rows, hex digests written
without quoting, a terminal id reusing the request id's). Each case here
runs verify twice on the same database: as it is, and with every row sent
through the reference check instead (the row read again with the columns
as the driver types them, hashed through ``json.JSONEncoder``). The whole
:class:`audit.VerifyResult` must be equal (first bad entry, problem with
its hash prefixes, ``checked``, head), serially and with three workers,
whose ranges start on a row whose ``prev_hash`` is taken on trust.
"""

from __future__ import annotations

from typing import Any, Callable

import sqlite3

import pytest

import audit.verify as verify_module
import audit.verify_walk as verify_walk
from audit import verify_chain
from tests.audit.conftest import RawDB

WORKERS = 3
#: Names that need the encoder's escaping, or none, or are not ASCII; each used by several entries.
NAMES = ('o"brien\\', "émigré 日本", "\u2028sep", "", "plain", "tab\there")



@pytest.fixture(autouse=True)
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "MIN_ENTRIES_PER_WORKER", 10)  # 61 entries: (0, 20], (20, 40], (40, end)


@pytest.fixture
def db(seeded_raw: Callable[[Callable[[RawDB], None]], RawDB]) -> RawDB:
    """The boundary and 30 request/completion pairs with odd names, ids and payloads (a copy, the test's own)."""
    return seeded_raw(_seed)


def _seed(raw: RawDB) -> None:
    store = raw.store()
    for i in range(30):
        name = NAMES[i % len(NAMES)]
        rid = f'r"{i}\\' if i % 4 == 0 else f"r-{i}"
        common: dict[str, Any] = dict(principal=name, team=NAMES[(i + 1) % len(NAMES)] if i % 5 else None,
                                      model="tiny" if i % 3 else name, policy_revision="rev-1" if i % 2 else None)
        store.append("request", rid, body={"decision": {"allow": True}, "n": i, "note": name},
                     payload={"messages": [{"role": "user", "content": f"question {i} {name}"}]}, **common)
        store.append("completion", rid, body={"usage": {"completion_tokens": i}},
                     payload={"output": f"answer {i}"} if i % 7 else None, **common)


def _reference_only(self: Any, rows: list[tuple[Any, ...]]) -> None:
    """Every row read again by the reference statement and checked by the reference code."""
    self.walk([self.one(row[0]) for row in rows])


def _verdicts(db: RawDB, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Any]:
    store = db.store()
    fast, fast_parallel = verify_chain(store), verify_chain(store, workers=WORKERS)
    with monkeypatch.context() as patch:
        patch.setattr(verify_walk._Walk, "walk_fast", _reference_only)
        reference = verify_chain(store)
    return fast, fast_parallel, reference


def test_odd_names_verify_as_the_reference_does(db: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, fast_parallel, reference = _verdicts(db, monkeypatch)
    assert reference.ok and reference.checked == 61, reference
    assert fast == reference and fast_parallel == reference


BOTH = [
    ("UPDATE audit_entries SET principal = 'émigré 日本' WHERE seq = 7", 7),  # a name the loop has quoted before
    ("UPDATE audit_entries SET principal = 'x\"y' WHERE seq = 8", 8),  # a new name that needs escaping
    ("UPDATE audit_entries SET team = NULL WHERE seq = 9", 9),
    ("UPDATE audit_entries SET kind = 'flagged' WHERE seq = 10", 10),  # another kind, one already met
    ("UPDATE audit_entries SET payload = NULL WHERE seq = 12", None),  # erased: the digest stays and is hashed
    ("UPDATE audit_entries SET payload = NULL, payload_digest = upper(payload_digest) WHERE seq = 12", 12),
    ("UPDATE audit_entries SET payload = NULL, payload_digest = 'a\"b' WHERE seq = 12", 12),  # no hex digest
    ("UPDATE audit_entries SET payload_digest = NULL WHERE seq = 14", 14),  # a payload without a digest
    ("UPDATE audit_entries SET payload = '{\"x\"\\:1}' WHERE seq = 16", 16),  # the payload edited
    ("UPDATE audit_entries SET payload = '{\"x\"\\:1}', model = 'big' WHERE seq = 16", 16),  # the hash first
    ("UPDATE audit_entries SET prev_hash = 'x\"' || substr(prev_hash, 3) WHERE seq = 21", 21),  # a range's first row
    ("UPDATE audit_entries SET prev_hash = upper(prev_hash) WHERE seq = 41", 41),
    ("UPDATE audit_entries SET request_id = 'q\"\\', terminal_request_id = 'q\"\\' WHERE seq = 23", 23),
    ("UPDATE audit_entries SET request_id = 'r-30', terminal_request_id = 'r-30' WHERE seq = 45", 45),
    ("UPDATE audit_entries SET policy_revision = 'rev-1' WHERE seq = 2", 2),
]
SQLITE_ONLY = [
    ("UPDATE audit_entries SET principal = X'706c61696e' WHERE seq = 11", 11),  # 'plain' as a BLOB
    ("UPDATE audit_entries SET kind = CAST(kind AS BLOB) WHERE seq = 33", 33),
    ("UPDATE audit_entries SET created_at = 5 WHERE seq = 27", 27),
    ("UPDATE audit_entries SET created_at = replace(created_at, ' ', 'T') WHERE seq = 28", 28),
    ("UPDATE audit_entries SET payload_digest = CAST(payload_digest AS BLOB) WHERE seq = 29", 29),
    ("UPDATE audit_entries SET body = CAST(body AS BLOB) WHERE seq = 30", 30),
    ("UPDATE audit_entries SET body = X'' WHERE seq = 30", 30),  # the empty BLOB, the lowest of them
    ("UPDATE audit_entries SET body = 5 WHERE seq = 30", 30),  # a number (the JSON column's affinity keeps it)
    ("UPDATE audit_entries SET body = 1.5 WHERE seq = 30", 30),
    ("UPDATE audit_entries SET request_id = request_id || char(0) WHERE seq = 31", 31),
    ("UPDATE audit_entries SET terminal_request_id = NULL WHERE seq = 35", 35),
    ("UPDATE audit_entries SET terminal_request_id = 'r-17\"' WHERE seq = 37", 37),  # not the request id
]
POSTGRESQL_ONLY = [
    ("UPDATE audit_entries SET created_at = created_at + interval '1 microsecond' WHERE seq = 27", 27),
    ("UPDATE audit_entries SET created_at = date_trunc('second', created_at) WHERE seq = 28", 28),
]


def _same_verdicts(db: RawDB, monkeypatch: pytest.MonkeyPatch, sql: str, seq: int | None) -> None:
    db.without_guards("PRAGMA ignore_check_constraints = ON", sql) if db.backend == "sqlite" else db.without_guards(sql)
    fast, fast_parallel, reference = _verdicts(db, monkeypatch)
    assert reference.first_bad_seq == seq, reference
    assert fast == reference, (fast, reference)
    assert fast_parallel == reference, (fast_parallel, reference)


@pytest.mark.parametrize(("sql", "seq"), BOTH)
def test_a_tampered_row_gets_the_reference_verdict(db: RawDB, monkeypatch: pytest.MonkeyPatch, sql: str,
                                                   seq: int | None) -> None:
    _same_verdicts(db, monkeypatch, sql, seq)


@pytest.mark.parametrize("backend", ["sqlite"])  # SQLite keeps any type in any column
@pytest.mark.parametrize(("sql", "seq"), SQLITE_ONLY)
def test_a_value_of_another_type_gets_the_reference_verdict(db: RawDB, monkeypatch: pytest.MonkeyPatch, sql: str,
                                                            seq: int | None) -> None:
    _same_verdicts(db, monkeypatch, sql, seq)


@pytest.mark.parametrize("backend", ["postgresql"])  # its timestamps are read as text by the fast statement
@pytest.mark.parametrize(("sql", "seq"), POSTGRESQL_ONLY)
def test_a_timestamp_edited_on_postgresql_gets_the_reference_verdict(db: RawDB, monkeypatch: pytest.MonkeyPatch,
                                                                     sql: str, seq: int | None) -> None:
    _same_verdicts(db, monkeypatch, sql, seq)


def test_the_rows_after_the_boundary_take_the_fast_loop(db: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The boundary (seq 1) is checked by the reference; the rest of its batch is read again, fast."""
    fast_rows: list[int] = []
    real = verify_walk._Walk.walk_fast

    def counting(self: Any, rows: list[tuple[Any, ...]]) -> None:
        fast_rows.extend(row[0] for row in rows)
        real(self, rows)

    monkeypatch.setattr(verify_walk._Walk, "walk_fast", counting)
    result = verify_chain(db.store())
    assert result.ok and result.checked == 61 and result.format_boundary == 1, result
    assert fast_rows == list(range(2, 62))


#: Values of every SQLite storage class, the edges of each (the empty text and BLOB, a NUL inside).
STORED = ["{}", "", "a\x00b", "\x00", "5", "1.5", "ABC", "é日本", b"", b"\x00", b"{}", 5, -1, 0, 1.5, None]


@pytest.mark.parametrize("declared", ["JSON", "TEXT", "BLOB", "INTEGER", "", "TEXT COLLATE NOCASE",
                                      "JSON COLLATE RTRIM"])
def test_the_fast_statement_reads_a_body_as_bytes_exactly_when_it_is_stored_as_text(declared: str) -> None:
    """The comparisons in the fast statement's body column pick TEXT and nothing else, as typeof() would.

    Whatever the column's declared type (its affinity turns '5' into a number under JSON's NUMERIC) or
    collation: a body they let through is hashed as its bytes, one they hold back goes to the reference.
    """
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE t (body {declared})")
    conn.executemany("INSERT INTO t VALUES (?)", [(value,) for value in STORED])
    rows = conn.execute(f"SELECT {verify_walk._BODY_AS_STORED_BYTES}, "
                        "CASE WHEN typeof(body) = 'text' THEN CAST(body AS BLOB) END, typeof(body) FROM t").fetchall()
    assert len(rows) == len(STORED)
    for fast, by_typeof, kind in rows:
        assert fast == by_typeof, (declared, kind, fast, by_typeof)
        assert (fast is not None) == (kind == "text")
    assert {kind for _, _, kind in rows} >= {"text", "blob", "null"}
    conn.close()
