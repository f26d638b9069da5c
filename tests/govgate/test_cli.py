"""``govgate keys`` and ``govgate audit``: the operator's commands, run for real."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit import AuditStore, make_engine
from govgate.cli import main
from govgate.cli_policy import EXIT_DENIED
from govgate.supervisor import child_env
from tests.conftest import free_port, policy_copy
from workers.contract.registry import TINY_MODEL_NAME


@pytest.fixture
def cli(settings, tmp_path):
    """Invoke ``govgate`` against a database of its own, made as a gateway's start makes it (``keys list``,
    ``revoke`` and ``roles`` refuse a store that is not there)."""
    from gateway.db_setup import open_database

    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'cli.db'}")
    open_database(own).dispose()
    env = child_env(own, own.redis_url)
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    run.database = own.effective_database_url.removeprefix("sqlite:///")
    run.settings = own
    run.env = env
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
    # h11 #5: revoking again is done already (exit 0, as the API's 200 changed: false), not "no live key" exit 1
    again = cli("keys", "revoke", key_id)
    assert again.stdout.startswith(f"{key_id} was already revoked at ") and again.stdout.rstrip().endswith(
        ": nothing changed"), again.output
    typo = cli("keys", "revoke", "nosuch", ok=False)
    assert typo.exit_code == 1 and typo.output.strip() == "Error: no key with id nosuch (see 'govgate keys list --all')"


def test_keys_create_refuses_bad_names(cli):
    result = cli("keys", "create", "--user", "bad name; drop", "--role", "analyst", ok=False)
    assert result.exit_code == 1 and "must be" in result.output


@pytest.mark.parametrize("args, named", [
    (("--user", "u" * 5000, "--role", "analyst"), "--user"),
    (("--user", "paula", "--team", "t" * 5000, "--role", "analyst"), "--team"),
    (("--user", "paula", "--role", "r" * 5000), "--role"),
    (("--user", "paula", "--role", "analyst", "--role", "r" * 5000), "--role"),
])
def test_keys_create_names_the_option_and_its_bound_never_the_long_value(cli, args, named):
    """A 5000-character --user came back whole in the error line (--role too, as an unknown role); the HTTP
    key administration names the field and its rule and quotes no refused value. So does the command now."""
    result = cli("keys", "create", *args, ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {named} must be 1-128 letters, digits or . _ @ - (starting with a "
                                     "letter or digit)")
    assert "paula" not in cli("keys", "list").stdout  # nothing was made


@pytest.mark.parametrize("args, named", [
    (("--user", "bob", "--user", "carol", "--role", "analyst"), "--user"),
    (("--user", "bob", "--team", "a", "--team", "b", "--role", "analyst"), "--team"),
    (("--user", "bob", "--role", "analyst", "--note", "x", "--note", "y"), "--note"),
])
def test_keys_create_refuses_an_option_given_twice(cli, args, named):
    """Click kept the last one: ``--user bob --user carol`` made carol's key (probe s56)."""
    result = cli("keys", "create", *args, ok=False)
    assert result.exit_code == 2 and f"Invalid value for '{named}': may be given once" in result.output
    assert "carol" not in result.output and "bob" not in cli("keys", "list").stdout  # nothing was made
    missing = cli("keys", "create", "--role", "analyst", ok=False)
    assert missing.exit_code == 2 and "Missing option '--user'" in missing.output


def test_keys_create_refuses_a_long_note_by_its_bound(cli):
    result = cli("keys", "create", "--user", "paula", "--role", "analyst", "--note", "n" * 5000, ok=False)
    assert result.exit_code == 2 and "n" * 300 not in result.output
    assert "Invalid value for --note: at most 256 characters, not 5000" in result.output


def test_keys_revoke_and_roles_never_repeat_a_long_key_id_or_role(cli):
    key_id = cli("keys", "create", "--user", "quinn", "--role", "analyst").stdout.strip().split("_")[1]
    long_id = "f" * 5000
    for args, says in [(("revoke", long_id), "no key with that id: a key id is 12 characters, not 5000 "
                                              "(see 'govgate keys list --all')"),
                       (("roles", long_id, "viewer"), "no live key with that id: a key id is 12 characters, not 5000"),
                       (("revoke", f"gk_{long_id}_x"), "that is a key's secret, not its id; pass the key id "
                                                       "(see 'govgate keys list')"),
                       (("roles", key_id, "r" * 5000), "ROLE must be 1-128 letters, digits or . _ @ - (starting "
                                                       "with a letter or digit)")]:
        result = cli("keys", *args, ok=False)
        assert result.exit_code == 1 and result.output.strip() == f"Error: {says}", result.output[:300]
    [row] = [row for row in cli("keys", "list").stdout.splitlines() if key_id in row]
    assert row.split()[3] == "analyst"  # nothing changed


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


def _drop_guards(db: sqlite3.Connection) -> None:
    """Remove the append-only guards, as an attacker (or a careless administrator) with the file can."""
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")


