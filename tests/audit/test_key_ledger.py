"""The key ledger's fold and reconcile, on entries written by hand (no database).

The database cases (SQL edits of a real key table, the CLI) are in
tests/gateway/test_keys_on_chain.py; here each rule of the fold is tried on
its own, including the chains a careless or hostile writer could produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from audit.key_ledger import KeyRecord, fold, key_fingerprint, reconcile


@dataclass
class Entry:
    seq: int
    kind: str
    body: dict[str, Any] = field(default_factory=dict)


def created(seq: int, key_id: str, roles: list[str], *, user: str = "ann", team: str | None = "ops",
            fingerprint: str | None = "f" * 64) -> Entry:
    return Entry(seq, "key_created", {"key_id": key_id, "user": user, "team": team, "roles": roles,
                                      "fingerprint": fingerprint, "by": "test"})


def record(key_id: str, roles: tuple[str, ...], revoked: bool = False, **extra: Any) -> KeyRecord:
    return KeyRecord(key_id=key_id, roles=roles, revoked=revoked, **extra)


def codes(found) -> list[tuple[str, str | None]]:
    return [(d.code, d.key_id) for d in found]


def test_create_revoke_and_roles_fold_into_the_table_state():
    ledger = fold([created(1, "k1", ["analyst"]), Entry(2, "request"),
                   Entry(3, "key_roles_changed", {"key_id": "k1", "old_roles": ["analyst"],
                                                  "new_roles": ["admin", "analyst"], "by": "t"}),
                   created(4, "k2", ["viewer"]), Entry(5, "key_revoked", {"key_id": "k2", "by": "t"})])
    assert ledger.entries == 4
    assert ledger.keys["k1"].roles == ("admin", "analyst") and not ledger.keys["k1"].revoked
    assert ledger.keys["k2"].revoked
    rows = [record("k1", ("analyst", "admin"), user="ann", team="ops", fingerprint="f" * 64),
            record("k2", ("viewer",), revoked=True)]
    assert reconcile(ledger, rows) == []


def test_every_way_the_table_can_differ_is_named():
    ledger = fold([created(1, "k1", ["analyst"]), created(2, "k2", ["viewer"]),
                   Entry(3, "key_revoked", {"key_id": "k2", "by": "t"}), created(4, "k3", ["viewer"]),
                   created(5, "k4", ["viewer"])])
    rows = [record("k1", ("admin",)),                       # roles given by SQL
            record("k2", ("viewer",), revoked=False),       # revocation undone
            record("k3", ("viewer",), revoked=True),        # revoked without an entry
            record("k9", ("admin",))]                       # row planted; k4's row deleted
    found = reconcile(ledger, rows)
    assert codes(found) == [("roles_differ", "k1"), ("revoked_on_chain_only", "k2"),
                            ("revoked_in_table_only", "k3"), ("not_on_chain", "k9"),
                            ("missing_from_table", "k4")]
    assert "admin" in found[0].detail and "analyst" in found[0].detail


def test_owner_team_and_digest_are_compared_when_given():
    ledger = fold([created(1, "k1", ["analyst"], user="ann", team=None, fingerprint=key_fingerprint("a" * 64))])
    assert reconcile(ledger, [record("k1", ("analyst",))]) == []  # nothing but roles/revoked given
    assert reconcile(ledger, [record("k1", ("analyst",), user="ann", team=None,
                                     fingerprint=key_fingerprint("a" * 64))]) == []
    found = reconcile(ledger, [record("k1", ("analyst",), user="bob", team="ops",
                                      fingerprint=key_fingerprint("b" * 64))])
    assert codes(found) == [("user_differs", "k1"), ("team_differs", "k1"), ("fingerprint_differs", "k1")]


def test_the_fingerprint_is_neither_the_digest_nor_stable_across_digests():
    digest = "ab" * 32
    assert key_fingerprint(digest) != digest and len(key_fingerprint(digest)) == 64
    assert key_fingerprint(digest) != key_fingerprint("cd" * 32)


def test_a_backfill_gives_the_keys_that_existed_before():
    backfill = Entry(7, "key_created", {"backfilled": True, "by": "upgrade", "keys": [
        {"key_id": "old1", "user": "ann", "team": None, "roles": ["admin"], "revoked": False},
        {"key_id": "old2", "user": "bob", "team": "ops", "roles": ["viewer"], "revoked": True}]})
    ledger = fold([backfill, created(8, "new", ["viewer"])])
    assert ledger.backfill_seq == 7 and ledger.keys["old2"].revoked and not ledger.keys["old1"].revoked
    assert reconcile(ledger, [record("old1", ("admin",)), record("old2", ("viewer",), True),
                              record("new", ("viewer",))]) == []


@pytest.mark.parametrize("late_first", [True, False])
def test_a_backfill_after_other_key_entries_or_a_second_one_is_not_trusted(late_first: bool):
    late = Entry(9, "key_created", {"backfilled": True, "keys": [
        {"key_id": "planted", "user": "eve", "team": None, "roles": ["admin"], "revoked": False}]})
    first = (Entry(1, "key_created", {"backfilled": True, "keys": []}) if not late_first
             else created(1, "k1", ["viewer"]))
    ledger = fold([first, late])
    assert "planted" not in ledger.keys
    found = reconcile(ledger, [record("planted", ("admin",))] + ([record("k1", ("viewer",))] if late_first else []))
    assert codes(found) == [("chain_inconsistent", None), ("not_on_chain", "planted")]
    assert found[0].seq == 9


def test_the_chain_contradicting_itself_is_reported():
    ledger = fold([Entry(1, "key_revoked", {"key_id": "ghost", "by": "t"}),
                   created(2, "k1", ["viewer"]), created(3, "k1", ["admin"]),
                   Entry(4, "key_roles_changed", {"key_id": "k1", "old_roles": ["admin"], "new_roles": ["x"]}),
                   Entry(5, "key_revoked", {"key_id": "k1"}), Entry(6, "key_revoked", {"key_id": "k1"}),
                   Entry(7, "key_roles_changed", {"key_id": "k1", "old_roles": "x", "new_roles": []}),
                   Entry(8, "key_created", {"user": "nobody"}), Entry(9, "key_created", {"key_id": "k2"})])
    assert [(d.code, d.seq) for d in ledger.problems] == [
        ("chain_inconsistent", 1), ("chain_inconsistent", 3), ("chain_inconsistent", 4),
        ("chain_inconsistent", 6), ("malformed_entry", 7), ("malformed_entry", 8), ("malformed_entry", 9)]
    # The first creation stands; the roles change was applied despite its wrong old_roles.
    assert ledger.keys["k1"].roles == ("x",) and ledger.keys["k1"].created_seq == 2


def test_a_discrepancy_reads_as_one_line():
    (found,) = reconcile(fold([]), [record("k1", ("admin",))])
    assert found.describe().startswith("key k1: not_on_chain: ") and "\n" not in found.describe()
