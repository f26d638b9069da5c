"""The files the CLI writes with ``--out`` are there whole or not at all (govgate/cli_output.py).

Real processes, real failures: ``govgate`` run as a subprocess and stopped
(SIGSTOP) once its file has data, so it is caught midway whatever the
machine's speed; then sent SIGTERM or SIGHUP, or its PostgreSQL shut down
under it before the next page, or run under a file-size limit (what a full
disk does to a write). Each time the file named by ``--out`` keeps what it
held before, and nothing of the half-written copy (prompts included) stays
beside it.
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from audit import AuditStore, make_engine, migrate
from audit.signing import load_or_create_signing_key
from govgate.cli_output import Terminated, output_file
from tests.postgres_server import PostgresServer, own_postgres  # noqa: F401  (a fixture)

#: What the file held before the command ran (an earlier export, an earlier key).
EARLIER = b"an earlier, complete file\n"
#: Each entry's prompt: large, so that the export of a few hundred is well under way when it is stopped.
PROMPT = "a secret prompt " * 256


def _seed(url: str, var_dir: Path, count: int) -> None:
    engine = make_engine(url)
    try:
        migrate(engine)
        store = AuditStore(engine)
        for i in range(count):
            store.append("request", f"r-{i}", principal="alice", team="blue", model="tiny", policy_revision=None,
                         body={"endpoint": "chat.completions", "i": i},
                         payload={"messages": [{"role": "user", "content": PROMPT}]})
    finally:
        engine.dispose()
    load_or_create_signing_key(var_dir / "audit-signing.key")


def _env(url: str, var_dir: Path) -> dict[str, str]:
    return {**os.environ, "GOVGATE_VAR_DIR": str(var_dir), "GOVGATE_DATABASE_URL": url,
            "GOVGATE_AUDIT_SIGNING_KEY_FILE": "", "PYTHONDONTWRITEBYTECODE": "1"}


COMMANDS = {
    "export": ["export", "--since", "2000-01-01", "--format", "jsonl", "--include-text"],
    "export-bundle": ["export-bundle"],
}


def _dispositions(ignored: tuple[int, ...] = ()) -> Callable[[], None]:
    """SIGTERM, SIGHUP and SIGINT as a shell leaves them to a command (default), whatever the suite's own are (a
    suite run under nohup ignores SIGHUP, and children inherit that); ``ignored`` as ``nohup`` leaves them."""
    def preexec() -> None:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # SIGINT: Python's KeyboardInterrupt
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    return preexec


def _start(command: str, out: Path, env: dict[str, str], ignored: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "govgate.cli", "audit", *COMMANDS[command], "--out", str(out)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_dispositions(ignored))


def _out(tmp_path: Path, name: str) -> Path:
    """``name`` in a folder of its own, holding what an earlier run left there."""
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / name
    out.write_bytes(EARLIER)
    return out


def _leftovers(out: Path) -> list[Path]:
    """Every other file in ``out``'s folder (whatever a command names its temporary file)."""
    return sorted(p for p in out.parent.iterdir() if p.name != out.name)


def _stopped_midway(process: subprocess.Popen[bytes], out: Path) -> None:
    """Wait until the command's temporary file holds data, then stop the process there (SIGSTOP)."""
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.communicate()
        written = [p for p in _leftovers(out) if p.stat().st_size > 0]
        if written:
            os.kill(process.pid, signal.SIGSTOP)
            break
        assert time.monotonic() < deadline, "the command never began writing"
        time.sleep(0.002)
    assert process.poll() is None
    # Midway: its data is in the temporary file, the file asked for still holds what it held.
    assert out.read_bytes() == EARLIER
    assert [p.stat().st_mode & 0o777 for p in _leftovers(out)] == [0o600]  # prompts: the owner's only


def _signal_stopped(process: subprocess.Popen[bytes], signum: int) -> bytes:
    """Send ``signum`` to a command stopped midway, let it go on, and return its standard error once it ended."""
    try:
        os.kill(process.pid, signum)
        os.kill(process.pid, signal.SIGCONT)
        return process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    var_dir = tmp_path_factory.mktemp("out-files")
    url = f"sqlite:///{var_dir / 'audit.db'}"
    _seed(url, var_dir, 400)
    return url, var_dir