def test_audit_tail_and_verify(cli):
    _append_some(cli.settings)
    tail = cli("audit", "tail", "-n", "2").stdout.strip().splitlines()
    assert len(tail) == 2 and "req-1" in tail[0] and "req-2" in tail[1] and "allow" in tail[1]
    as_json = cli("audit", "tail", "-n", "1", "--json").stdout
    assert '"request_id": "req-2"' in as_json and '"hash":' in as_json
    verified = cli("audit", "verify").stdout
    assert verified.startswith("ok: 4 entries")  # the chain_format boundary, then the three


def test_audit_tail_says_which_end_a_delivered_entry_completes(cli):
    """A ``delivered`` entry (what a checked stream's client received) names the terminal entry it completes,
    not an empty summary as the error-code fallback gave it."""
    from audit import AuditStore, make_engine, migrate

    engine = make_engine(cli.settings.effective_database_url)
    migrate(engine)
    store = AuditStore(engine)
    who = {"principal": "alice", "team": "research", "model": "m", "policy_revision": "r1"}
    store.append("request", "req-d", body={"decision": {"allow": True, "reasons": [], "obligations": {}}}, **who)
    failed = store.append("failed", "req-d", body={"error": {"code": "worker_error", "message": "x"}}, **who)
    store.append("delivered", "req-d", body={"terminal_seq": failed.seq, "ended_as": "failed"},
                 payload={"client_output": "the text"}, **who)
    engine.dispose()
    *_, end, delivered = cli("audit", "tail", "-n", "2").stdout.strip().splitlines()
    assert end.endswith("worker_error")
    assert delivered.endswith(f"received, completing #{failed.seq} (failed)") and "the text" not in delivered


@pytest.mark.parametrize("body, shown", [
    ("[1, 2]", "(body is not a JSON object)"),
    ('{"decision": 5}', "(body not of this kind's shape)"),
])
def test_audit_tail_shows_an_edited_body_of_another_shape(cli, body, shown):
    _append_some(cli.settings)
    with sqlite3.connect(cli.database) as db:
        _drop_guards(db)
        db.execute("UPDATE audit_entries SET body = ? WHERE seq = 3", (body,))
    lines = cli("audit", "tail", "-n", "3").stdout.strip().splitlines()
    assert len(lines) == 3 and "req-1" in lines[1] and lines[1].endswith(shown), lines
    assert "allow" in lines[2]


def test_audit_tail_on_a_body_that_is_not_json_is_a_one_line_error(cli):
    _append_some(cli.settings)
    with sqlite3.connect(cli.database) as db:
        _drop_guards(db)
        db.execute("UPDATE audit_entries SET body = '{not json' WHERE seq = 3")
    result = cli("audit", "tail", ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: an audit entry cannot be decoded: "), lines
    assert lines[0].endswith("(run `govgate audit verify`)")


def test_audit_prune_erases_old_payloads_and_verify_still_passes(cli):
    from datetime import datetime, timedelta, timezone

    from audit import AuditStore, make_engine, migrate

    store = AuditStore(make_engine(cli.settings.effective_database_url))
    migrate(store.engine)
    store.append("completion", "r1", principal="alice", team="research", model="m", body={"usage": {}},
                 policy_revision="r1", payload={"output": "kept until pruned"})
    store.engine.dispose()
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    refused = cli("audit", "prune", "--before", tomorrow, ok=False)  # a typo'd future date would erase it all
    assert refused.exit_code == 2 and "is in the future" in refused.output
    now = datetime.now(timezone.utc).isoformat()

    pruned = cli("audit", "prune", "--before", now).stdout
    assert "erased the payloads of 1 entries (seq 2..2)" in pruned and "payloads_erased" in pruned
    assert "chain format 1" not in pruned  # the boundary entry holds no text: not reported as left alone
    assert cli("audit", "verify").stdout.startswith("ok: 3 entries")
    assert "no payload to erase" in cli("audit", "prune", "--before", now).stdout
    assert cli("audit", "prune", "--before", "someday", ok=False).exit_code == 2


def test_audit_verify_reports_the_first_tampered_entry(cli):
    _append_some(cli.settings, 4)
    with sqlite3.connect(cli.database) as db:  # an attacker with the file removes the guard, then edits
        _drop_guards(db)
        db.execute("UPDATE audit_entries SET body = json_set(body, '$.i', 99) WHERE seq = 2")
    result = cli("audit", "verify", ok=False)
    assert result.exit_code == 1
    assert "BROKEN at seq 2" in result.output


def test_audit_verify_fails_on_a_row_below_seq_1(cli):
    """A forged review verdict at seq 0: every reader shows it, the walks (seq > 0) never read it."""
    _append_some(cli.settings)
    with sqlite3.connect(cli.database) as db:
        _drop_guards(db)
        db.execute("INSERT INTO audit_entries SELECT 0, created_at, 'req-1', 'dispositioned', 'rev', team, NULL,"
                   " '{\"disposition\":\"ok\"}', NULL, NULL, 'e', 'd', NULL, NULL FROM audit_entries WHERE seq = 2")
    result = cli("audit", "verify", ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("BROKEN at seq 0: entry 0 has a seq below 1: it is outside the chain")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_audit_verify_names_an_entry_whose_text_is_not_utf8(cli, jobs):
    _append_some(cli.settings, 4)
    with sqlite3.connect(cli.database) as db:
        _drop_guards(db)
        db.execute("UPDATE audit_entries SET principal = CAST(X'61ff62' AS TEXT) WHERE seq = 3")
    result = cli("audit", "verify", "--jobs", jobs, ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("BROKEN at seq 3: audit entry 3 cannot be decoded: its principal is not valid "
                                    "UTF-8 text (the entry was edited) (2 entries checked)"), result.output


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "tail"], ["audit", "prune", "--before", "2020-01-01"],
                                     ["keys", "list"], ["keys", "revoke", "abc123"],
                                     ["keys", "roles", "abc123", "analyst"]])
