"""Verify with several worker processes says exactly what the serial walk says, on both backends.

The chain is split into seq ranges (tests lower the entries-per-worker floor
so that a store of 61 entries splits into three ranges: 1..20, 21..40,
41..61); each tamper is placed inside a range, at a range's first or last
entry, or across an edge, and the whole :class:`audit.VerifyResult` (first
bad entry, problem, ``checked``, head, boundary) must be the serial one.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest

import audit.verify as verify_module
from audit import AuditError, AuditStore, make_engine, migrate, verify_chain
from tests.audit.conftest import RawDB
from tests.audit.old_append import old_append

WORKERS = 3
ENTRIES = 61  # the boundary and 60 appends: ranges (0, 20], (20, 40], (40, end)


@pytest.fixture(autouse=True)
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "MIN_ENTRIES_PER_WORKER", 10)


def _seed(raw: RawDB) -> None:
    store = raw.store()
    for i in range(30):
        common: dict[str, Any] = dict(principal=f"user{i % 3}", team="blue", model="tiny", policy_revision="rev-1")
        store.append("request", f"r{i}", body={"decision": {"allow": True}, "n": i},
                     payload={"messages": [{"role": "user", "content": f"question {i}"}]}, **common)
        store.append("completion", f"r{i}", body={"usage": {"completion_tokens": i}},
                     payload={"output": f"answer {i}"}, **common)


@pytest.fixture
def db(seeded_raw: Callable[[Callable[[RawDB], None]], RawDB]) -> RawDB:
    """The boundary and 30 request/completion pairs: a copy of the module's seeded store, the test's own."""
    return seeded_raw(_seed)


def _both(db: RawDB) -> tuple[Any, Any]:
    store = db.store()
    return verify_chain(store), verify_chain(store, workers=WORKERS)


def _same_verdict(db: RawDB, bad_seq: int | None, *words: str) -> Any:
    serial, parallel = _both(db)
    assert parallel == serial
    assert serial.first_bad_seq == bad_seq, serial
    for word in words:
        assert word in (serial.problem or ""), serial.problem
    return serial


def test_the_ranges_are_the_ones_the_tests_aim_at(db: RawDB) -> None:
    ranges, boundary = verify_module._plan(db.store().engine, WORKERS)
    assert ranges == [(0, 20), (20, 40), (40, None)] and boundary == 1


def test_an_untouched_chain_gives_the_serial_result(db: RawDB) -> None:
    result = _same_verdict(db, None)
    assert result.ok and result.checked == ENTRIES and result.head_seq == ENTRIES and result.format_boundary == 1


def test_fewer_workers_on_a_short_chain(db: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "MIN_ENTRIES_PER_WORKER", 25)
    assert len(verify_module._plan(db.store().engine, 8)[0]) == 2
    monkeypatch.setattr(verify_module, "MIN_ENTRIES_PER_WORKER", 100)
    assert len(verify_module._plan(db.store().engine, 8)[0]) == 1
    assert verify_chain(db.store(), workers=8).ok


def _respell(db: RawDB, column: str, seq: int, old: str, new: str) -> None:
    """Replace text inside a stored body or payload (on PostgreSQL through its text, back to JSON)."""
    if db.backend == "sqlite":
        value = f"REPLACE({column}, '{old}', '{new}')"
    else:
        value = f"CAST(REPLACE(CAST({column} AS TEXT), '{old}', '{new}') AS JSON)"
    db.without_guards(f"UPDATE audit_entries SET {column} = {value} WHERE seq = {seq}")


@pytest.mark.parametrize("seq", [5, 20, 21, 30, 40, 41, 55, ENTRIES])
def test_an_edited_body_is_named_in_any_range_and_at_its_edges(db: RawDB, seq: int) -> None:
    _respell(db, "body", seq, '":', '": ')  # the same JSON value, not the text that was hashed
    result = _same_verdict(db, seq, "hash mismatch")
    assert result.checked == seq - 1 and result.head_seq == seq - 1


@pytest.mark.parametrize("seq", [20, 21, 40, 41])
def test_a_deleted_entry_at_a_range_edge(db: RawDB, seq: int) -> None:
    db.without_guards(f"DELETE FROM audit_entries WHERE seq = {seq}")
    result = _same_verdict(db, seq + 1, "seq gap", f"{seq}..{seq}")
    assert result.checked == seq - 1


def test_a_whole_range_deleted(db: RawDB) -> None:
    db.without_guards("DELETE FROM audit_entries WHERE seq > 20 AND seq <= 40")
    _same_verdict(db, 41, "seq gap", "21..40")


@pytest.mark.parametrize("seq", [21, 41, 30])
def test_a_broken_link_at_and_off_a_range_edge(db: RawDB, seq: int) -> None:
    db.without_guards(f"UPDATE audit_entries SET prev_hash = '{'f' * 64}' WHERE seq = {seq}")
    _same_verdict(db, seq, "prev_hash mismatch")


@pytest.mark.parametrize("seq", [20, 40])
def test_entries_swapped_across_a_range_edge(db: RawDB, seq: int) -> None:
    db.without_guards(f"UPDATE audit_entries SET seq = -1 WHERE seq = {seq}",
                      f"UPDATE audit_entries SET seq = {seq} WHERE seq = {seq + 1}",
                      f"UPDATE audit_entries SET seq = {seq + 1} WHERE seq = -1")
    _same_verdict(db, seq, "prev_hash mismatch")


@pytest.mark.parametrize("seq", [21, 41])
def test_an_edited_payload_at_a_range_start(db: RawDB, seq: int) -> None:
    _respell(db, "payload", seq, "e", "E")
    _same_verdict(db, seq, "payload mismatch")


def test_the_lowest_of_several_bad_entries_wins(db: RawDB) -> None:
    db.without_guards("DELETE FROM audit_entries WHERE seq = 50",
                      f"UPDATE audit_entries SET prev_hash = '{'e' * 64}' WHERE seq = 33",
                      "UPDATE audit_entries SET principal = 'mallory' WHERE seq = 34")
    _same_verdict(db, 33, "prev_hash mismatch")


def test_a_tampered_first_range_stops_the_others(db: RawDB) -> None:
    db.without_guards("UPDATE audit_entries SET team = 'red' WHERE seq = 3",
                      "UPDATE audit_entries SET team = 'red' WHERE seq = 45")
    _same_verdict(db, 3, "hash mismatch")


def test_a_row_the_fast_path_does_not_take_is_checked_by_the_reference(db: RawDB) -> None:
    """A quote in a principal: the hashed text needs the encoder's escaping (sound), and a forged one (bad)."""
    store = db.store()
    for i in range(3):
        store.append("request", f"q{i}", principal='o"brien\\', team="blue", model="tiny", body={"n": i},
                     payload={"prompt": "x"}, policy_revision="rev-1")
    assert _same_verdict(db, None).checked == ENTRIES + 3
    db.without_guards("UPDATE audit_entries SET principal = 'o\"brian\\' WHERE seq = 63")
    _same_verdict(db, 63, "hash mismatch")