@pytest.mark.parametrize("command,signum", [("export", signal.SIGTERM), ("export-bundle", signal.SIGTERM),
                                            ("export", signal.SIGHUP), ("export", signal.SIGINT),
                                            ("export-bundle", signal.SIGINT)],
                         ids=["export-SIGTERM", "export-bundle-SIGTERM", "export-SIGHUP", "export-SIGINT",
                              "export-bundle-SIGINT"])
def test_a_command_signalled_midway_leaves_no_file(sqlite_store: tuple[str, Path], tmp_path: Path, command: str,
                                                   signum: int) -> None:
    url, var_dir = sqlite_store
    out = _out(tmp_path, "blue.jsonl")
    process = _start(command, out, _env(url, var_dir))
    _stopped_midway(process, out)
    said = _signal_stopped(process, signum).decode()
    if signum == signal.SIGINT:  # Click's "Aborted!" and exit 1, verify's code for tampering (probe s56): 130
        assert process.returncode == 130 and "interrupted (SIGINT): stopped" in said and "Aborted" not in said, said
    else:
        assert process.returncode == 128 + signum, said
        assert f"{signal.Signals(signum).name}: stopped; {out} not written" in said
    assert "Traceback" not in said
    assert out.read_bytes() == EARLIER
    assert _leftovers(out) == []  # no half-written copy, prompts and all


def test_a_hangup_the_command_was_started_ignoring_stays_ignored(sqlite_store: tuple[str, Path],
                                                                  tmp_path: Path) -> None:
    """``nohup govgate audit export …`` must outlive its terminal: the export goes on and ends whole."""
    url, var_dir = sqlite_store
    out = _out(tmp_path, "blue.jsonl")
    process = _start("export", out, _env(url, var_dir), ignored=(signal.SIGHUP,))
    _stopped_midway(process, out)
    stderr = _signal_stopped(process, signal.SIGHUP)
    assert process.returncode == 0, stderr
    lines = out.read_bytes().splitlines()
    assert len(lines) >= 400 and lines[0] != EARLIER.strip()  # the whole export, in place of the earlier file
    assert _leftovers(out) == []


@pytest.mark.parametrize("command", ["export", "export-bundle"])
def test_a_database_lost_before_the_next_page_leaves_no_file(own_postgres: PostgresServer,  # noqa: F811
                                                             tmp_path: Path, command: str) -> None:
    url = own_postgres.fresh_database("outfiles")
    _seed(url, tmp_path, 1100)  # two pages of the export's 1000
    out = _out(tmp_path, "blue.jsonl")
    process = _start(command, out, _env(url, tmp_path))
    try:
        _stopped_midway(process, out)
        own_postgres.pause()  # the database goes away while the first page is being written
        os.kill(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr
    said = stderr.decode()
    assert "Error: " in said and "audit read failed" in said and "Traceback" not in said, said
    assert out.read_bytes() == EARLIER
    assert _leftovers(out) == []


def _file_size_limit(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_public_key_that_cannot_be_written_whole_leaves_the_earlier_file(sqlite_store: tuple[str, Path],
                                                                           tmp_path: Path) -> None:
    """A write refused halfway (here by a file-size limit under the key's size; a full disk does the same)
    fails the command and leaves the file as it was, not a cut PEM."""
    url, var_dir = sqlite_store
    out = _out(tmp_path, "pub.pem")
    result = subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "public-key", "--out", str(out)],
                            env=_env(url, var_dir), stdin=subprocess.DEVNULL, capture_output=True,
                            preexec_fn=_file_size_limit(64), timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().splitlines() == [f"Error: cannot write {out}: File too large"]
    assert out.read_bytes() == EARLIER
    assert _leftovers(out) == []
    written = subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "public-key", "--out", str(out)],
                             env=_env(url, var_dir), stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert written.returncode == 0, written.stderr
    assert out.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----") and len(out.read_bytes()) > 64
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_key(out: Path, var_dir: Path) -> subprocess.CompletedProcess[bytes]:
    """``govgate audit public-key --out out`` with a signing key of its own in ``var_dir`` (no database read)."""
    load_or_create_signing_key(var_dir / "audit-signing.key")
    return subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "public-key", "--out", str(out)],
                          env=_env(f"sqlite:///{var_dir / 'unused.db'}", var_dir), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=120)