@pytest.mark.parametrize("where", ["missing var dir", "missing url", "empty file"])
def test_commands_that_read_a_store_on_no_database_say_so_and_make_none(settings, tmp_path, command, where):
    """A mistyped GOVGATE_VAR_DIR must not verify as "0 entries, chain intact" nor leave a new database behind;
    nor list "no keys" (exit 0) after making one, folders and all (probe s54 F3: the keys commands did)."""
    var = tmp_path / "mistyped"
    database = var / "govgate.db"
    env = {**child_env(settings.with_(var_dir=var), settings.redis_url), "GOVGATE_DATABASE_URL": None}
    if where == "missing url":
        database = tmp_path / "elsewhere" / "audit.db"
        env["GOVGATE_DATABASE_URL"] = f"sqlite:///{database}"
    elif where == "empty file":
        var.mkdir()
        database.touch()
    result = CliRunner().invoke(main, command, env=env, catch_exceptions=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: no audit database at {database} "), lines
    if where == "empty file":
        assert list(var.iterdir()) == [database] and database.stat().st_size == 0
    else:
        assert not database.parent.exists()


@pytest.mark.parametrize("option", ["--public-key", "--checkpoint"])
def test_audit_verify_with_a_file_that_cannot_be_read_is_a_usage_error_before_the_walk(cli, tmp_path, option):
    """h11 #11: it walked the whole chain (97 s per million entries), printed "ok: … chain intact", then failed
    with exit 1, the status of tampering."""
    _append_some(cli.settings)
    missing = tmp_path / "nonexistent.pem"
    result = cli("audit", "verify", option, str(missing), ok=False)
    assert result.exit_code == 2, result.output
    assert "chain intact" not in result.output and "entries" not in result.stdout, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {option}: cannot read {'public key' if option == '--public-key' else 'checkpoint file'} "
                     f"{missing}: No such file or directory"], lines


@pytest.mark.parametrize("tamper", [
    "UPDATE audit_entries SET body = '{not json' WHERE kind = 'key_created'",  # the chain's record of the key
    "UPDATE api_keys SET roles_json = CAST(X'ff' AS TEXT)",  # the key table's row, not UTF-8
])
def test_audit_verify_reports_an_unreadable_key_entry_or_row_as_key_tampering(cli, tamper):
    cli("keys", "create", "--user", "alice", "--team", "research", "--role", "analyst")
    _append_some(cli.settings)
    with sqlite3.connect(cli.database) as db:
        _drop_guards(db)
        assert db.execute(tamper).rowcount == 1
    result = cli("audit", "verify", ok=False)
    assert result.exit_code == 1
    assert "KEY TAMPERED: the key entries or the key table cannot be read: " in result.output, result.output


@pytest.mark.parametrize("args", [("-n", "-5"), ("-n", "99999999999999999999")])
def test_audit_tail_refuses_a_count_out_of_range(cli, args):
    result = cli("audit", "tail", *args, ok=False)
    assert result.exit_code == 2 and "Invalid value for '-n'" in result.output


@pytest.mark.parametrize("batch", ["0", "1000001", "9223372036854775808"])
def test_audit_prune_refuses_a_batch_out_of_range(cli, batch):
    """2^63 reached SQLite and came back as an OverflowError traceback (probe s56)."""
    result = cli("audit", "prune", "--before", "2026-01-01", "--batch", batch, ok=False)
    assert result.exit_code == 2 and "Invalid value for '--batch'" in result.output


def test_audit_export_out_dash_is_standard_output_and_empty_is_refused(cli, tmp_path, monkeypatch):
    """'-' made a file named '-' in the current folder, '' said "cannot write to standard output: Is a
    directory" (probe s56); 'audit checkpoint' and 'public-key' read '-' as standard output."""
    monkeypatch.chdir(tmp_path)
    cli("keys", "create", "--user", "sam", "--role", "analyst")
    dashed = cli("audit", "export", "--since", "2000-01-01", "--out", "-")
    assert '"kind": "key_created"' in dashed.stdout or '"kind":"key_created"' in dashed.stdout, dashed.stdout
    assert not (tmp_path / "-").exists()
    for empty in ("", " "):
        refused = cli("audit", "export", "--since", "2000-01-01", "--out", empty, ok=False)
        assert refused.exit_code == 2 and "Invalid value for '--out': an empty path" in refused.output


