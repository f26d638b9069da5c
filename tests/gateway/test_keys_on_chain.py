"""Key changes are audit entries, and ``govgate audit verify`` holds the key table to them.

Real SQLite files, the real CLI and a real Redis (the suite's). Tampering is
done as an attacker with the file would do it: plain SQL on ``api_keys``
(which has no guard triggers), then ``audit verify`` must exit 1 and name
the key and what differs, while the hash chain itself still verifies.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner
from sqlalchemy import literal, select

from audit import AuditStore
from audit.db import make_engine, migrate
from audit.key_ledger import BACKFILL_REQUEST_ID, key_fingerprint, key_request_id
from gateway.auth import KeyStore, KeyStoreError
from gateway.auth import keys as keys_module
from gateway.auth.key_changes import KEYS_CHANGED_CHANNEL
from gateway.db_setup import migrate_gateway, open_database
from govgate.cli import main
from govgate.cli_keys import cli_actor
from govgate.supervisor import child_env
from tests.keys_and_limits import secret_part


@pytest.fixture
def own(settings, tmp_path):
    """Settings for a database of the test's own."""
    return settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}")


@pytest.fixture
def engine(own):
    engine = open_database(own)
    yield engine
    engine.dispose()


def cli(own, *args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args), env=child_env(own, own.redis_url), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def sql(own, statement: str, *params) -> None:
    """Plain SQL on the database file, outside govgate."""
    with sqlite3.connect(own.effective_database_url.removeprefix("sqlite:///")) as db:
        db.execute(statement, params)


def key_entries(engine, key_id: str) -> list[tuple[str, dict]]:
    return [(entry.kind, entry.body) for entry in AuditStore(engine).entries_for(key_request_id(key_id))]


def verify(own, *, ok: bool):
    result = cli(own, "audit", "verify", ok=False)
    assert result.exit_code == (0 if ok else 1), result.output
    assert result.output.startswith("ok: "), result.output  # the hash chain itself is intact either way
    return result.output


# -- normal changes ------------------------------------------------------------


def test_create_roles_and_revoke_through_the_store_are_entries_and_verify_is_clean(own, engine):
    store = KeyStore(engine)
    issued = store.create("ann", team="ops", roles=["viewer", "analyst", "viewer"], note="dashboards", by="tester")
    key_id = issued.key.key_id
    change = store.set_roles(key_id, ["admin"], by="tester")
    assert change is not None and change.changed and change.old_roles == ["analyst", "viewer"]
    assert store.revoke(key_id, by="tester")
    assert key_entries(engine, key_id) == [
        ("key_created", {"key_id": key_id, "user": "ann", "team": "ops", "roles": ["analyst", "viewer"],
                         "note": "dashboards", "by": "tester", "fingerprint": key_fingerprint(issued.key.key_hash)}),
        ("key_roles_changed", {"key_id": key_id, "old_roles": ["analyst", "viewer"], "new_roles": ["admin"],
                               "by": "tester"}),
        ("key_revoked", {"key_id": key_id, "by": "tester"}),
    ]
    (created,) = AuditStore(engine).entries_for(key_request_id(key_id))[:1]
    assert (created.principal, created.team, created.model) == ("ann", "ops", None)
    assert "keys: the key table matches the chain (1 keys)" in verify(own, ok=True)


def test_changes_that_change_nothing_write_nothing(engine):
    store = KeyStore(engine)
    key_id = store.create("bob", team=None, roles=["viewer"]).key.key_id
    unchanged = store.set_roles(key_id, ["viewer"])
    assert unchanged is not None and not unchanged.changed
    assert store.revoke(key_id) and not store.revoke(key_id)  # the second finds no live key
    assert store.set_roles(key_id, ["admin"]) is None  # a revoked key keeps its roles
    assert store.set_roles("000000000000", ["admin"]) is None
    assert [kind for kind, _ in key_entries(engine, key_id)] == ["key_created", "key_revoked"]
    assert store.get(key_id).roles == ["viewer"]