@pytest.mark.parametrize("seq", [0, -1])
def test_a_row_below_seq_1_is_named_whatever_the_workers(db: RawDB, seq: int) -> None:
    """No range reads it (they start after 0): it is looked for before the walks."""
    db.without_guards(
        "INSERT INTO audit_entries (seq, created_at, request_id, kind, principal, team, model, body, policy_revision,"
        " terminal_request_id, prev_hash, hash, payload, payload_digest) SELECT :seq, created_at, 'r3',"
        " 'dispositioned', 'reviewer', team, model, body, policy_revision, NULL,"
        f" '{'e' * 64}', '{'d' * 64}', NULL, NULL"
        " FROM audit_entries WHERE seq = 10", params={"seq": seq})
    result = _same_verdict(db, seq, f"entry {seq} has a seq below 1", "outside the chain")
    assert not result.ok and result.checked == 0
    assert verify_chain(db.store(), workers=2) == result


@pytest.mark.parametrize("backend", ["sqlite"])  # PostgreSQL stores no text that is not UTF-8
@pytest.mark.parametrize("seq", [5, 21, 30, 41, ENTRIES])
@pytest.mark.parametrize(("change", "problem"), [
    ("principal = CAST(X'61ff62' AS TEXT)", "audit entry {seq} cannot be decoded: its principal is not valid UTF-8"),
    ("team = CAST(X'ff' AS TEXT)", "audit entry {seq} cannot be decoded: its team is not valid UTF-8"),
    ("prev_hash = CAST(X'ff' AS TEXT)", "prev_hash mismatch: entry {seq} does not link"),  # the link first,
    (f"principal = CAST(X'ff' AS TEXT), prev_hash = '{'f' * 64}'", "prev_hash mismatch"),  # as on any row
])
def test_text_that_is_not_utf8_is_named_in_any_range(db: RawDB, seq: int, change: str, problem: str) -> None:
    """SQLite then fails the whole batch's fetch; verify names the entry instead of raising."""
    db.without_guards(f"UPDATE audit_entries SET {change} WHERE seq = {seq}")
    result = _same_verdict(db, seq, problem.format(seq=seq))
    assert result.checked == seq - 1 and result.head_seq == (seq - 1)
    assert verify_chain(db.store(), workers=2) == result