@pytest.mark.parametrize("period", ["٣٠d", "３０d"])
def test_audit_export_reads_a_period_in_ascii_digits_only(cli, period):
    """'٣٠d' was read as 30 days (probe s56)."""
    result = cli("audit", "export", "--since", period, ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_audit_export_s_refusal_of_a_moment_names_the_periods_it_also_reads(cli, option):
    """The API's message named only ISO dates, though the CLI reads '30d' too (probe s56 C)."""
    args = ["audit", "export", "--since", "2000-01-01"] if option == "--until" else ["audit", "export"]
    result = cli(*args, option, "yesterdayish", ok=False)
    assert result.exit_code != 0
    assert f"{option}: " in result.output and "ISO-8601 date" in result.output
    assert "or a period back from now (30d, 12h, 30m, 2w)" in result.output


@pytest.mark.parametrize("url", ["postgresql://u:p@127.0.0.1:1/db", "mysql://u:p@127.0.0.1:1/db"])
def test_an_unusable_database_url_is_one_line_naming_the_setting(cli, url):
    result = CliRunner().invoke(main, ["audit", "tail"], env={**cli.env, "GOVGATE_DATABASE_URL": url})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    shown = url.replace("u:p@", "u:***@")  # never the password
    assert len(lines) == 1 and lines[0].startswith(f"Error: GOVGATE_DATABASE_URL={shown} cannot be used: "), lines
    assert ":p@" not in result.output


@contextlib.contextmanager
def _write_locked(database: str):
    """Another process's write transaction on the SQLite file, held until the block ends."""
    holder = sqlite3.connect(database, isolation_level=None, timeout=60)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_keys_changes_the_database_refuses_are_one_line_and_change_nothing(cli):
    secret = cli("keys", "create", "--user", "lena", "--role", "analyst").stdout.strip()
    key_id = secret.split("_")[1]
    impatient = {**cli.env, "GOVGATE_DATABASE_BUSY_TIMEOUT_S": "0.2"}
    with _write_locked(cli.database):
        results = [CliRunner().invoke(main, args, env=impatient) for args in (
            ["keys", "create", "--user", "mona", "--role", "analyst"],
            ["keys", "revoke", key_id],
            ["keys", "roles", key_id, "viewer"])]
    for result, what in zip(results, ("cannot store the new key", f"cannot revoke key {key_id}",
                                      f"cannot change the roles of key {key_id}")):
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {what}: ") and "database is locked" in lines[0]
        assert lines[0].endswith("; nothing was changed")
    listing = cli("keys", "list").stdout.splitlines()
    assert not [row for row in listing if "mona" in row]
    [row] = [row for row in listing if key_id in row]  # still live, with its old role
    assert row.split()[3] == "analyst"


def test_keys_create_refuses_a_note_longer_than_the_api_allows(cli):
    result = cli("keys", "create", "--user", "nina", "--role", "viewer", "--note", "n" * 257, ok=False)
    assert result.exit_code == 2
    assert "Invalid value for --note: at most 256 characters, not 257" in result.output
    assert "nina" not in cli("keys", "list").stdout
    assert cli("keys", "create", "--user", "nina", "--role", "viewer", "--note", "n" * 256).exit_code == 0


def test_keys_create_echoes_the_roles_as_stored(cli):
    created = cli("keys", "create", "--user", "olga", "--role", "viewer", "--role", "viewer", "--role", "analyst")
    assert "roles=analyst,viewer " in created.stderr


def test_bad_setting_is_a_clear_error(settings):
    env = {**child_env(settings, settings.redis_url), "GOVGATE_PORT": "eighty"}
    result = CliRunner().invoke(main, ["keys", "list"], env=env)
    assert result.exit_code == 1
    assert "GOVGATE_PORT='eighty' is not a whole number" in result.output


@pytest.mark.parametrize("roles, problem", [
    ((), "no --role given"),
    (("analyst", "wizard"), "unknown role 'wizard'"),
])
def test_keys_create_refuses_missing_or_unknown_roles(cli, roles, problem):
    args = [arg for role in roles for arg in ("--role", role)]
    result = cli("keys", "create", "--user", "bob", *args, ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {problem}: a key needs at least one of the roles the policy knows: "
                                     "admin, analyst, auditor, reviewer, viewer")
    assert "bob" not in cli("keys", "list").stdout  # nothing was made


def test_keys_list_shows_the_note(cli):
    cli("keys", "create", "--user", "carol", "--role", "viewer", "--note", "dashboard read-only")
    rows = cli("keys", "list").stdout.splitlines()
    assert rows[0].split()[-1] == "NOTE"
    assert [row for row in rows if "carol" in row][0].endswith("dashboard read-only")


def test_keys_revoke_given_a_secret_names_the_id_to_pass(cli):
    secret = cli("keys", "create", "--user", "dave", "--role", "analyst").stdout.strip()
    key_id = secret.split("_")[1]
    result = cli("keys", "revoke", secret, ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: that is a key's secret, not its id; pass the key id: govgate keys revoke {key_id}"
    assert secret not in result.output  # the secret is not echoed back
    assert key_id in cli("keys", "list").stdout  # still live
    assert "revoked" in cli("keys", "revoke", key_id).stdout


def test_version(cli):
    from importlib.metadata import version

    assert cli("--version").stdout.strip() == f"govgate, version {version('govgate')}"


def test_policy_explain_exits_non_zero_on_a_deny(cli, tmp_path):
    case = {
        "principal": {"id": "victor", "team": "research", "roles": ["viewer"], "key_id": "k1"},
        "request": {"endpoint": "completions", "model": TINY_MODEL_NAME, "prompt": "hi", "text": "hi",
                    "max_tokens": 5, "stream": False, "purpose": None},
        "model": {"name": TINY_MODEL_NAME, "family": "llama", "context_length": 1024, "tags": []},
        "time": {"now_ns": 1_790_000_000_000_000_000, "hour_utc": 12, "weekday": "Tuesday"},
    }
    path = tmp_path / "case.json"
    path.write_text(json.dumps(case))
    denied = cli("policy", "explain", "--input", str(path), ok=False)
    assert denied.exit_code == EXIT_DENIED == 3
    assert json.loads(denied.stdout)["allow"] is False
    case["principal"]["roles"] = ["analyst"]
    path.write_text(json.dumps(case))
    assert json.loads(cli("policy", "explain", "--input", str(path)).stdout)["allow"] is True


def _serve(settings, *args: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    """``govgate serve`` (or the command ``args`` name) as a real process with some variables changed (None:
    unset)."""
    env = child_env(settings.with_(port=free_port()), settings.redis_url)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-m", "govgate.cli", *(args or ("serve",))], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("change, message", [
    ({"GOVGATE_REDIS_URL": None}, "GOVGATE_REDIS_URL is not set"),
    ({"GOVGATE_REDIS_URL": "redis://127.0.0.1:9/0"}, "GOVGATE_REDIS_URL=redis://127.0.0.1:9/0 does not answer"),
    ({"GOVGATE_POLICY_DIR": "/nonexistent/policies"}, "GOVGATE_POLICY_DIR=/nonexistent/policies is not a folder"),
    ({"GOVGATE_MODELS_FILE": "/nonexistent/models.toml"}, "/nonexistent/models.toml"),
    ({"GOVGATE_DATABASE_URL": "nosuch://x"}, "GOVGATE_DATABASE_URL=nosuch://x cannot be used"),
    ({"GOVGATE_PORT": "eighty"}, "GOVGATE_PORT='eighty' is not a whole number"),
    ({"GOVGATE_DIGEST_KEY_FILE": "/"}, "key file / cannot be read or made: Is a directory"),
    ({"GOVGATE_PAYLOAD_KEY_FILE": "/proc/version"}, "key file /proc/version does not hold a base64 key"),
])
def test_serve_with_a_missing_or_bad_setting_says_so_in_one_line(settings, change, message):
    result = _serve(settings, **change)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


@pytest.mark.parametrize("url, message", [
    # h9 F6: a port that is not a number was a 36-line ValueError traceback (44 lines from `keys list`)
    ("postgresql+psycopg://u:pw@127.0.0.1:1:2/db",
     "GOVGATE_DATABASE_URL=postgresql+psycopg://u:***@127.0.0.1:1:2/db cannot be used: cannot use audit database "
     "URL 'postgresql+psycopg://u:***@127.0.0.1:1:2/db': its port is not a number"),
    # h9 F6: under `up` only its last line was quoted: "(Background on this error at: https://sqlalche.me/…)"
    ("postgresql+psycopg://u:pw@127.0.0.1:1/db",
     "GOVGATE_DATABASE_URL=postgresql+psycopg://u:***@127.0.0.1:1/db cannot be used: "),
])
def test_serve_with_an_unusable_database_url_says_so_in_one_line_without_the_password(settings, url, message):
    result = _serve(settings, GOVGATE_DATABASE_URL=url)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), lines
    assert "pw" not in lines[0] and "sqlalche.me" not in lines[0]


