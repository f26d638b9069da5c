"""The operator's commands when their standard output cannot take what they print (h11 #4).

Real processes: ``govgate`` run as a subprocess with its standard output on
``/dev/full`` (every write fails with ENOSPC, what a full disk does to a
cron job's log) or closed (``>&-``). Each says so in one line on standard
error and exits 74 (``EX_IOERR``), never with a traceback, and never with 1,
which ``audit verify`` uses for tampering; output silently lost with exit 0
is no longer possible either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit import AuditStore, make_engine, migrate
from audit.signing import load_or_create_signing_key
from govgate.cli_stdout import EXIT_OUTPUT

COMMANDS = {
    "audit verify": ["audit", "verify"],
    "audit tail": ["audit", "tail"],
    "audit tail --json": ["audit", "tail", "--json"],
    "keys list": ["keys", "list"],
    "audit public-key": ["audit", "public-key"],
    "audit checkpoint": ["audit", "checkpoint"],
    "audit export": ["audit", "export", "--since", "2000-01-01", "--format", "csv"],
    # Printed before any command runs (probe s54 F4: a traceback until 2026-12-05).
    "--help": ["--help"],
    "--version": ["--version"],
    "up --help": ["up", "--help"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An audit store with a few entries, and the environment that points the CLI at it."""
    var_dir = tmp_path_factory.mktemp("stdout")
    url = f"sqlite:///{var_dir / 'audit.db'}"
    engine = make_engine(url)
    try:
        migrate(engine)
        for i in range(3):
            AuditStore(engine).append("request", f"r-{i}", principal="alice", team="blue", model="tiny",
                                      policy_revision=None, body={"endpoint": "chat.completions", "i": i})
    finally:
        engine.dispose()
    load_or_create_signing_key(var_dir / "audit-signing.key")
    return {**os.environ, "GOVGATE_VAR_DIR": str(var_dir), "GOVGATE_DATABASE_URL": url,
            "GOVGATE_AUDIT_SIGNING_KEY_FILE": "", "PYTHONDONTWRITEBYTECODE": "1"}


def _run(args: list[str], env: dict[str, str], stdout: str) -> subprocess.CompletedProcess[str]:
    """``govgate ARGS`` with standard output on ``/dev/full``, or closed (``>&-``, through a shell)."""
    command = [sys.executable, "-m", "govgate.cli", *args]
    if stdout == "closed":
        quoted = " ".join("'" + part.replace("'", "'\\''") + "'" for part in command)
        return subprocess.run(["sh", "-c", f"exec {quoted} >&-"], env=env, stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    with open(os.devnull if stdout == "null" else "/dev/full", "w") as sink:
        return subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.PIPE,
                              text=True, timeout=120)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_full_disk_under_standard_output_is_one_line_and_its_own_exit_status(store, name):
    result = _run(COMMANDS[name], store, "full")
    lines = result.stderr.strip().splitlines()
    assert lines[-1:] == ["Error: cannot write to standard output: No space left on device"], result.stderr
    assert "Traceback" not in result.stderr and result.returncode == EXIT_OUTPUT == 74


@pytest.mark.parametrize("name", COMMANDS)
def test_a_closed_standard_output_is_one_line_not_output_silently_lost(store, name):
    result = _run(COMMANDS[name], store, "closed")
    lines = result.stderr.strip().splitlines()
    assert lines[-1:] == ["Error: cannot write to standard output: it is closed"], result.stderr
    assert "Traceback" not in result.stderr and result.returncode == EXIT_OUTPUT


def test_the_commands_still_print_where_standard_output_takes_it(store):
    """The guard changes nothing for an output that works (and /dev/null takes everything)."""
    for args in COMMANDS.values():
        result = _run(args, store, "null")
        assert result.returncode == 0, (args, result.stderr)
    listed = subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "tail", "-n", "1"], env=store,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "r-2" in listed.stdout, listed.stderr


def test_a_key_is_not_made_when_standard_output_is_closed(store):
    """Its secret is printed once: with nowhere to print it, the key would exist and be shown to no one."""
    result = _run(["keys", "create", "--user", "cron", "--role", "viewer"], store, "closed")
    assert result.returncode == EXIT_OUTPUT, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "Error: cannot write to standard output: it is closed"
    listed = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "list"], env=store, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and "cron" not in listed.stdout, listed.stdout + listed.stderr


def test_a_key_whose_secret_cannot_be_printed_is_revoked_again(store):
    """A full disk under `keys create >> secrets.txt`: the key was stored, its secret written nowhere."""
    result = _run(["keys", "create", "--user", "diskfull", "--role", "viewer"], store, "full")
    assert result.returncode == EXIT_OUTPUT, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: cannot write to standard output: No space left on device; key "), line
    assert line.endswith(" was made and revoked again (its secret was shown nowhere)"), line
    listed = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "list", "--all"], env=store,
                            capture_output=True, text=True, timeout=120)
    [row] = [row for row in listed.stdout.splitlines() if "diskfull" in row]
    assert row.split()[5] != "-"  # its REVOKED column holds a time
    assert "diskfull" not in subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "list"], env=store,
                                            capture_output=True, text=True, timeout=120).stdout