def test_the_cli_records_who_made_each_change_and_tells_the_gateways(own, engine):
    secret = cli(own, "keys", "create", "--user", "cai", "--role", "analyst").stdout.strip()
    key_id = secret.split("_")[1]
    channel = __import__("redis").Redis.from_url(own.redis_url).pubsub(ignore_subscribe_messages=True)
    channel.subscribe(KEYS_CHANGED_CHANNEL)
    assert channel.get_message(timeout=5) is None  # the subscription's confirmation
    try:
        changed = cli(own, "keys", "roles", key_id, "admin", "viewer")
        assert changed.stdout.strip() == f"{key_id}: roles analyst -> admin,viewer"
        message = channel.get_message(timeout=5)
        assert message is not None and message["data"].decode() == key_id
    finally:
        channel.close()
    assert "nothing changed" in cli(own, "keys", "roles", key_id, "viewer", "admin").stdout
    cli(own, "keys", "revoke", key_id)
    channel = __import__("redis").Redis.from_url(own.redis_url).pubsub(ignore_subscribe_messages=True)
    channel.subscribe(KEYS_CHANGED_CHANNEL)
    assert channel.get_message(timeout=5) is None
    try:  # a repeated revoke changes nothing and tells the gateways again (the first run's signal may be lost)
        assert "nothing changed" in cli(own, "keys", "revoke", key_id).stdout
        message = channel.get_message(timeout=5)
        assert message is not None and message["data"].decode() == key_id
    finally:
        channel.close()
    actor = cli_actor()
    assert actor.startswith("cli:") and len(actor) > 4
    assert [(kind, body["by"]) for kind, body in key_entries(engine, key_id)] == [
        ("key_created", actor), ("key_roles_changed", actor), ("key_revoked", actor)]
    assert KeyStore(engine).get(key_id).roles == ["admin", "viewer"]
    assert "(1 keys)" in verify(own, ok=True)


@pytest.mark.parametrize("args, problem", [
    (("wizard",), "unknown role 'wizard'"),
    ((), "Missing argument 'ROLES...'"),
])
def test_keys_roles_refuses_unknown_or_missing_roles(own, engine, args, problem):
    key_id = KeyStore(engine).create("dee", team=None, roles=["viewer"]).key.key_id
    result = cli(own, "keys", "roles", key_id, *args, ok=False)
    assert result.exit_code != 0 and problem in result.output
    assert KeyStore(engine).get(key_id).roles == ["viewer"]
    assert len(key_entries(engine, key_id)) == 1


def test_keys_roles_refuses_a_revoked_key_and_a_pasted_secret(own, engine):
    store = KeyStore(engine)
    issued = store.create("eli", team=None, roles=["viewer"])
    key_id = issued.key.key_id
    pasted = cli(own, "keys", "roles", issued.secret, "admin", ok=False)
    assert pasted.exit_code == 1 and issued.secret not in pasted.output
    assert f"pass the key id: govgate keys roles {key_id}" in pasted.output
    store.revoke(key_id)
    revoked = cli(own, "keys", "roles", key_id, "admin", ok=False)
    assert revoked.exit_code == 1 and f"no live key with id {key_id}" in revoked.output
    assert store.get(key_id).roles == ["viewer"]


def test_no_entry_holds_the_secret_or_its_digest(own, engine):
    store = KeyStore(engine)
    issued = store.create("fay", team="ops", roles=["analyst"], note="n")
    store.set_roles(issued.key.key_id, ["viewer"])
    store.revoke(issued.key.key_id)
    with sqlite3.connect(own.effective_database_url.removeprefix("sqlite:///")) as db:
        stored = "\n".join(str(row) for row in db.execute("SELECT * FROM audit_entries"))
    random_part = secret_part(issued.secret)
    assert issued.key.key_id in stored  # the scan sees the entries at all
    for needle in (issued.secret, random_part, issued.key.key_hash):
        assert needle not in stored


# -- tampering with the key table ----------------------------------------------


@pytest.mark.parametrize("tamper, code", [
    ("UPDATE api_keys SET roles_json = '[\"admin\", \"analyst\"]' WHERE key_id = :id", "roles_differ"),
    ("UPDATE api_keys SET revoked_at = '2026-01-01T00:00:00+00:00' WHERE key_id = :id", "revoked_in_table_only"),
    ("UPDATE api_keys SET key_hash = '" + "0" * 64 + "' WHERE key_id = :id", "fingerprint_differs"),
    ("UPDATE api_keys SET team = 'finance' WHERE key_id = :id", "team_differs"),
    ("UPDATE api_keys SET user = 'root' WHERE key_id = :id", "user_differs"),
    # the note was on the chain but not compared: "approved by CISO" showed in keys list as fact
    ("UPDATE api_keys SET note = 'approved by CISO' WHERE key_id = :id", "note_differs"),
    ("DELETE FROM api_keys WHERE key_id = :id", "missing_from_table"),
    ("UPDATE api_keys SET roles_json = 'admin' WHERE key_id = :id", "roles_differ"),
])
def test_a_key_row_edited_with_sql_is_reported(own, engine, tamper, code):
    key_id = KeyStore(engine).create("gus", team="ops", roles=["analyst"]).key.key_id
    KeyStore(engine).create("hal", team="ops", roles=["viewer"])  # untouched: not reported
    verify(own, ok=True)
    sql(own, tamper.replace(":id", "?"), key_id)
    output = verify(own, ok=False)
    reported = [line for line in output.splitlines() if line.startswith("KEY TAMPERED: ")]
    assert reported == [line for line in reported if f"key {key_id}: {code}: " in line] and len(reported) == 1, output