def test_keys_and_audit_commands_refuse_a_database_url_with_a_bad_port_in_one_line(cli):
    env = {**cli.env, "GOVGATE_DATABASE_URL": "postgresql+psycopg://u:pw@127.0.0.1:1:2/db"}
    for command in (["keys", "list"], ["audit", "tail"]):
        result = CliRunner().invoke(main, command, env=env)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert result.output.strip() == ("Error: GOVGATE_DATABASE_URL=postgresql+psycopg://u:***@127.0.0.1:1:2/db "
                                         "cannot be used: cannot use audit database URL "
                                         "'postgresql+psycopg://u:***@127.0.0.1:1:2/db': its port is not a number "
                                         "(invalid literal for int() with base 10: '1:2')")


def test_serve_with_a_policy_that_does_not_compile_names_the_folder_and_the_error_in_one_line(settings, tmp_path):
    """h9 F6 / h10 F8: an ~80-line ExceptionGroup traceback (the reason inside it), and under `up` only
    uvicorn's "Application startup failed"; the policy is now loaded once before listening."""
    broken = tmp_path / "badpol"
    broken.mkdir()
    (broken / "x.rego").write_text("package govgate\nthis is not rego\n")
    result = _serve(settings, GOVGATE_POLICY_DIR=str(broken))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [f"Error: GOVGATE_POLICY_DIR={broken}: the policy cannot be loaded: x.rego:2:1: "
                     "rule must have a body or assignment"], lines


