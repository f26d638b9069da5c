"""A real PostgreSQL server for the test session: initdb into a temporary folder, loopback only.

The audit store and the gateway's tables run on PostgreSQL in production
(``GOVGATE_DATABASE_URL=postgresql+psycopg://…``), so the tests that touch a
store run against a real server, never a mock. :class:`PostgresServer`
starts one ``postgres`` per session on ``127.0.0.1`` and a free port, with
settings that trade durability for speed (``fsync=off``: a test server's data
is thrown away anyway) and hands out a fresh database per test
(:meth:`PostgresServer.fresh_database`, a ``CREATE DATABASE`` copy of
``template1``, a few milliseconds).

Where the binaries are: ``initdb`` on PATH, else the newest Debian layout
``/usr/lib/postgresql/<version>/bin``. None found: the tests that need the
server skip and say so, or fail when ``GOVGATE_TEST_REQUIRE_POSTGRES=1``
(``.ci/run`` sets it, and installs Debian's ``postgresql`` package first).
``GOVGATE_TEST_POSTGRES_URL`` (a superuser URL, e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``) uses a server CI provides
instead of starting one.

``initdb`` and ``postgres`` refuse to run as root. When the suite runs as
root the server runs as an unprivileged system user (``postgres``, which
Debian's package creates, else ``nobody``) via ``subprocess``'s ``user=`` and
``group=``; its data and socket folders are created for that user, in a
folder that user can reach (``/tmp`` when the session's temporary folder is
private to root).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Iterator

import pytest

from govgate.processes import child_preexec, free_port, stop_process

REQUIRE_ENV: Final = "GOVGATE_TEST_REQUIRE_POSTGRES"
EXTERNAL_URL_ENV: Final = "GOVGATE_TEST_POSTGRES_URL"
#: The SQLAlchemy driver the store uses on PostgreSQL.
DRIVER: Final = "postgresql+psycopg"
SUPERUSER: Final = "govgate"
START_TIMEOUT_S: Final = 60.0
#: Speed over durability: the cluster lives for one test session.
FAST_SETTINGS: Final = (
    "fsync=off", "synchronous_commit=off", "full_page_writes=off",
    "max_connections=200", "shared_buffers=32MB", "listen_addresses=127.0.0.1",
    "log_min_messages=warning", "log_checkpoints=off",
)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries (or no server) to run the PostgreSQL tests with."""


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb``, ``postgres`` and ``pg_ctl``, or None.

    ``initdb`` on PATH is often a symlink (Debian's ``postgresql-common``
    wrapper, or a link into ``/usr/lib/postgresql/<v>/bin``); the link is
    resolved so that ``postgres`` is looked for beside the real binary.
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True)
    candidates.extend(Path(p) for p in versioned)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (ourselves) unless we are root, who may not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither a 'postgres' nor a 'nobody' user exists")


def _scratch_parent(owner: pwd.struct_passwd | None) -> str | None:
    """Where the cluster's folder goes: the usual temporary folder, if the server's user can reach it.

    The test session's private temporary folder (tests/scratch_guard.py) is
    0700 and root's; a server running as another user cannot enter it, so
    the cluster then lives in the system's ``/tmp`` (its own 0700 folder,
    removed by :meth:`PostgresServer.stop`).
    """
    base = Path(tempfile.gettempdir()).resolve()
    if owner is None:
        return None
    if all(os.stat(folder).st_mode & 0o001 for folder in (base, *base.parents)):
        return str(base)
    return "/tmp"