def test_a_revocation_undone_with_sql_is_reported(own, engine):
    store = KeyStore(engine)
    issued = store.create("ivy", team=None, roles=["admin"])
    key_id = issued.key.key_id
    store.revoke(key_id)
    sql(own, "UPDATE api_keys SET revoked_at = NULL WHERE key_id = ?", key_id)
    assert store.authenticate(issued.secret) is not None  # what the attacker gained
    output = verify(own, ok=False)
    assert f"KEY TAMPERED: key {key_id}: revoked_on_chain_only: " in output


def test_a_key_row_inserted_with_sql_is_reported_and_never_backfilled(own, engine):
    KeyStore(engine).create("jan", team=None, roles=["viewer"])
    sql(own, "INSERT INTO api_keys (key_id, key_hash, user, team, roles_json, created_at) "
             "VALUES ('abcdefabcdef', ?, 'mallory', NULL, '[\"admin\"]', '2026-01-01T00:00:00+00:00')", "1" * 64)
    open_database(own).dispose()  # a restart does not make the planted row legitimate
    assert AuditStore(engine).entries_for(BACKFILL_REQUEST_ID) == []
    output = verify(own, ok=False)
    assert "KEY TAMPERED: key abcdefabcdef: not_on_chain: " in output


# -- atomicity -------------------------------------------------------------------