def test_serve_with_a_policy_that_fails_its_trial_refuses_to_start_in_one_line(settings, tmp_path):
    """Probe p3 F6: a folder whose rules conflict only for a team's members (compiling, and deciding the empty
    input) started without a word, and every request of that team got 403 policy_error, while the same folder
    was refused on a reload. The start now runs the reload's trial and refuses, naming role, team and model."""
    folder = policy_copy(tmp_path)
    (folder / "trial.rego").write_text(
        'package govgate\n\nimport rego.v1\n\nt := 1 if input.principal.team == "support"\n'
        't := 2 if input.principal.team == "support"\n'
        'content_denials contains {"code": "x", "message": "y"} if t == 9\n', encoding="utf-8")
    result = _serve(settings, GOVGATE_POLICY_DIR=str(folder))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: GOVGATE_POLICY_DIR={folder}: the policy fails its trial: "
                               "the policy fails on a request of role "), lines
    assert "team 'support'" in lines[0], lines


def test_policy_check_runs_the_gateway_s_trial_without_redis_or_a_database(settings, tmp_path):
    """Probe q3 F5: the only way to learn that a gateway would refuse a folder was to start one (Redis and all);
    ``govgate policy check`` runs the same load and trial and answers in one line (exit 0 or 1)."""
    env = child_env(settings.with_(redis_url="redis://127.0.0.1:1", database_url="sqlite:////nonexistent/x.db"),
                    "redis://127.0.0.1:1")
    good = policy_copy(tmp_path / "good")
    bad = policy_copy(tmp_path / "bad")
    (bad / "trial.rego").write_text(
        'package govgate\n\nimport rego.v1\n\nt := 1 if input.principal.team == "support"\n'
        't := 2 if input.principal.team == "support"\n'
        'content_denials contains {"code": "x", "message": "y"} if t == 9\n', encoding="utf-8")

    def check(folder) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "govgate.cli", "policy", "check", "--policy-dir", str(folder)],
                              env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    passed = check(good)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.strip() == f"{good}: the policy loads and passes its trial (a gateway would serve it)"
    refused = check(bad)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = (refused.stdout + refused.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: GOVGATE_POLICY_DIR={bad}: the policy fails its trial: "
                                                   "the policy fails on a request of role "), lines
    assert "team 'support'" in lines[0] and "trial.rego:5:1" in lines[0], lines


def test_policy_check_shows_the_trial_s_warning_about_roles_its_caps_never_asked(settings, tmp_path):
    """The start's trial (``serve``, ``up``, ``policy check``) silenced every warning while it ran, so the
    trial's own warning naming the roles its caps never asked showed only at a reload: only the engines'
    per-decision warnings are silenced now."""
    env = child_env(settings.with_(redis_url="redis://127.0.0.1:1", database_url="sqlite:////nonexistent/x.db"),
                    "redis://127.0.0.1:1")
    many = policy_copy(tmp_path / "many")
    data = json.loads((many / "data.json").read_text(encoding="utf-8"))
    roles = data["govgate_config"]["roles"]
    first = next(iter(roles.values()))
    roles.update({f"extra{i:02d}": first for i in range(70)})
    (many / "data.json").write_text(json.dumps(data), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "govgate.cli", "policy", "check", "--policy-dir", str(many)],
                            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy trial: request trials cut at 64 of " in result.stderr, result.stderr
    assert "never asked: roles 'extra" in result.stderr and "'extra69'" in result.stderr, result.stderr


def test_serve_against_an_opa_that_does_not_hold_the_folder_s_policy_says_so_in_one_line(settings, opa_server):
    result = _serve(settings, GOVGATE_OPA_URL=opa_server)  # the session's OPA, started empty
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: GOVGATE_OPA_URL={opa_server} "
                                                   f"(GOVGATE_POLICY_DIR={settings.policy_dir}): "), lines


def test_serve_against_an_opa_that_does_not_answer_says_so_in_one_line(settings):
    url = f"http://127.0.0.1:{free_port()}"
    result = _serve(settings, GOVGATE_OPA_URL=url)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [f"Error: GOVGATE_OPA_URL={url} (GOVGATE_POLICY_DIR={settings.policy_dir}): OPA at {url} did "
                     "not answer /health within 10s"], lines


def test_serve_on_a_busy_port_says_so(settings):
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = _serve(settings, GOVGATE_PORT=str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: port {port} on 127.0.0.1 is already in use: "
                                     "set GOVGATE_PORT to a free port (or stop what listens there)")


