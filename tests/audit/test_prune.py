"""``prune_payloads``: the texts of old entries go, their digests, metadata and the chain stay and verify.

On both backends (the ``store`` and ``db_url`` fixtures of tests/audit/conftest.py); that the
erased texts are gone from the files themselves is checked on SQLite, whose files the test can read.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from audit import AuditStore, make_engine, migrate, verify_chain
from audit.prune import prune_payloads, unrecorded_erasures
from tests.audit.conftest import RawDB
from tests.audit.old_append import old_append


def _pair(store: AuditStore, rid: str, marker: str) -> list[Any]:
    common: dict[str, Any] = dict(principal="alice", team="blue", model="tiny", policy_revision="rev-1")
    return [
        store.append("request", rid, body={"prompt_logging": "full", "decision": {"allow": True}},
                     payload={"messages": [{"role": "user", "content": f"{marker} question"}]}, **common),
        store.append("completion", rid, body={"usage": {"total_tokens": 5}},
                     payload={"output": f"{marker} answer"}, **common),
        store.append("rejected", f"{rid}-bad", body={"status": 400}, **common),  # no payload at all
    ]


def _cut() -> datetime:
    """A moment strictly between what was appended before and what is appended after."""
    time.sleep(0.01)
    cut = datetime.now(timezone.utc)
    time.sleep(0.01)
    return cut


def test_old_payloads_are_erased_and_the_erasure_is_on_the_chain(store: AuditStore, backend: str) -> None:
    old = [e for i in range(20) for e in _pair(store, f"old-{i}", f"OLDSECRET{i:03d}")]
    cut = _cut()
    new = [e for i in range(5) for e in _pair(store, f"new-{i}", f"NEWTEXT{i:03d}")]
    seen: list[int] = []

    result = prune_payloads(store, cut, batch=7, progress=seen.append)  # several batches

    with_payload = [e for e in old if e.payload is not None]
    assert result.erased == len(with_payload) == 40 and seen[-1] == 40 and len(seen) == 6
    assert (result.first_seq, result.last_seq) == (with_payload[0].seq, with_payload[-1].seq)
    assert result.skipped_format_1 == 0  # the boundary entry (chain_format) holds no text: not counted
    for before in old:
        after = store.get(before.seq)
        assert after is not None and after.payload is None
        assert (after.payload_digest, after.hash, after.body) == (before.payload_digest, before.hash, before.body)
    assert [store.get(e.seq) for e in new] == new  # the newer ones untouched

    entry = result.entry
    assert entry is not None and entry.kind == "payloads_erased" and store.head() == entry
    assert entry.body == {"before": cut.isoformat(timespec="microseconds"), "count": 40,
                          "first_seq": result.first_seq, "last_seq": result.last_seq, "skipped_format_1": 0}
    verdict = verify_chain(store)
    assert verdict.ok and verdict.checked == 1 + len(old) + len(new) + 1

    if backend == "sqlite":
        # The erased texts are gone from the files too (secure_delete, WAL truncated), the newer ones are not.
        # (Not checked on PostgreSQL: prune VACUUMs the dead row versions, but the server does not promise to
        # overwrite the freed space in its pages, so there is nothing to assert about its files.)
        store.engine.dispose()
        folder = Path(store.engine.url.database or "").parent
        raw = b"".join(p.read_bytes() for p in folder.glob("audit.db*"))
        assert b"OLDSECRET" not in raw and b"NEWTEXT004 answer" in raw

    again = prune_payloads(store, cut)
    assert (again.erased, again.entry) == (0, None)  # nothing left to erase, nothing recorded


def test_erasures_no_record_names_are_recorded_by_the_next_run(store: AuditStore, raw: RawDB) -> None:
    """A run that failed after some batches (or at its own record) erased payloads no payloads_erased entry names:
    the next run's record covers them, even when it finds nothing left to erase itself."""
    first = [e.seq for i in range(6) for e in _pair(store, f"old-{i}", f"OLD{i}") if e.payload is not None]
    cut = _cut()
    newer = [e.seq for e in _pair(store, "new", "NEW") if e.payload is not None]  # after the date: kept
    raw.execute(f"UPDATE audit_entries SET payload = NULL WHERE seq IN ({', '.join(map(str, first[:5]))})")
    assert unrecorded_erasures(store).seqs == first[:5]  # verify names them until a prune records them

    result = prune_payloads(store, cut)  # erases the other seven, records all twelve
    assert unrecorded_erasures(store).count == 0
    assert (result.erased, result.first_seq, result.last_seq) == (12, first[0], first[-1])
    assert result.entry is not None
    assert (result.entry.body["count"], result.entry.body["first_seq"], result.entry.body["last_seq"]) == (
        12, first[0], first[-1])

    assert all(store.get(seq).payload is not None for seq in newer)  # type: ignore[union-attr]
    second = newer + [e.seq for i in range(2) for e in _pair(store, f"later-{i}", f"LATER{i}") if e.payload is not None]
    cut = _cut()
    raw.execute(f"UPDATE audit_entries SET payload = NULL WHERE seq IN ({', '.join(map(str, second))})")
    again = prune_payloads(store, cut)  # nothing left to erase: it records the six, not the twelve again
    assert again.entry is not None
    assert (again.erased, again.entry.body["count"], again.entry.body["first_seq"], again.entry.body["last_seq"]) == (
        6, 6, second[0], second[-1])
    assert prune_payloads(store, cut).entry is None  # everything erased is on a record now
    assert verify_chain(store).ok


