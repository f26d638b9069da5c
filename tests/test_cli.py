"""``govgate keys`` and ``govgate audit``: the operator's commands, run for real."""

from __future__ import annotations

import sqlite3

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.supervisor import child_env


@pytest.fixture
def cli(settings, tmp_path):
    """Invoke ``govgate`` against a database of its own."""
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'cli.db'}")
    env = child_env(own, own.redis_url)
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    run.database = own.effective_database_url.removeprefix("sqlite:///")
    run.settings = own
    return run


def test_keys_create_list_revoke(cli):
    created = cli("keys", "create", "--user", "alice", "--team", "research", "--role", "analyst")
    secret = created.stdout.strip().splitlines()[0]
    assert secret.startswith("gk_")
    key_id = secret.split("_")[1]
    listing = cli("keys", "list").stdout
    assert key_id in listing and "alice" in listing and "research" in listing and "analyst" in listing
    assert secret not in listing  # secrets are never shown again
    with sqlite3.connect(cli.database) as db:
        stored = db.execute("SELECT key_hash FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()[0]
    assert stored != secret and secret not in stored
    assert "revoked" in cli("keys", "revoke", key_id).stdout
    assert key_id not in cli("keys", "list").stdout
    assert key_id in cli("keys", "list", "--all").stdout
    again = cli("keys", "revoke", key_id, ok=False)
    assert again.exit_code == 1 and "no live key" in again.output


def test_keys_create_refuses_bad_names(cli):
    result = cli("keys", "create", "--user", "bad name; drop", ok=False)
    assert result.exit_code == 1 and "must be" in result.output


def _append_some(settings, n: int = 3) -> None:
    from audit import AuditStore, make_engine, migrate

    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    store = AuditStore(engine)
    for i in range(n):
        store.append("request", f"req-{i}", principal="alice", team="research", model="m",
                     body={"decision": {"allow": True, "reasons": [], "obligations": {}}, "i": i},
                     policy_revision="r1")
    engine.dispose()


def test_audit_tail_and_verify(cli):
    _append_some(cli.settings)
    tail = cli("audit", "tail", "-n", "2").stdout.strip().splitlines()
    assert len(tail) == 2 and "req-1" in tail[0] and "req-2" in tail[1] and "allow" in tail[1]
    as_json = cli("audit", "tail", "-n", "1", "--json").stdout
    assert '"request_id": "req-2"' in as_json and '"hash":' in as_json
    verified = cli("audit", "verify").stdout
    assert verified.startswith("ok: 3 entries")


def test_audit_verify_reports_the_first_tampered_entry(cli):
    _append_some(cli.settings, 4)
    with sqlite3.connect(cli.database) as db:  # an attacker with the file removes the guard, then edits
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            db.execute(f"DROP TRIGGER {name}")
        db.execute("UPDATE audit_entries SET body = json_set(body, '$.i', 99) WHERE seq = 2")
    result = cli("audit", "verify", ok=False)
    assert result.exit_code == 1
    assert "BROKEN at seq 2" in result.output


def test_bad_setting_is_a_clear_error(settings):
    env = {**child_env(settings, settings.redis_url), "GOVGATE_PORT": "eighty"}
    result = CliRunner().invoke(main, ["keys", "list"], env=env)
    assert result.exit_code == 1
    assert "GOVGATE_PORT='eighty' is not a whole number" in result.output