@pytest.mark.parametrize("command", [["verify"], ["tail"], ["export", "--since", "2020-01-01", "--format", "jsonl"],
                                     ["prune", "--before", "2020-01-01"]])
def test_audit_commands_do_not_upgrade_a_store_an_older_version_may_still_write(cli, command):
    """An older gateway still appending format-1 entries after the upgrade would break the chain for good.

    So the audit commands (run to look at a store, or at a backup) read it as it is: a store at an older
    schema is refused, naming the step that upgrades it, and left unchanged.
    """
    from audit import make_engine, migrate
    from tests.audit.old_append import old_append

    Path(cli.database).unlink()  # the fixture's store is at this version's schema: this one is older
    engine = make_engine(f"sqlite:///{cli.database}")
    migrate(engine, "audit_0001")
    old_append(engine, "request", "old-1", {"prompt": "hello", "decision": {"allow": True}})
    engine.dispose()
    with open(cli.database, "rb") as before:
        content = before.read()
    result = cli("audit", *command, ok=False)
    assert result.exit_code == 1
    assert "has schema audit_0001, this govgate expects audit_0007" in result.output, result.output
    assert "upgrade it by starting this one" in result.output
    with sqlite3.connect(cli.database) as db:
        assert db.execute("SELECT version_num FROM alembic_version_audit").fetchall() == [("audit_0001",)]
        assert db.execute("SELECT kind FROM audit_entries").fetchall() == [("request",)]  # no chain_format entry
    cli("keys", "list")  # a documented upgrade step
    assert cli("audit", *command, ok=command[0] != "verify").exit_code in (0, 1)
    with sqlite3.connect(cli.database) as db:
        assert db.execute("SELECT version_num FROM alembic_version_audit").fetchall() == [("audit_0007",)]


@pytest.mark.parametrize(("args", "problem"), [
    (("--user", "default"), "user 'default' is a reserved name: the policy's data keeps 'default' (in any case) "
                            "for the entries of every user without one of its own (limits.principals.default)"),
    (("--user", "ann", "--team", "DEFAULT"), "team 'DEFAULT' is a reserved name: the policy's data keeps 'default' "
                                             "(in any case) for the entries of every team without one of its own "
                                             "(limits.teams.default and teams.default.share)"),
])
def test_keys_create_refuses_the_names_the_policy_reserves(cli, args, problem):
    before = cli("keys", "list", "--all").output
    result = cli("keys", "create", *args, "--role", "analyst", ok=False)
    assert result.exit_code == 1 and f"Error: {problem}; choose another" in result.output, result.output
    assert "Traceback" not in result.output
    assert cli("keys", "list", "--all").output == before


def test_keys_list_shows_a_note_with_control_characters_on_its_own_row(cli):
    """A note is free text (an admin key sets it over HTTP too): a newline in it printed a forged row, an escape
    sequence erased another row on a terminal. Control and format characters are written as escapes."""
    note = "ok\nffffffffffff  root  ops  admin\x1b[2K\u202e"
    assert cli("keys", "create", "--user", "olga", "--role", "viewer", "--note", note).exit_code == 0
    listing = cli("keys", "list").stdout.splitlines()
    [row] = [row for row in listing if "olga" in row]
    assert row.endswith("ok\\u000affffffffffff  root  ops  admin\\u001b[2K\\u202e")
    assert not [line for line in listing if "root" in line and "olga" not in line]
    assert "\x1b" not in "".join(listing)


def test_keys_list_columns_fit_their_widest_value(cli):
    """A 128-character user name pushed every later column out of line: columns are as wide as their values."""
    long_user = "u" * 128
    cli("keys", "create", "--user", long_user, "--team", "t" * 40, "--role", "viewer", "--note", "wide")
    cli("keys", "create", "--user", "pia", "--role", "viewer", "--note", "narrow")
    rows = cli("keys", "list").stdout.splitlines()
    header = rows[0]
    starts = [header.index(name) for name in ("USER", "TEAM", "ROLES", "CREATED", "REVOKED", "NOTE")]
    for row in rows[1:]:
        assert all(row[start - 2:start] == "  " for start in starts), row  # each column begins where its header does
    [wide] = [row for row in rows if long_user in row]
    assert wide[starts[-1]:] == "wide"


def test_a_govgate_variable_no_setting_reads_is_warned_about(monkeypatch, cli):
    """A misspelt setting (GOVGATE_REQEST_TIMEOUT_S) was ignored in silence and its setting kept its default."""
    from gateway.settings import setting_names, unknown_settings

    assert "GOVGATE_REQUEST_TIMEOUT_S" in setting_names() and "GOVGATE_POLICY_VM" in setting_names()
    assert unknown_settings({"GOVGATE_REQEST_TIMEOUT_S": "5", "GOVGATE_PORT": "1", "GOVGATE_TEST_X": "1",
                             "GOVGATE_RUN_SLOW": "1", "GOVGATE_WHATEVER": "", "OTHER": "1"}) == [
        ("GOVGATE_REQEST_TIMEOUT_S", "GOVGATE_REQUEST_TIMEOUT_S"), ("GOVGATE_WHATEVER", None)]
    from govgate import cli_common

    cli_common._warn_unknown.cache_clear()
    monkeypatch.setenv("GOVGATE_MAX_QUEUE_PER_MODEL", "4")
    result = cli("keys", "list")
    assert result.exit_code == 0
    assert ("govgate: warning: GOVGATE_MAX_QUEUE_PER_MODEL is not a setting and is ignored (did you mean "
            "GOVGATE_MAX_QUEUED_PER_MODEL?)") in result.stderr
    assert "warning" not in result.stdout