def test_a_refused_entry_leaves_no_key_change(own, engine):
    store = KeyStore(engine)
    key_id = store.create("kim", team=None, roles=["viewer"]).key.key_id
    sql(own, "CREATE TRIGGER refuse_all BEFORE INSERT ON audit_entries BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(KeyStoreError, match="refused"):
        store.create("lee", team=None, roles=["viewer"])
    with pytest.raises(KeyStoreError, match="refused"):
        store.set_roles(key_id, ["admin"])
    with pytest.raises(KeyStoreError, match="refused"):
        store.revoke(key_id)
    assert [(k.user, k.roles, k.revoked_at) for k in store.list(include_revoked=True)] == [("kim", ["viewer"], None)]


def test_a_refused_key_row_leaves_no_entry(engine, monkeypatch):
    store = KeyStore(engine)
    taken = store.create("max", team=None, roles=["viewer"]).key.key_id
    head = AuditStore(engine).head()
    monkeypatch.setattr(keys_module.secrets, "token_hex", lambda _n: taken)  # the same id again: the insert fails
    with pytest.raises(KeyStoreError, match="cannot store the new key"):
        store.create("ned", team=None, roles=["admin"])
    assert AuditStore(engine).head() == head


# -- keys made before the upgrade ------------------------------------------------


def _old_store(own, rows: list[tuple[str, str, str | None]]) -> None:
    """A store as the previous release left it: schemas current, key rows without entries."""
    old = make_engine(own.effective_database_url)
    migrate(old)
    migrate_gateway(old)
    old.dispose()
    for key_id, roles, revoked_at in rows:
        sql(own, "INSERT INTO api_keys (key_id, key_hash, user, team, roles_json, created_at, revoked_at, note) "
                 "VALUES (?, ?, 'old', 'ops', ?, '2026-01-01T00:00:00+00:00', ?, 'from before')",
            key_id, key_id * 5 + "0000", roles, revoked_at)


def test_keys_made_before_the_upgrade_are_recorded_once_as_a_backfill(own):
    _old_store(own, [("aaaaaaaaaaaa", '["admin"]', None), ("bbbbbbbbbbbb", '["viewer"]', "2026-02-01")])
    before = verify(own, ok=False)  # verify alone does not record them: it reads, and says what to do
    assert "key aaaaaaaaaaaa: not_on_chain" in before and "run any 'govgate keys' command" in before
    engine = open_database(own)
    try:
        (backfill,) = AuditStore(engine).entries_for(BACKFILL_REQUEST_ID)
        assert backfill.kind == "key_created" and backfill.body["backfilled"] is True
        assert [(k["key_id"], k["roles"], k["revoked"], k["note"]) for k in backfill.body["keys"]] == [
            ("aaaaaaaaaaaa", ["admin"], False, "from before"), ("bbbbbbbbbbbb", ["viewer"], True, "from before")]
        assert "key_hash" not in json.dumps(backfill.body) and "aaaaaaaaaaaa" * 5 not in json.dumps(backfill.body)
        open_database(own).dispose()  # a second start writes nothing more
        assert len(AuditStore(engine).entries_for(BACKFILL_REQUEST_ID)) == 1
        assert "(2 keys)" in verify(own, ok=True)
        # From now on the old keys are held to the chain like any other.
        sql(own, "UPDATE api_keys SET roles_json = '[\"admin\"]' WHERE key_id = 'bbbbbbbbbbbb'")
        assert "key bbbbbbbbbbbb: roles_differ: " in verify(own, ok=False)
    finally:
        engine.dispose()


def test_a_fresh_store_writes_no_backfill(engine):
    assert AuditStore(engine).entries_for(BACKFILL_REQUEST_ID) == []
    KeyStore(engine).create("ola", team=None, roles=["viewer"])
    assert KeyStore(engine).record_existing_keys() is None
    assert AuditStore(engine).entries_for(BACKFILL_REQUEST_ID) == []


def test_gateways_starting_together_write_one_backfill(own, monkeypatch):
    """The check under the append lock: a second writer that missed the first backfill rolls back."""
    _old_store(own, [("cccccccccccc", '["admin"]', None)])
    engine = open_database(own)
    try:
        late = KeyStore(engine)
        # As if both had looked before either wrote: the checks outside the lock see nothing.
        monkeypatch.setattr(late._audit, "entries_for", lambda _request_id: [])
        real = keys_module.count_key_entries
        monkeypatch.setattr(keys_module, "count_key_entries",
                            lambda up_to: select(literal(0)) if up_to == 1 else real(up_to))
        assert late.record_existing_keys() is None
        assert len(AuditStore(engine).entries_for(BACKFILL_REQUEST_ID)) == 1
    finally:
        engine.dispose()
    assert "(1 keys)" in verify(own, ok=True)


def test_the_admin_key_govgate_up_makes_is_recorded_as_made_by_it(engine):
    from govgate.admin_key import ensure_admin_key

    assert ensure_admin_key(KeyStore(engine)) is not None
    (admin,) = KeyStore(engine).list()
    assert [(kind, body["by"]) for kind, body in key_entries(engine, admin.key_id)] == [("key_created", "govgate-up")]


def test_a_revocation_time_edited_to_empty_still_revokes(own, engine):
    # verify took any revoked_at but NULL as revoked (so the table matched the chain), while the key check
    # took an empty one as live: a revoked key put back with revoked_at = '' was served
    store = KeyStore(engine)
    issued = store.create("rhea", team="research", roles=["analyst"])
    assert store.authenticate(issued.secret) is not None
    store.revoke(issued.key.key_id)
    sql(own, "UPDATE api_keys SET revoked_at = '' WHERE key_id = ?", issued.key.key_id)
    assert store.authenticate(issued.secret) is None
    assert issued.key.key_id not in cli(own, "keys", "list").output  # the live keys: not among them
    (line,) = [line for line in cli(own, "keys", "list", "--all").output.splitlines() if issued.key.key_id in line]
    assert "(revoked)" in line


@pytest.mark.parametrize("roles_json", ["not json", '{"admin": 1}', '["admin", 3]', "null"])
def test_a_key_row_whose_roles_cannot_be_read_gives_that_key_no_role_and_breaks_nothing_else(own, engine, caplog,
                                                                                             roles_json):
    """Roles written into the table by hand that are not a list of names: that key's requests and every admin's
    key list were 500s (``json.loads`` in ``ApiKey.roles``; a dict was read as its keys: probe s59 F8). Now the
    key holds no role, the list shows the others as before, and verify names the row."""
    store = KeyStore(engine)
    issued = store.create("kim", team="ops", roles=["admin"])
    other = store.create("lou", team="ops", roles=["viewer"])
    sql(own, "UPDATE api_keys SET roles_json = ? WHERE key_id = ?", roles_json, issued.key.key_id)
    with caplog.at_level("WARNING", logger="gateway.auth.keys"):
        principal = store.authenticate(issued.secret)
        assert principal is not None and principal.roles == ()
        listed = {row.key_id: row.roles for row in store.list()}
    assert listed == {issued.key.key_id: [], other.key.key_id: ["viewer"]}
    assert f"key {issued.key.key_id}: its roles in the key table are unreadable" in caplog.text
    assert not store.has_role("admin")  # the hand-written row grants nothing
    output = verify(own, ok=False)
    assert f"KEY TAMPERED: key {issued.key.key_id}: roles_differ: " in output