def test_spawned_workers_give_the_same_result(db: RawDB) -> None:
    """Another thread running: the workers are spawned, not forked."""
    db.without_guards("UPDATE audit_entries SET model = 'big' WHERE seq = 44")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        _same_verdict(db, 44, "hash mismatch")
    finally:
        stop.set()
        other.join()


def test_workers_are_forked_beside_the_stall_watch_alone(db: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL the connections start the stall watch's thread; it alone does not make verify spawn.

    (A spawned worker spends about 0.7 s of CPU importing SQLAlchemy; on
    PostgreSQL every ``verify --jobs`` spawned until 2026-12-02.)
    """
    import multiprocessing

    from audit import stall_watch

    store = db.store()
    store.append("request", "r-watched", principal="p", team="t", model="m", body={}, policy_revision="r")
    if db.backend == "postgresql":
        assert stall_watch._thread is not None and stall_watch._thread.is_alive()
    methods: list[str] = []
    real_get_context = multiprocessing.get_context

    def recording(method: str | None = None) -> Any:
        methods.append(str(method))
        return real_get_context(method)

    monkeypatch.setattr(verify_module.multiprocessing, "get_context", recording)
    assert verify_chain(store, workers=WORKERS) == verify_chain(store)
    assert methods == ["fork"]


def test_a_worker_that_cannot_read_is_an_audit_error(db: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers open the store from the URL they are given, forked or spawned (another thread running).

    Here that URL names no database (on SQLite a folder under the database
    file, which cannot be made), while this process's own connections, made
    from the engine's original arguments, still reach the real one. A patch
    of ``make_engine`` in this process would reach forked children only.
    """
    store = db.store()
    url = store.engine.url
    missing = (url.set(database=f"{url.database}/no such database/audit.db") if db.backend == "sqlite"
               else url.set(database="no such database"))
    monkeypatch.setattr(store.engine, "url", missing)
    with pytest.raises(AuditError, match="verify worker could not read.*no such database"):
        verify_chain(store, workers=WORKERS)


# -- an upgraded store: format 1, the boundary, format 2 across the ranges ----------------------


@pytest.fixture
def upgraded(tmp_path: Any) -> Iterator[AuditStore]:
    """30 format-1 entries, the boundary at 31 (in the second range), 30 format-2 entries."""
    engine = make_engine(f"sqlite:///{tmp_path / 'upgraded.db'}")
    migrate(engine, "audit_0001")
    for i in range(30):
        old_append(engine, "request", f"old-{i}", {"prompt": f"old question {i}", "decision": {"allow": True}})
    migrate(engine)
    store = AuditStore(engine)
    for i in range(30):
        store.append("request", f"new-{i}", principal="p", team="t", model="m", body={"n": i},
                     payload={"prompt": f"new question {i}"}, policy_revision="r")
    yield store
    engine.dispose()


def test_an_upgraded_store_splits_across_its_boundary(upgraded: AuditStore) -> None:
    assert verify_module._plan(upgraded.engine, WORKERS) == ([(0, 20), (20, 40), (40, None)], 31)
    serial, parallel = verify_chain(upgraded), verify_chain(upgraded, workers=WORKERS)
    assert parallel == serial and serial.ok and serial.format_boundary == 31 and serial.checked == 61


@pytest.mark.parametrize(("sql", "seq"), [
    ("UPDATE audit_entries SET kind = 'request' WHERE seq = 31", 31),  # the boundary hidden
    ("UPDATE audit_entries SET body = '{\"format\"\\:3}' WHERE seq = 31", 31),  # "\\:" is a colon to text()
    ("UPDATE audit_entries SET request_id = 'x' WHERE seq = 25", 25),  # format 1, the boundary's range
    ("UPDATE audit_entries SET kind = 'chain_format' WHERE seq = 45", 45),  # a second boundary
])
def test_tampering_around_the_boundary(upgraded: AuditStore, sql: str, seq: int) -> None:
    raw = RawDB(str(upgraded.engine.url), "sqlite")
    try:
        raw.without_guards(sql)
    finally:
        raw.dispose()
    serial, parallel = verify_chain(upgraded), verify_chain(upgraded, workers=WORKERS)
    assert parallel == serial and serial.first_bad_seq == seq, serial


# -- govgate audit verify --jobs ---------------------------------------------------------------


def test_the_cli_verifies_with_jobs_and_names_the_same_entry(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import audit
    from tests.audit.test_checkpoint_cli import Env

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    raw = RawDB(url, "sqlite")
    env = Env(tmp_path, raw)
    env.append(60)
    raw.without_guards("UPDATE audit_entries SET principal = 'mallory' WHERE seq = 45")
    raw.dispose()
    asked: list[int | None] = []
    real = audit.verify_chain

    def spy(source: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("workers"))
        return real(source, **kwargs)

    monkeypatch.setattr(audit, "verify_chain", spy)
    try:
        for args, workers in ((["--jobs", "3"], 3), (["-j", "1"], 1), ([], os.cpu_count())):
            result = env.run("verify", *args)
            assert result.exit_code == 1 and "BROKEN at seq 45: hash mismatch" in result.output, result.output
            assert "(44 entries checked)" in result.output and asked[-1] == workers
        assert env.run("verify", "--jobs", "0").exit_code == 2
    finally:
        env.engine.dispose()


_WATCHDOG_BUSY = '''
import threading, time
from audit import stall_watch

class Stuck:
    """A watched connection whose cut is under way and held (the watchdog writing its log line to a stderr
    nobody drains, say: a child forked then would find that stream's lock held for good)."""
    def __init__(self):
        self.due, self.inside, self.release = time.monotonic(), threading.Event(), threading.Event()
    def stall_due(self):
        return self.due
    def cut_if_stalled(self, due):
        self.inside.set()
        self.release.wait()
        self.due = None

stuck = Stuck()
print("idle", stall_watch.fork_is_safe())
stall_watch.watch(stuck)
assert stuck.inside.wait(30)
print("looking", stall_watch.fork_is_safe())
stuck.release.set()
deadline = time.monotonic() + 30
while not stall_watch.fork_is_safe() and time.monotonic() < deadline:
    time.sleep(0.01)
print("asleep", stall_watch.fork_is_safe(), stall_watch._thread.is_alive())
'''


def test_no_fork_while_the_stall_watch_is_acting_on_a_connection() -> None:
    """The watchdog asleep holds nothing a child needs; in the middle of a look it may be writing a log line
    (a stream's own lock, which no fork handler renews) or starting a probe's thread. A process of its own:
    another test's leftover thread would make the answer False anyway."""
    import os
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-c", _WATCHDOG_BUSY], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["idle", "True", "looking", "False", "asleep", "True", "True"]