def test_nothing_before_the_date_means_nothing_erased(store: AuditStore) -> None:
    _pair(store, "r", "x")
    result = prune_payloads(store, datetime.now(timezone.utc) - timedelta(days=1))
    assert (result.erased, result.entry, result.skipped_format_1) == (0, None, 0)
    with pytest.raises(ValueError):
        prune_payloads(store, datetime(2024, 1, 1))  # naive: ambiguous


def test_format_1_entries_are_counted_and_left_alone(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate(engine, "audit_0001")
    for i in range(4):
        old_append(engine, "request", f"v1-{i}", {"prompt": f"old text {i}"})
    migrate(engine)
    store = AuditStore(engine)
    v2 = _pair(store, "v2", "V2TEXT")
    cut = _cut()

    result = prune_payloads(store, cut)
    assert result.erased == 2 and result.skipped_format_1 == 4  # the four old entries, not the boundary
    assert store.get(1).body == {"prompt": "old text 0"}  # type: ignore[union-attr]
    assert all(store.get(e.seq).payload is None for e in v2)  # type: ignore[union-attr]
    assert verify_chain(store).ok
    engine.dispose()


def test_a_payload_erased_outside_prune_is_named_even_with_the_guards_on(store: AuditStore, raw: RawDB) -> None:
    """``payload -> NULL`` is the one UPDATE the guards allow and changes nothing the chain covers: a
    database writer erased a denied request's prompt, verify passed and the console showed it as pruned."""
    old = [e for i in range(3) for e in _pair(store, f"old-{i}", f"OLD{i}") if e.payload is not None]
    cut = _cut()
    newer = [e for e in _pair(store, "new", "NEW") if e.payload is not None]
    assert prune_payloads(store, cut).erased == len(old)
    found = unrecorded_erasures(store)
    assert (found.count, found.records) == (0, 1)  # a prune's erasures are on its record
    raw.execute(f"UPDATE audit_entries SET payload = NULL WHERE seq = {newer[0].seq}")  # guards on
    found = unrecorded_erasures(store)
    assert (found.count, found.seqs) == (1, [newer[0].seq])
    assert verify_chain(store).ok  # the chain alone cannot see it


def test_a_prune_does_not_take_on_erasures_its_date_does_not_allow(store: AuditStore, raw: RawDB) -> None:
    """A database writer erased payloads of recent entries; the next routine prune, with an older date,
    recorded them as its own (its range spanned them, "created before" its date), and verify passed
    (probe s59 F3). Now the prune records only what its date allows and warns of the rest, and verify
    holds each erased entry to the date of a record that covers it."""
    old = [e.seq for i in range(2) for e in _pair(store, f"old-{i}", f"OLD{i}") if e.payload is not None]
    cut = _cut()
    recent = [e.seq for i in range(2) for e in _pair(store, f"new-{i}", f"NEW{i}") if e.payload is not None]
    raw.execute(f"UPDATE audit_entries SET payload = NULL WHERE seq IN ({old[1]}, {recent[0]}, {recent[2]})")
    result = prune_payloads(store, cut)
    assert result.entry is not None
    assert (result.erased, result.first_seq, result.last_seq) == (len(old), old[0], old[-1])
    assert result.warning is not None and "2 entries created on or after" in result.warning
    assert unrecorded_erasures(store).seqs == [recent[0], recent[2]]
    # a record whose range was stretched over them (a writer who rewrote its body would break the chain;
    # here a second, later prune with the earlier date reaches past them) still does not cover them
    raw.execute(f"UPDATE audit_entries SET payload = NULL WHERE seq = {recent[3]}")
    store.append("payloads_erased", "prune-forged-range", principal=None, team=None, model=None,
                 body={"before": result.entry.body["before"], "count": 4, "first_seq": old[0],
                       "last_seq": recent[3], "skipped_format_1": 0}, policy_revision=None)
    found = unrecorded_erasures(store)
    assert (found.count, found.seqs) == (3, [recent[0], recent[2], recent[3]])
    assert all(store.get(seq).payload is not None for seq in (recent[1],))  # type: ignore[union-attr]
    # and an entry past every record's range is named as before
    later = [e.seq for e in _pair(store, "later", "LATER") if e.payload is not None]
    raw.execute(f"UPDATE audit_entries SET payload = NULL WHERE seq = {later[0]}")
    assert later[0] in unrecorded_erasures(store).seqs