@dataclass
class PostgresServer:
    """One running cluster (or an external one); :meth:`start` it, :meth:`stop` it."""

    host: str
    port: int
    user: str
    password: str | None = None
    folder: Path | None = None
    process: subprocess.Popen | None = None
    _names: itertools.count = field(default_factory=lambda: itertools.count(1))
    _command: list[str] = field(default_factory=list)
    _as_owner: dict[str, Any] = field(default_factory=dict)

    # -- starting and stopping ---------------------------------------------

    @classmethod
    def start(cls, *settings: str) -> "PostgresServer":
        """Start a fresh cluster, or attach to ``GOVGATE_TEST_POSTGRES_URL``.

        ``settings`` (``name=value``) come after :data:`FAST_SETTINGS` and
        override them; an external server is attached to only without any.
        Raises :class:`PostgresUnavailable` when there is neither.
        """
        external = os.environ.get(EXTERNAL_URL_ENV)
        if external and not settings:
            return cls.attach(external)
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable("no PostgreSQL server binaries (initdb, postgres) on PATH or in "
                                      "/usr/lib/postgresql/*/bin; install Debian's postgresql package")
        owner = server_user()
        folder = Path(tempfile.mkdtemp(prefix="gg-pg-", dir=_scratch_parent(owner)))
        data, sockets, log = folder / "data", folder / "sock", folder / "postgres.log"
        sockets.mkdir()
        if owner is not None:
            for path in (folder, sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        as_owner = {} if owner is None else {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        try:
            init = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                 "--encoding=UTF8", "--no-locale", "--no-sync"],
                cwd=folder, capture_output=True, text=True, timeout=120, **as_owner)
            if init.returncode != 0:
                raise PostgresUnavailable(f"initdb failed ({init.returncode}): {init.stderr.strip()[-2000:]}")
            server = cls(host="127.0.0.1", port=free_port(), user=SUPERUSER, folder=folder)
            server._command = [str(bin_dir / "postgres"), "-D", str(data), "-k", str(sockets),
                               *[arg for setting in (*FAST_SETTINGS, *settings) for arg in ("-c", setting)]]
            server._as_owner = as_owner
            server.resume()
        except BaseException:
            if "server" in locals():
                server.stop()
            else:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return server

    def pause(self) -> None:
        """Shut the server down (fast: connections are cut), keeping its data, for outage tests."""

        if self.process is not None:
            stop_process(self.process, timeout_s=30, sig=signal.SIGINT)
            self.process = None

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT: no checkpoint, WAL buffers not written), keeping its data.

        What a crash of the server does to what it held in memory; the next
        :meth:`resume` recovers from the WAL on disk.
        """
        if self.process is not None:
            stop_process(self.process, timeout_s=30, sig=signal.SIGQUIT)
            self.process = None

    def resume(self) -> None:
        """Start the server (again) on its data folder and port; returns once it accepts connections."""
        assert self.folder is not None and self.process is None, "only a cluster this helper made, when stopped"
        log = self.folder / "postgres.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [*self._command, "-p", str(self.port)], cwd=self.folder, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=child_preexec(), **self._as_owner)
        self._wait_ready(log)

    @classmethod
    def attach(cls, url: str) -> "PostgresServer":
        """A server someone else runs (superuser URL); :meth:`stop` leaves it running."""
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        server = cls(host=parsed.host or "127.0.0.1", port=parsed.port or 5432,
                     user=parsed.username or "postgres", password=parsed.password)
        server._wait_ready(None)
        return server

    def _wait_ready(self, log: Path | None) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process is not None and self.process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log else ""
                raise PostgresUnavailable(f"postgres exited with {self.process.returncode}: {tail}")
            try:
                psycopg.connect(self._conninfo("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"postgres did not accept connections: {exc}") from exc
                time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back, disconnect, stop) and remove the folder."""
        self.pause()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- databases ---------------------------------------------------------

    def _conninfo(self, database: str) -> str:
        extra = f" password={self.password}" if self.password else ""
        return f"host={self.host} port={self.port} user={self.user} dbname={database}{extra}"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg 3 driver)."""
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"{DRIVER}://{auth}@{self.host}:{self.port}/{database}"

    def fresh_database(self, prefix: str = "t", *, template: str | None = None) -> str:
        """Create a database and return its URL: empty (a copy of ``template1``), or a copy of ``template``.

        ``template`` is the URL of a database made here that nobody is
        connected to (PostgreSQL copies it file by file): a store written
        once per module, copied for each test that tampers with it.
        """
        import psycopg
        from sqlalchemy.engine import make_url

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        source = "" if template is None else f' TEMPLATE "{make_url(template).database}"'
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{source}')  # noqa: S608 - our own generated names
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`fresh_database`, closing whatever still connects to it."""
        import psycopg
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, which it may stop, freeze or restart (the session's is shared).

    Test files import it by name (``from tests.postgres_server import own_postgres``)."""
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))  # the session fixture already fails in CI when there is none
    yield server
    server.stop()