@pytest.mark.parametrize("url", ["http://admin:s3cretPW@127.0.0.1:8181", "http://u:s3cretPW@h:99999",
                                 "http://s3cretPW@127.0.0.1:8181"])
def test_serve_never_shows_the_credentials_of_an_opa_url(settings, url):
    """The URL is refused with credentials, and the refusal quoted them whole (probe s56: also into
    ``govgate up``'s api.log). README: messages never show a URL's password."""
    result = _serve(settings, GOVGATE_OPA_URL=url)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: GOVGATE_OPA_URL=http://***@"), lines
    assert "s3cretPW" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [("serve",), ("worker", "--model", TINY_MODEL_NAME)])
@pytest.mark.parametrize("url, problem", [("redis://:99999", "Port out of range 0-65535"),
                                          ("redis://u:pw-secret@localhost:abc", "Port could not be cast"),
                                          ("unix:///tmp/x.sock?db=abc", "Invalid value for 'db'")])
def test_a_redis_url_redis_py_cannot_read_is_one_line(settings, command, url, problem):
    """A worker died with two tracebacks (its own and its store-prep child's) where serve said "does not
    answer" (probe s56)."""
    result = _serve(settings, *command, GOVGATE_REDIS_URL=url)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: GOVGATE_REDIS_URL=") and problem in lines[0], lines
    assert "pw-secret" not in lines[0] and "cannot be read" in lines[0]


def test_a_corrupted_store_is_one_line_without_sqlalchemy_s_sql(cli, tmp_path):
    """Each page of a store broken in turn: ``keys list`` works or says why in one line. SQLAlchemy's message
    ran on with [SQL: …], [parameters: …] and a link (probe s56: the key check, the gateway's migration)."""
    cli("keys", "create", "--user", "rosa", "--role", "analyst")
    engine = make_engine(f"sqlite:///{cli.database}")
    store = AuditStore(engine)
    for i in range(300):  # pages of entries besides the tables' first ones
        store.append("request", f"c-{i}", principal="rosa", team=None, model="m", body={"pad": "x" * 200},
                     policy_revision=None)
    engine.dispose()
    data = Path(cli.database).read_bytes()
    broken, refused = tmp_path / "broken.db", 0
    for page in range(1, len(data) // 4096):
        damaged = bytearray(data)
        damaged[page * 4096:(page + 1) * 4096] = bytes(range(256)) * 16
        broken.write_bytes(bytes(damaged))
        result = CliRunner().invoke(main, ["keys", "list"],
                                    env={**cli.env, "GOVGATE_DATABASE_URL": f"sqlite:///{broken}"})
        if result.exit_code == 0:
            continue
        refused += 1
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (page, result.output)
        assert len(lines) == 1 and "malformed" in lines[0] and "[SQL" not in lines[0], (page, lines)
    assert refused >= 3  # the store's own pages, the key table's, the index of its entries


@pytest.mark.parametrize("name, shown", [("nosuch", "no model 'nosuch' in the registry (have: "),
                                         ("m" * 300, f"no model '{'m' * 64}'… (300 characters) in the registry")])
def test_a_worker_for_a_model_the_registry_lacks_is_one_line_never_repeating_a_long_name(settings, name, shown):
    result = _serve(settings, "worker", "--model", name)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {shown}") and "m" * 65 not in lines[0], lines


@pytest.mark.parametrize("variable, value, says", [
    ("GOVGATE_OPA_URL", "http://u:pw-secret@127.0.0.1:8181", "GOVGATE_OPA_URL=http://***@127.0.0.1:8181: OPA URL"),
    ("GOVGATE_REDIS_URL", "redis://:99999", "GOVGATE_REDIS_URL=redis://:99999 cannot be read: Port out of range"),
])
def test_up_refuses_an_address_it_cannot_read_before_starting_anything(settings, tmp_path, variable, value, says):
    """A malformed OPA URL was found by the API's own check, after Redis, a worker and the 253 MB model had
    started (probe s56)."""
    var_dir = tmp_path / "var"
    result = _serve(settings.with_(var_dir=var_dir), "up", **{variable: value, "GOVGATE_REDIS_URL": None}
                    if variable == "GOVGATE_OPA_URL" else {variable: value})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"govgate: cannot start: {says}" in result.stdout + result.stderr
    assert "pw-secret" not in result.stdout + result.stderr
    assert not (var_dir / "redis").exists() and not (var_dir / "logs").exists()  # nothing was started