def test_an_out_that_is_a_symlink_replaces_the_file_it_names(tmp_path: Path) -> None:
    """``--out`` naming a symlink (a deployment's ``current.pem`` pointing at the managed file) writes the file
    it points to, as an in-place write did; the link was replaced by a file of its own, the real one left stale."""
    real = _out(tmp_path, "v3.pem")
    link = real.parent / "current.pem"
    link.symlink_to(real.name)
    result = _public_key(link, tmp_path)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == real.name
    assert real.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert sorted(p.name for p in real.parent.iterdir()) == ["current.pem", "v3.pem"]


def test_an_out_with_a_long_name_is_written(tmp_path: Path) -> None:
    """A file name near the filesystem's 255-byte limit is a valid --out: the temporary name beside it must fit
    too (``NAME.partial-XXXXXXXX`` did not: ENAMETOOLONG)."""
    out = _out(tmp_path, "k" * 246 + ".pem")
    result = _public_key(out, tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert _leftovers(out) == []


class _SignalledWhileFinalized:
    """An object whose finalizer receives SIGTERM: Python runs the handler inside ``__del__``, where the
    exception it raises is printed ("Exception ignored in …") and dropped, as from any finalizer the
    garbage collector runs at an allocation of the export's."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10))  # a few bytecodes: the handler runs here


def test_a_signal_whose_exception_a_finalizer_dropped_still_leaves_no_file(tmp_path: Path, capfd,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the block went on as if no signal had come, and the file was written whole, exit status 0:
    a SIGTERM from a job scheduler's time limit was ignored. Now the signal is remembered and the file is
    not put in place."""
    out = _out(tmp_path, "blue.jsonl")
    dropped: list[type[BaseException] | None] = []  # what Python's "Exception ignored in …" would print
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a shell leaves it to a command
    try:
        with pytest.raises(Terminated) as raised:
            with output_file(out, private=True) as handle:
                handle.write(b"half of it")
                _SignalledWhileFinalized()  # dropped at once: its finalizer runs here
                handle.write(b" and the rest")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert raised.value.code == 128 + signal.SIGTERM
    assert out.read_bytes() == EARLIER and _leftovers(out) == []
    assert dropped == [Terminated]
    assert f"SIGTERM: stopped; {out} not written" in capfd.readouterr().err


def test_a_prune_interrupted_midway_says_to_run_it_again_which_records_its_erasures(tmp_path: Path) -> None:
    """Ctrl-C between batches left erasures no entry records, ``verify`` failing, and said only "Aborted!"
    (probe s56). Now exit 130 and what to do; doing it records them and ``verify`` passes."""
    from datetime import datetime, timezone

    var_dir = tmp_path / "var"
    var_dir.mkdir()
    url = f"sqlite:///{var_dir / 'audit.db'}"
    _seed(url, var_dir, 1500)  # a batch of one each: seconds of pruning, a busy machine stops it midway too
    before = datetime.now(timezone.utc).isoformat()
    env = _env(url, var_dir)
    process = subprocess.Popen([sys.executable, "-m", "govgate.cli", "audit", "prune", "--before", before,
                                "--batch", "1"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, preexec_fn=_dispositions())
    database = var_dir / "audit.db"
    deadline = time.monotonic() + 120
    while True:  # stopped once some batches are committed, whatever the machine's speed
        assert process.poll() is None, process.communicate()
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            if db.execute("SELECT count(*) FROM audit_entries WHERE payload IS NULL "
                          "AND payload_digest IS NOT NULL").fetchone()[0] > 0:
                break
        assert time.monotonic() < deadline, "prune never erased anything"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGSTOP)
    said = _signal_stopped(process, signal.SIGINT).decode()
    assert process.returncode == 130, said
    assert "the payloads erased so far are not recorded yet" in said and f"--before {before}" in said, said

    def audit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "govgate.cli", "audit", *args], env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)

    assert audit("verify").returncode == 1  # erased, and no entry says so
    again = audit("prune", "--before", before)
    assert again.returncode == 0 and "recorded as entry" in again.stdout, again.stdout + again.stderr
    verified = audit("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
